"""Early exit inside one step: the hooks the layer loop (``worker.forward.run_layer_loop``) calls
at the exit points.

At each exit point e the decode rows still in the batch that may leave (``ExitPolicy``) are
scored by the confidence measure's ``Scorer``; the policy decides who leaves. Leaving rows take
their next token from the exit head at e (full vocabulary, computed only for them; under
``verify_exits`` a classifier's candidate logits, see ``_draft_logits``), get their skipped
layers' K/V filled or deferred by the ``KVFill`` (``propagate`` / ``recompute``), and are removed
from the batch, which goes on compacted. Prompt rows always run all L layers (docs/design.md
section 3). Pending rows of ``recompute`` join their sequence's pass at the layer they left
(``KVFill.joining``); with ``verify_exits`` those that reach layer L also go through the final
head: their full-depth logits verify the tokens their exits produced
(``ForwardResult.verify_logits``). Every FLOP is counted by the step's ``FlopMeter``.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from eeserve.config import EarlyExitConfig
from eeserve.core.kv_manager import KVCacheManager
from eeserve.early_exit.confidence import Scorer, build_scorer
from eeserve.early_exit.kv_fill import KVFill, LeavingRows, build_kv_fill
from eeserve.early_exit.policy import ExitPolicy
from eeserve.model.attention import AttentionMetadata, SeqAttention, build_attention_metadata
from eeserve.model.exit_heads import ExitHeads
from eeserve.model.kv_cache import KVCache
from eeserve.model.llama import LlamaModel, linear
from eeserve.request import Request
from eeserve.worker.flops import CostModel, FlopMeter
from eeserve.worker.forward import run_layer_loop
from eeserve.worker.inputs import BatchInputs, ForwardResult


@dataclass
class _Group:
    """Rows of one sequence in the current batch (contiguous, in position order)."""

    request_id: str
    is_decode: bool
    samples: bool
    eligible: bool  # may exit early (ExitPolicy.eligible)
    request: Request
    positions: list[int]  # [n] positions of the active rows
    slots: list[int]  # [n] their cache slots
    ctx_slots: torch.Tensor  # [ctx] slots of positions 0..ctx-1
    replayed: dict[int, list[int]] = field(default_factory=dict)  # layer -> rows' positions leaving there (propagate)
    prev_hidden: torch.Tensor | None = None  # [H] decode row at the previous exit (saturation)
    top_ids: torch.Tensor | None = None  # [K] pruned vocabulary from the first exit point

    @property
    def n(self) -> int:
        return len(self.positions)


_Key = tuple  # ("sample", request id) or ("verify", request id, position)


class _StepLogits:
    """Full-vocabulary logits of the rows that sample (and of the rows that verify drafts),
    computed once per head matrix at the end of the step: rows leaving at different exit points
    share one product with the LM head instead of streaming the whole head (113 MB for the
    default model) once per exit point."""

    def __init__(self) -> None:
        self.ready: dict[_Key, torch.Tensor] = {}  # key -> [V] logits already computed
        self.todo: list[tuple[_Key, torch.Tensor, torch.Tensor]] = []  # (key, [H] normed x, [V, H] W)

    def add_ready(self, key: _Key, logits: torch.Tensor) -> None:
        self.ready[key] = logits

    def add_normed(self, key: _Key, x: torch.Tensor, weight: torch.Tensor) -> None:
        self.todo.append((key, x, weight))

    def compute(self) -> dict[_Key, torch.Tensor]:
        out = dict(self.ready)
        by_matrix: dict[int, list[tuple[_Key, torch.Tensor, torch.Tensor]]] = {}
        for item in self.todo:
            by_matrix.setdefault(id(item[2]), []).append(item)
        for items in by_matrix.values():
            logits = linear(torch.stack([x for _, x, _ in items]), items[0][2]).float()  # [n, V]
            for (key, _, _), row in zip(items, logits):
                out[key] = row
        return out


class ExitExecutor:
    """Runs steps with early exit.

    Args:
        config: validated early-exit settings (exit layers already checked against the model).
        model: the backbone.
        heads: exit heads of every exit point.
        kv_cache: the cache tensors.
        kv_manager: owner of pending-KV state (``recompute``).
    """

    def __init__(self, config: EarlyExitConfig, model: LlamaModel, heads: ExitHeads, kv_cache: KVCache,
                 kv_manager: KVCacheManager) -> None:
        self.config = config
        self.model = model
        self.heads = heads
        self.kv_cache = kv_cache
        self.kv_manager = kv_manager
        L = model.args.num_layers
        self.exit_points = tuple(e for e in config.exit_layers if config.min_exit_layer <= e < L)
        self.costs = CostModel(model.args)
        self.policy = ExitPolicy(config, model.device.type)
        self.scorer: Scorer = build_scorer(config.confidence, config.vocab_prune_k, self.costs)
        self.kv_fill: KVFill = build_kv_fill(config.kv_fill, model, self.exit_points, kv_cache, kv_manager,
                                             self.costs)
        # Test/debug aid: when a list, every confidence check appends
        # (request_id, position, exit_layer, score, threshold).
        self.trace: list[tuple[str, int, int, float, float]] | None = None

    def needed(self, inputs: BatchInputs, requests: dict[str, Request]) -> bool:
        """Whether a step needs the early-exit hooks: it recomputes tokens that exited early
        (``propagate``, after preemption: ``KVFill.replayed_exits``), or it has decode rows and
        either checks exits (at most ``exit_batch_limit`` decode rows) or carries pending rows
        (``recompute``). Otherwise the plain full-depth hooks do the same work without the
        bookkeeping."""
        L = self.model.args.num_layers
        if any(self.kv_fill.replayed_exits(s, requests[s.request_id], L) for s in inputs.scheduled):
            return True
        n = len(inputs.decode_request_ids)
        if n == 0:
            return False
        if self.policy.checks_exits(n):
            return True
        return self.config.kv_fill == "recompute" and any(self.kv_manager.pending(r) for r in inputs.decode_request_ids)

    def forward(self, inputs: BatchInputs, requests: dict[str, Request]) -> ForwardResult:
        """Run one step through the layer loop with exit checks.

        Args:
            inputs: the packed step.
            requests: id -> request of every scheduled row (overrides, draft counts).
        """
        return run_layer_loop(self.model, self.kv_cache, inputs.token_ids, _ExitStep(self, inputs, requests))


class _ExitStep:
    """The layer-loop hooks of one early-exit step (``worker.forward.LayerHooks``)."""

    def __init__(self, ex: ExitExecutor, inputs: BatchInputs, requests: dict[str, Request]) -> None:
        self.ex = ex
        self.model = ex.model
        self.inputs = inputs
        self.meter = FlopMeter(ex.costs)
        self.logits = _StepLogits()
        self.exit_layer_of: dict[str, int] = {}  # request id -> layers run
        self.groups = self._groups(inputs, requests)
        self.check = ex.policy.checks_exits(sum(g.is_decode for g in self.groups))
        self.join_layers = ex.kv_fill.begin([g.request_id for g in self.groups if g.is_decode])
        self.replay_layers = {e for g in self.groups for e in g.replayed}
        self.meta: AttentionMetadata = self._meta()

    def _groups(self, inputs: BatchInputs, requests: dict[str, Request]) -> list[_Group]:
        groups = []
        policy = self.ex.policy
        for s, seq in zip(inputs.scheduled, inputs.seqs):
            req = requests[s.request_id]
            positions = list(range(s.start_position, s.start_position + s.num_new_tokens))
            groups.append(_Group(
                request_id=s.request_id,
                is_decode=s.is_decode,
                samples=s.sample,
                eligible=policy.eligible(req, s.is_decode),
                request=req,
                positions=positions,
                slots=seq.kv_slots[positions[0] : positions[-1] + 1].tolist(),
                ctx_slots=seq.kv_slots,
                replayed=self.ex.kv_fill.replayed_exits(s, req, self.model.args.num_layers),
            ))
        return groups

    def _meta(self) -> AttentionMetadata:
        device = self.model.device
        seqs, slots, offset = [], [], 0
        for g in self.groups:
            seqs.append(SeqAttention(
                rows=torch.arange(offset, offset + g.n, device=device),
                positions=torch.tensor(g.positions, dtype=torch.long, device=device),
                kv_slots=g.ctx_slots,
            ))
            slots.extend(g.slots)
            offset += g.n
        return build_attention_metadata(seqs, offset, torch.tensor(slots, dtype=torch.long, device=device),
                                        self.ex.kv_cache.pad_slot)

    def _offsets(self) -> list[int]:
        out, o = [], 0
        for g in self.groups:
            out.append(o)
            o += g.n
        return out

    # ---- LayerHooks --------------------------------------------------------------------------

    def stops(self) -> list[int]:
        L = self.model.args.num_layers
        return sorted(e for e in set(self.ex.exit_points) | self.join_layers | self.replay_layers if e < L)

    def start(self, h: torch.Tensor) -> None:
        self.ex.scorer.start(self.groups, h, [o + g.n - 1 for g, o in zip(self.groups, self._offsets())])

    def ran(self, h: torch.Tensor, start: int, end: int) -> None:
        self.meter.layers([(g.request_id, g.n) for g in self.groups], end - start)

    def at(self, layer: int, h: torch.Tensor) -> torch.Tensor | None:
        changed = False
        if layer in self.join_layers:
            h, changed = self._join(h, layer)
        if any(layer in g.replayed for g in self.groups):
            h = self._replay(layer, h)
            changed = True
        if self.check and layer in self.ex.exit_points:
            keep = self._exit_point(layer, h)
            if keep is not None:
                offsets = self._offsets()
                rows = [i for g, off, k in zip(self.groups, offsets, keep) if k for i in range(off, off + g.n)]
                h = h[torch.tensor(rows, dtype=torch.long, device=h.device)]
                self.groups = [g for g, k in zip(self.groups, keep) if k]
                changed = True
        if changed:
            if not self.groups:
                return None
            self.meta = self._meta()
        return h

    def finish(self, h: torch.Tensor | None) -> ForwardResult:
        """Rows that ran all layers: the final head for those that sample, and (verify_exits) for
        the pending rows, whose full-depth logits verify the drafts their exits produced."""
        model, ex = self.model, self.ex
        L = model.args.num_layers
        verify_keys: dict[str, list[_Key]] = {}
        if h is not None and self.groups:
            offsets = self._offsets()
            final = [(("sample", g.request_id), g, off + g.n - 1) for g, off in zip(self.groups, offsets) if g.samples]
            if ex.config.verify_exits:
                for g, off in zip(self.groups, offsets):
                    keys = [("verify", g.request_id, p) for p in sorted(ex.kv_fill.riding(g.request_id))]
                    final.extend((k, g, off + g.positions.index(k[2])) for k in keys)
                    if keys:
                        verify_keys[g.request_id] = keys
            if final:
                x = model.final_norm(h[torch.tensor([r for _, _, r in final], device=h.device)])  # [S', H]
                self.meter.head([g.request_id for _, g, _ in final], ex.costs.head)
                for (key, g, _), row in zip(final, x):
                    self.logits.add_normed(key, row, model.lm_head_w)
                    if key[0] == "sample":
                        self.exit_layer_of[g.request_id] = L
            ex.kv_fill.finish([g.request_id for g in self.groups])
            for g in self.groups:
                if g.is_decode:
                    self.meter.close(g.request_id, L)
        order = self.inputs.sample_request_ids
        rows = self.logits.compute()
        logits = torch.stack([rows[("sample", r)] for r in order]) if order else torch.empty(0, model.args.vocab_size)
        exit_layers = [self.exit_layer_of[r] for r in order]
        verify_logits = {rid: torch.stack([rows[k] for k in keys]) for rid, keys in verify_keys.items()}
        return ForwardResult(logits, exit_layers, self.meter.stats, self.meter.request_flops, verify_logits)

    # ---- between segments --------------------------------------------------------------------

    def _join(self, h: torch.Tensor, layer: int) -> tuple[torch.Tensor, bool]:
        """Insert the pending rows that join at ``layer`` into their sequences."""
        parts, joined = [], False
        for g, off in zip(self.groups, self._offsets()):
            rows = [(p, h[off + i : off + i + 1], s) for i, (p, s) in enumerate(zip(g.positions, g.slots))]
            for pk in self.ex.kv_fill.joining(g.request_id, layer):
                rows.append((pk.position, pk.hidden.view(1, -1).to(h.dtype), int(g.ctx_slots[pk.position])))
                joined = True
            rows.sort(key=lambda r: r[0])
            g.positions = [r[0] for r in rows]
            g.slots = [r[2] for r in rows]
            parts.extend(r[1] for r in rows)
        return (torch.cat(parts) if parts else h), joined

    def _replay(self, e: int, h: torch.Tensor) -> torch.Tensor:
        """Rows recomputed after preemption that left at exit ``e`` the first time leave again:
        the ``KVFill`` gives their skipped layers the same K/V as then (``propagate``), and the
        batch goes on without them. Returns [T', H] the rows that stay (``groups`` updated).

        Raises:
            RuntimeError: the row that samples would leave (a bug: it is never a replayed row).
        """
        keep: list[int] = []
        leaving: list[LeavingRows] = []
        left: list[_Group] = []
        for g, off in zip(self.groups, self._offsets()):
            gone = set(g.replayed.pop(e, ()))
            rows = list(zip(range(off, off + g.n), g.positions, g.slots))
            out = [r for r in rows if r[1] in gone]
            if out:
                idx = torch.tensor([r[0] for r in out], dtype=torch.long, device=h.device)
                leaving.append(LeavingRows(g.request_id, [r[1] for r in out], [r[2] for r in out], h[idx]))
            rows = [r for r in rows if r[1] not in gone]
            keep.extend(r[0] for r in rows)
            g.positions, g.slots = [r[1] for r in rows], [r[2] for r in rows]
            if rows:
                left.append(g)
            elif g.samples:
                raise RuntimeError(f"request {g.request_id!r}: the row that samples cannot replay an exit")
        self.ex.kv_fill.replay(e, leaving, self.meter)
        self.groups = left
        return h[torch.tensor(keep, dtype=torch.long, device=h.device)]

    def _exit_point(self, e: int, h: torch.Tensor) -> list[bool] | None:
        """Score the decode rows at exit ``e`` and let the policy decide.

        Returns:
            per group, True to keep it in the batch; None when nobody leaves.
        """
        ex, groups = self.ex, self.groups
        offsets = self._offsets()
        decode = [i for i, g in enumerate(groups) if g.is_decode]
        picked = ex.policy.to_score([groups[i].eligible for i in decode])  # indices into decode
        scored = [decode[j] for j in picked]
        if not scored:
            return None
        rows = torch.tensor([offsets[i] + groups[i].n - 1 for i in scored], device=h.device)
        hc = h[rows]  # [N, H] decode rows
        sgroups = [groups[i] for i in scored]
        head = ex.heads[e]
        scores = ex.scorer.score(head, self.model, sgroups, hc)
        self.meter.head([g.request_id for g in sgroups], scores.cost)
        thr = torch.tensor([ex.policy.threshold(g.request, e) for g in sgroups], dtype=torch.float32, device=h.device)
        if ex.trace is not None:
            for g, sc, t in zip(sgroups, scores.score.tolist(), thr.tolist()):
                ex.trace.append((g.request_id, g.positions[-1], e, sc, t))
        confident = torch.zeros(len(decode), dtype=torch.bool, device=h.device)
        where = torch.tensor(picked, dtype=torch.long, device=h.device)
        confident[where] = ex.scorer.confident(scores.score, thr)
        eligible = torch.tensor([groups[i].eligible for i in decode], dtype=torch.bool, device=h.device)
        leave = ex.policy.decide(confident, eligible)[where]  # [N] over the scored rows
        if not bool(leave.any()):
            return None
        idx = leave.nonzero().flatten()
        exiting = [sgroups[i] for i in idx.tolist()]
        ready = self._draft_logits(scores, idx, head)  # [M, V] or None
        if ready is not None:
            for g, row in zip(exiting, ready):
                self.logits.add_ready(("sample", g.request_id), row)
        else:
            self.meter.head([g.request_id for g in exiting], ex.costs.exit_head(head))
            weight = head.head_weight(self.model)
            for g, x in zip(exiting, head.normed(self.model, hc[idx])):
                self.logits.add_normed(("sample", g.request_id), x, weight)
        first_row = {id(g): off for g, off in zip(groups, offsets)}
        leaving = [LeavingRows(g.request_id, g.positions, g.slots, h[first_row[id(g)] : first_row[id(g)] + g.n])
                   for g in exiting]
        ex.kv_fill.on_exit(e, leaving, self.meter)
        for g in exiting:
            self.exit_layer_of[g.request_id] = e
            self.meter.close(g.request_id, e)
        gone = {id(g) for g in exiting}
        return [id(g) not in gone for g in groups]

    def _draft_logits(self, scores, idx: torch.Tensor, head) -> torch.Tensor | None:
        """[M, V] logits of the leaving rows when the check already computed them: the full
        logits of an unpruned logit measure, or under ``verify_exits`` a classifier's candidate
        logits (the other ids at -inf: a draft only has to be a good guess, the full model settles
        the token). None: the exit head has to run."""
        if scores.logits is not None:
            return scores.logits[idx]
        if scores.candidate_logits is not None and self.ex.config.verify_exits:
            ready = torch.full((len(idx), self.model.args.vocab_size), float("-inf"), device=idx.device)
            ready[:, head.candidate_ids] = scores.candidate_logits[idx]
            return ready
        return None


def build_exit_executor(config: EarlyExitConfig, model: LlamaModel, kv_cache: KVCache, kv_manager: KVCacheManager,
                        model_files) -> ExitExecutor:
    """Validate the early-exit settings against the model and load the heads.

    Raises:
        ValueError: exit layers or min_exit_layer outside 1..L-1, a head type or confidence measure that needs a
            heads folder that was not given, heads made for another model.
    """
    from eeserve.model import loader

    config.check_model(model.args.num_layers)
    if config.exit_heads is None:
        if config.exit_head != "shared":
            raise ValueError(f"exit_head {config.exit_head!r} needs trained heads: pass exit_heads (--exit-heads DIR)")
        if config.confidence == "classifier":
            raise ValueError("confidence 'classifier' needs trained heads with a classifier: pass exit_heads (--exit-heads DIR)")
        heads = ExitHeads(config.exit_layers, "shared", model)
    else:
        heads = ExitHeads.load(config.exit_heads, model, loader.model_identity(model_files), config.exit_layers)
        if config.confidence == "classifier" and not heads.spec.classifier:
            raise ValueError(f"confidence 'classifier' needs heads with a classifier; {config.exit_heads!r} has none")
    heads.to(model.dtype)
    return ExitExecutor(config, model, heads, kv_cache, kv_manager)
