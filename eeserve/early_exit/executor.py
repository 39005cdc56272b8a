"""The layer loop with exit checks, batch compaction and KV fill.

One step runs the packed batch layer segment by layer segment. At each exit point e the decode
rows still in the batch are scored by the confidence measure; the exit policy decides who
leaves. Leaving rows take their next token from the exit head at e (full vocabulary, computed
only for them; under ``verify_exits`` a classifier's candidate logits, see ``_score``), get
their skipped layers' K/V filled (``propagate``) or marked pending (``recompute``), and are
removed from the batch, which goes on compacted. Prompt rows always run all L layers
(DESIGN.md section 3).

With ``recompute``, a sequence's pending positions (exited earlier at layer e_p) join its next
pass at layer e_p as extra query rows, attending causally, and so write their real K/V for every
layer that pass runs; what remains above the pass's depth stays pending (EE-LLM, Chen et al.
2023, arXiv 2312.04916, section 4.2; DESIGN.md section 3). Attention at layer j reads only
positions whose K/V at j is real or being written in the same pass.

With ``verify_exits`` the pending rows that reach layer L also go through the final head: their
full-depth logits verify the tokens their exits produced (``ForwardResult.verify_logits``).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from eeserve.config import EarlyExitConfig
from eeserve.core.interfaces import ScheduledRequest, StepStats
from eeserve.core.kv_manager import KVCacheManager, PendingKV
from eeserve.early_exit.confidence import (
    LOGIT_MEASURES,
    entropy,
    is_confident,
    margin_confidence,
    saturation,
    softmax_confidence,
)
from eeserve.early_exit.kv_fill import PropagateFiller
from eeserve.early_exit.policy import exit_decision
from eeserve.model.attention import SeqAttention, build_attention_metadata
from eeserve.model.exit_heads import ExitHeads
from eeserve.model.llama import LlamaModel, linear
from eeserve.request import Request
from eeserve.worker.kv_cache import KVCache
from eeserve.worker.model_runner import BatchInputs, ForwardResult


@dataclass
class _Group:
    """Rows of one sequence in the current batch (contiguous, in position order)."""

    request_id: str
    is_decode: bool
    samples: bool
    eligible: bool  # may exit early
    threshold: float | None  # per-request override of the global threshold
    positions: list[int]  # [n] positions of the active rows
    slots: list[int]  # [n] their cache slots
    ctx_slots: torch.Tensor  # [ctx] slots of positions 0..ctx-1
    joins: dict[int, list[PendingKV]] = field(default_factory=dict)  # layer -> pending rows joining there
    riding: list[int] = field(default_factory=list)  # positions of pending rows now in the batch
    replayed: dict[int, list[int]] = field(default_factory=dict)  # layer -> rows' positions leaving there (propagate)
    prev_hidden: torch.Tensor | None = None  # [H] decode row at the previous exit (saturation)
    top_ids: torch.Tensor | None = None  # [K] pruned vocabulary from the first exit point
    spent: float = 0.0  # FLOPs

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
        self.thresholds = {e: config.threshold_at(i) for i, e in enumerate(config.exit_layers)}
        self.filler = PropagateFiller(model, self.exit_points) if config.kv_fill == "propagate" else None
        a = model.args
        self.layer_flops = a.layer_flops()
        self.full_head_flops = a.head_flops()
        # Test/debug aid: when a list, every confidence check appends
        # (request_id, position, exit_layer, score, threshold).
        self.trace: list[tuple[str, int, int, float, float]] | None = None

    # ---- helpers --------------------------------------------------------------------------

    def needed(self, inputs: BatchInputs, requests: dict[str, Request]) -> bool:
        """Whether a step needs this layer loop: it recomputes tokens that exited early
        (``propagate``, after preemption: ``_replayed_exits``), or it has decode rows and either
        checks exits (at most ``exit_batch_limit`` decode rows) or carries pending rows
        (``recompute``). Otherwise the plain full-depth forward does the same work without the
        bookkeeping."""
        if self.filler is not None and any(self._replayed_exits(s, requests[s.request_id]) for s in inputs.scheduled):
            return True
        n = len(inputs.decode_request_ids)
        if n == 0:
            return False
        if self._checks_exits(n):
            return True
        return self.config.kv_fill == "recompute" and any(self.kv_manager.pending(r) for r in inputs.decode_request_ids)

    def _checks_exits(self, num_decode: int) -> bool:
        """Whether a step with ``num_decode`` decode rows checks its exit points (max_exit_batch)."""
        limit = self.config.exit_batch_limit(self.model.device.type)
        return not limit or num_decode <= limit

    def _replayed_exits(self, s: ScheduledRequest, req: Request) -> dict[int, list[int]]:
        """Under ``propagate``, the positions of a chunk that recomputes generated tokens (after
        preemption) whose rows left early when first computed: exit layer -> positions. They leave
        at the same layer again and get the same propagated K/V, so the cache, and the tokens that
        follow, are what they would have been without the preemption. (``recompute`` needs no
        replay: once its pending rows are filled the cache is the full-depth one, which a chunk
        computes at once.)"""
        if s.is_decode or self.filler is None:
            return {}
        out: dict[int, list[int]] = {}
        L = self.model.args.num_layers
        P = req.num_prompt_tokens
        for q in range(max(s.start_position, P), s.start_position + s.num_new_tokens):
            j = q - P + 1  # the output token that the row at position q produced
            if j < req.num_output_tokens and req.exit_layers[j] < L and req.exit_layers[j] in self.filler.weights:
                out.setdefault(req.exit_layers[j], []).append(q)
        return out

    def _groups(self, inputs: BatchInputs, requests: dict[str, Request]) -> list[_Group]:
        groups = []
        cfg = self.config
        for s, seq in zip(inputs.scheduled, inputs.seqs):
            req = requests[s.request_id]
            ov = req.sampling_params.early_exit
            # A draft needs a next step to be verified in (not the request's last token), and a
            # sequence holds at most max_draft_tokens of them.
            room = not cfg.verify_exits or (
                req.num_output_tokens + 1 < req.max_tokens
                and (not cfg.max_draft_tokens or req.num_draft_tokens < cfg.max_draft_tokens))
            g = _Group(
                request_id=s.request_id,
                is_decode=s.is_decode,
                samples=s.sample,
                eligible=s.is_decode and (ov is None or ov.enabled) and room,
                threshold=ov.threshold if ov is not None else None,
                positions=list(range(s.start_position, s.start_position + s.num_new_tokens)),
                slots=[],
                ctx_slots=seq.kv_slots,
            )
            g.slots = g.ctx_slots[g.positions[0] : g.positions[-1] + 1].tolist()
            g.replayed = self._replayed_exits(s, req)
            if s.is_decode and self.config.kv_fill == "recompute":
                for p in self.kv_manager.pending(s.request_id):
                    g.joins.setdefault(p.from_layer, []).append(p)
            groups.append(g)
        return groups

    def _meta(self, groups: list[_Group]):
        device = self.model.device
        seqs, slots, offset = [], [], 0
        for g in groups:
            seqs.append(SeqAttention(
                rows=torch.arange(offset, offset + g.n, device=device),
                positions=torch.tensor(g.positions, dtype=torch.long, device=device),
                kv_slots=g.ctx_slots,
            ))
            slots.extend(g.slots)
            offset += g.n
        return build_attention_metadata(seqs, offset, torch.tensor(slots, dtype=torch.long, device=device),
                                        self.kv_cache.pad_slot)

    @staticmethod
    def _offsets(groups: list[_Group]) -> list[int]:
        out, o = [], 0
        for g in groups:
            out.append(o)
            o += g.n
        return out

    def _join(self, groups: list[_Group], h: torch.Tensor, layer: int) -> torch.Tensor:
        """Insert pending rows whose K/V is missing from ``layer`` into their sequences."""
        parts = []
        for g, off in zip(groups, self._offsets(groups)):
            rows = [(p, h[off + i : off + i + 1], s) for i, (p, s) in enumerate(zip(g.positions, g.slots))]
            for pk in g.joins.pop(layer, []):
                rows.append((pk.position, pk.hidden.view(1, -1).to(h.dtype), int(g.ctx_slots[pk.position])))
                g.riding.append(pk.position)
            rows.sort(key=lambda r: r[0])
            g.positions = [r[0] for r in rows]
            g.slots = [r[2] for r in rows]
            parts.extend(r[1] for r in rows)
        return torch.cat(parts) if parts else h

    def _score(self, e: int, groups: list[_Group], hc: torch.Tensor
               ) -> tuple[torch.Tensor, torch.Tensor | None, float, torch.Tensor | None]:
        """Confidence of the candidate decode rows at exit ``e``.

        Returns:
            ([N] scores, [N, V] full logits if the measure computed them else None, FLOPs per row,
            [N, K] the classifier's candidate logits or None). Under ``verify_exits`` the
            candidate logits serve as a leaving row's draft logits (``_exit_point``): a draft only
            has to be a good guess, the full model settles the token.
        """
        measure = self.config.confidence
        head = self.heads[e]
        H = self.model.args.hidden_size
        if measure in LOGIT_MEASURES:
            k = self.config.vocab_prune_k
            full = None
            if k > 0 and all(g.top_ids is not None for g in groups):
                ids = torch.stack([g.top_ids for g in groups])  # [N, K]
                logits = head.logits(self.model, hc, ids)
                cost = 2.0 * H * k + head.transform_flops(H)
            else:
                logits = full = head.logits(self.model, hc)
                cost = self.full_head_flops + head.transform_flops(H)
                if k > 0:
                    top = full.topk(k, dim=-1).indices
                    for g, t in zip(groups, top):
                        g.top_ids = t
            fn = {"softmax": softmax_confidence, "margin": margin_confidence, "entropy": entropy}[measure]
            return fn(logits), full, cost, None
        if measure == "saturation":
            prev = torch.stack([g.prev_hidden for g in groups])
            return saturation(hc, prev), None, 6.0 * H, None
        prob, cand = head.classifier_check(hc, self.model)  # classifier
        return prob, None, head.classifier_flops(H), cand

    # ---- the step -------------------------------------------------------------------------

    def forward(self, inputs: BatchInputs, requests: dict[str, Request]) -> ForwardResult:
        model, cfg = self.model, self.config
        L = model.args.num_layers
        stats = StepStats()
        groups = self._groups(inputs, requests)
        h = model.embed(inputs.token_ids)  # [T, H]
        if cfg.confidence == "saturation":
            for g, off in zip(groups, self._offsets(groups)):
                g.prev_hidden = h[off + g.n - 1]
        step_logits = _StepLogits()
        exit_layer_of: dict[str, int] = {}  # request id -> layers run
        request_flops: dict[str, tuple[float, float]] = {}  # request id -> (spent, full depth)
        boundaries = sorted(set(self.exit_points) | {j for g in groups for j in (*g.joins, *g.replayed)} | {L})
        meta = self._meta(groups)
        check = self._checks_exits(sum(g.is_decode for g in groups))
        cur = 0
        for b in boundaries:
            if b > cur:
                h = model.run_layers(h, cur, b, meta, self.kv_cache)
                for g in groups:
                    g.spent += g.n * (b - cur) * self.layer_flops
                stats.layer_flops += h.shape[0] * (b - cur) * self.layer_flops
                cur = b
            changed = False
            if any(b in g.joins for g in groups):
                h = self._join(groups, h, b)
                changed = True
            if any(b in g.replayed for g in groups):
                h, groups = self._replay(b, groups, h, stats)
                changed = True
            if b == L:
                break
            if check and b in self.exit_points:
                keep = self._exit_point(b, groups, h, step_logits, exit_layer_of, stats, request_flops)
                if keep is not None:
                    offsets = self._offsets(groups)
                    rows = [i for g, off, k in zip(groups, offsets, keep) if k for i in range(off, off + g.n)]
                    h = h[torch.tensor(rows, dtype=torch.long, device=h.device)]
                    groups = [g for g, k in zip(groups, keep) if k]
                    changed = True
            if changed:
                if not groups:
                    break
                meta = self._meta(groups)

        # Rows that ran all layers: the final head for those that sample, and (verify_exits) for
        # the pending rows, whose full-depth logits verify the drafts their exits produced.
        verify_keys: dict[str, list[_Key]] = {}
        if groups:
            offsets = self._offsets(groups)
            final = [(("sample", g.request_id), g, off + g.n - 1) for g, off in zip(groups, offsets) if g.samples]
            if cfg.verify_exits:
                for g, off in zip(groups, offsets):
                    keys = [("verify", g.request_id, p) for p in sorted(g.riding)]
                    final.extend((k, g, off + g.positions.index(k[2])) for k in keys)
                    if keys:
                        verify_keys[g.request_id] = keys
            if final:
                x = model.final_norm(h[torch.tensor([r for _, _, r in final], device=h.device)])  # [S', H]
                stats.head_flops += len(final) * self.full_head_flops
                for (key, g, _), row in zip(final, x):
                    step_logits.add_normed(key, row, model.lm_head_w)
                    g.spent += self.full_head_flops
                    if key[0] == "sample":
                        exit_layer_of[g.request_id] = L
            for g in groups:
                for p in g.riding:
                    self.kv_manager.clear_pending(g.request_id, p)
                if g.is_decode:
                    stats.exits[L] = stats.exits.get(L, 0) + 1
                    self._account(g, stats, request_flops)

        order = inputs.sample_request_ids
        rows = step_logits.compute()
        logits = torch.stack([rows[("sample", r)] for r in order]) if order else torch.empty(0, model.args.vocab_size)
        exit_layers = [exit_layer_of[r] for r in order]
        verify_logits = {rid: torch.stack([rows[k] for k in keys]) for rid, keys in verify_keys.items()}
        return ForwardResult(logits, exit_layers, stats, request_flops, verify_logits)

    def _replay(self, e: int, groups: list[_Group], h: torch.Tensor, stats: StepStats
                ) -> tuple[torch.Tensor, list[_Group]]:
        """Rows recomputed after preemption that left at exit ``e`` the first time leave again:
        their skipped layers get the propagated K/V from their hidden state here (``propagate``),
        and the batch goes on without them.

        Returns:
            ([T', H] the rows that stay, the groups that still have rows).
        """
        keep: list[int] = []
        leave: list[tuple[int, int, int]] = []  # (row, position, slot)
        left: list[_Group] = []
        for g, off in zip(groups, self._offsets(groups)):
            gone = set(g.replayed.pop(e, ()))
            rows = list(zip(range(off, off + g.n), g.positions, g.slots))
            leave.extend(r for r in rows if r[1] in gone)
            rows = [r for r in rows if r[1] not in gone]
            keep.extend(r[0] for r in rows)
            g.positions, g.slots = [r[1] for r in rows], [r[2] for r in rows]
            if rows:
                left.append(g)
            elif g.samples:
                raise RuntimeError(f"request {g.request_id!r}: the row that samples cannot replay an exit")
        device = h.device
        self.filler.fill(e, h[torch.tensor([r[0] for r in leave], device=device)],
                         torch.tensor([r[1] for r in leave], device=device),
                         torch.tensor([r[2] for r in leave], device=device), self.kv_cache)
        stats.kv_fill_flops += self.filler.flops(e) * len(leave)
        return h[torch.tensor(keep, dtype=torch.long, device=device)], left

    def _account(self, g: _Group, stats: StepStats, request_flops: dict[str, tuple[float, float]]) -> None:
        """Close the FLOP books of a decode row that left (at an exit point or at L)."""
        full = self.model.args.full_depth_flops()
        stats.decode_full_flops += full
        stats.decode_flops += g.spent
        request_flops[g.request_id] = (g.spent, full)

    def _exit_point(self, e: int, groups: list[_Group], h: torch.Tensor, step_logits: _StepLogits,
                    exit_layer_of: dict[str, int], stats: StepStats,
                    request_flops: dict[str, tuple[float, float]]) -> list[bool] | None:
        """Score the decode rows at exit ``e`` and let the policy decide.

        Returns:
            per group, True to keep it in the batch; None when nobody leaves.
        """
        offsets = self._offsets(groups)
        decode = [i for i, g in enumerate(groups) if g.is_decode]
        cand = [i for i in decode if groups[i].eligible]  # only rows that may leave are scored
        if not cand or (self.config.exit_policy == "batch" and len(cand) < len(decode)):
            return None  # under ``batch`` one row that may not leave keeps the whole batch
        rows = torch.tensor([offsets[i] + groups[i].n - 1 for i in cand], device=h.device)
        hc = h[rows]  # [N, H] decode rows
        cgroups = [groups[i] for i in cand]
        scores, full, cost, cand_logits = self._score(e, cgroups, hc)
        stats.head_flops += cost * len(cand)
        for g in cgroups:
            g.spent += cost
        thr = torch.tensor([g.threshold if g.threshold is not None else self.thresholds[e] for g in cgroups],
                           dtype=torch.float32, device=h.device)
        eligible = torch.ones(len(cgroups), dtype=torch.bool, device=h.device)
        leave = exit_decision(self.config.exit_policy, is_confident(self.config.confidence, scores, thr), eligible)
        if self.trace is not None:
            for g, sc, t in zip(cgroups, scores.tolist(), thr.tolist()):
                self.trace.append((g.request_id, g.positions[-1], e, sc, t))
        if self.config.confidence == "saturation":
            for g, row in zip(cgroups, hc):
                g.prev_hidden = row
        if not bool(leave.any()):
            return None
        idx = leave.nonzero().flatten()
        exiting = [cgroups[i] for i in idx.tolist()]
        h_exit = hc[idx]  # [M, H]
        head = self.heads[e]
        ready = full[idx] if full is not None else None  # [M, V]
        if ready is None and cand_logits is not None and self.config.verify_exits:
            # drafts from the candidate logits, the other ids at -inf
            ready = torch.full((len(exiting), self.model.args.vocab_size), float("-inf"), device=h.device)
            ready[:, head.candidate_ids] = cand_logits[idx]
        if ready is not None:
            for g, row in zip(exiting, ready):
                step_logits.add_ready(("sample", g.request_id), row)
        else:
            head_cost = self.full_head_flops + head.transform_flops(self.model.args.hidden_size)
            stats.head_flops += head_cost * len(exiting)
            weight = head.head_weight(self.model)
            for g, x in zip(exiting, head.normed(self.model, h_exit)):
                step_logits.add_normed(("sample", g.request_id), x, weight)
                g.spent += head_cost
        positions = torch.tensor([g.positions[-1] for g in exiting], device=h.device)
        slots = torch.tensor([g.slots[-1] for g in exiting], device=h.device)
        if self.filler is not None:
            self.filler.fill(e, h_exit, positions, slots, self.kv_cache)
            fill = self.filler.flops(e)
            stats.kv_fill_flops += fill * len(exiting)
            for g in exiting:
                g.spent += fill
        else:
            # recompute: the decode row and the pending rows riding with it stay pending from e.
            for g in exiting:
                off = offsets[groups.index(g)]
                for i, p in enumerate(g.positions):
                    self.kv_manager.set_pending(g.request_id, PendingKV(p, e, h[off + i].clone()))
        for g in exiting:
            exit_layer_of[g.request_id] = e
            stats.exits[e] = stats.exits.get(e, 0) + 1
            self._account(g, stats, request_flops)
        gone = {id(g) for g in exiting}
        return [id(g) not in gone for g in groups]


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
