"""KV fill for the layers a token skipped.

``propagate`` (Miao et al. 2024, arXiv 2407.20272, section 3.2; CALM's state propagation,
Schuster et al. 2022, section 4): for a token exiting at e with residual hidden h, every skipped
layer j in e..L-1 gets ``k_j = RoPE(W_k^j · RMSNorm_j(h))``, ``v_j = W_v^j · RMSNorm_j(h)``
before the step ends. Since ``RMSNorm_j(h) = g_j ⊙ h / rms(h)``, the gains are folded into the
weights once (``W^j diag(g_j)``) and all skipped layers are filled with one product of
``h / rms(h)`` with the stacked weights (docs/design.md section 3).

``recompute`` (EE-LLM, Chen et al. 2023, arXiv 2312.04916, section 4.2) is deferred: the
positions are marked pending in the KV manager and carried along the sequence's next deeper
pass: a pending position (exited earlier at layer e_p) joins that pass at layer e_p as an extra
query row, attending causally, and so writes its real K/V for every layer the pass runs; what
remains above the pass's depth stays pending (docs/design.md section 3).

The executor sees both through the ``KVFill`` protocol (``Propagate``, ``Recompute``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import torch

from eeserve.config import KV_FILLS
from eeserve.core.interfaces import ScheduledRequest
from eeserve.core.kv_manager import KVCacheManager, PendingKV
from eeserve.model.kv_cache import KVCache
from eeserve.model.llama import LlamaModel, apply_rope, linear
from eeserve.request import Request
from eeserve.worker.flops import CostModel, FlopMeter


@dataclass(frozen=True)
class LeavingRows:
    """The rows of one sequence that leave the batch at an exit point.

    Attributes:
        request_id: the sequence.
        positions: [n] positions of its rows now in the batch, increasing; the last is the decode
            row, the others pending rows riding along (``recompute``).
        slots: [n] their cache slots.
        hidden: [n, H] their residual hidden states at the exit.
    """

    request_id: str
    positions: list[int]
    slots: list[int]
    hidden: torch.Tensor


class KVFill(Protocol):
    """How the layers a token skipped get their K/V."""

    def begin(self, decode_request_ids: list[str]) -> set[int]:
        """Start a step with these decode rows; returns the layers where rows join the batch."""
        ...

    def joining(self, request_id: str, layer: int) -> list[PendingKV]:
        """Rows of ``request_id`` that join the batch at ``layer`` (position order)."""
        ...

    def riding(self, request_id: str) -> list[int]:
        """Positions of the request's rows that joined the batch this step."""
        ...

    def on_exit(self, exit_layer: int, leaving: list[LeavingRows], meter: FlopMeter) -> None:
        """Rows leave after ``exit_layer`` layers: fill or defer their missing K/V."""
        ...

    def finish(self, request_ids: list[str]) -> None:
        """These requests' rows ran all layers this step: their joined rows' K/V is complete."""
        ...

    def replayed_exits(self, s: ScheduledRequest, req: Request, num_layers: int) -> dict[int, list[int]]:
        """Positions of a chunk that recomputes generated tokens (after preemption) which must
        leave at the layer they first left, to rebuild the same cache: exit layer -> positions."""
        ...

    def replay(self, exit_layer: int, leaving: list[LeavingRows], meter: FlopMeter) -> None:
        """Rows of ``replayed_exits`` leave after ``exit_layer`` layers: write their K/V again."""
        ...


class PropagateFiller:
    """Fills skipped layers' K/V from the exit hidden state.

    Args:
        model: the backbone (weights are read once; folded copies are kept per exit point).
        exit_layers: the exit points that may be taken.
    """

    def __init__(self, model: LlamaModel, exit_layers: tuple[int, ...]) -> None:
        a = model.args
        self.model = model
        self.num_layers = a.num_layers
        q_dim = a.num_heads * a.head_dim
        folded = []  # per layer [2 kv_dim, H] with g_j folded in
        biases = []
        for layer in model.layers:
            w = layer.qkv_w[q_dim:].float()  # [2kv, H]
            folded.append(w * layer.input_norm.float()[None, :])
            biases.append(layer.qkv_bias[q_dim:].float() if layer.qkv_bias is not None else None)
        self.weights: dict[int, torch.Tensor] = {}
        self.biases: dict[int, torch.Tensor | None] = {}
        for e in exit_layers:
            self.weights[e] = torch.cat(folded[e:], dim=0).to(model.dtype).contiguous()  # [(L-e)*2kv, H]
            self.biases[e] = torch.cat(biases[e:]).to(model.dtype) if biases[0] is not None else None

    def flops(self, exit_layer: int) -> float:
        """FLOPs to fill one token exiting at ``exit_layer``."""
        return 2.0 * self.weights[exit_layer].numel()

    def fill(self, exit_layer: int, h: torch.Tensor, positions: torch.Tensor, slots: torch.Tensor, kv_cache: KVCache) -> None:
        """Write K/V of layers exit_layer..L-1 for the given tokens.

        Args:
            h: [N, H] residual hidden states at the exit (before any norm).
            positions: [N] int64 positions (for RoPE).
            slots: [N] int64 cache slots of those tokens.
        """
        a = self.model.args
        e = exit_layer
        n = h.shape[0]
        hf = h.float()
        x = (hf * torch.rsqrt(hf.pow(2).mean(-1, keepdim=True) + a.rms_norm_eps)).to(h.dtype)  # [N, H]
        kv = linear(x, self.weights[e])  # [N, (L-e)*2kv]
        if self.biases[e] is not None:
            kv = kv + self.biases[e]
        kv = kv.view(n, self.num_layers - e, 2, a.num_kv_heads, a.head_dim)
        cos = self.model.rope_cos[positions]  # [N, hd]
        sin = self.model.rope_sin[positions]
        k = apply_rope(kv[:, :, 0].reshape(n, -1, a.head_dim), cos, sin).view(n, self.num_layers - e, a.num_kv_heads, a.head_dim)
        v = kv[:, :, 1]
        for i, j in enumerate(range(e, self.num_layers)):
            kv_cache.k[j].index_copy_(0, slots, k[:, i].to(kv_cache.k[j].dtype))
            kv_cache.v[j].index_copy_(0, slots, v[:, i].to(kv_cache.v[j].dtype))


class Propagate:
    """``propagate``: the skipped layers' K/V of a decode row that leaves are written at once.

    Args:
        model: the backbone.
        exit_layers: the exit points that may be taken.
        kv_cache: the cache tensors.
        costs: the model's ``CostModel``.
    """

    def __init__(self, model: LlamaModel, exit_layers: tuple[int, ...], kv_cache: KVCache, costs: CostModel) -> None:
        self.filler = PropagateFiller(model, exit_layers)
        self.kv_cache = kv_cache
        self.costs = costs
        self.device = model.device

    def begin(self, decode_request_ids: list[str]) -> set[int]:
        return set()

    def joining(self, request_id: str, layer: int) -> list[PendingKV]:
        return []

    def riding(self, request_id: str) -> list[int]:
        return []

    def on_exit(self, exit_layer: int, leaving: list[LeavingRows], meter: FlopMeter) -> None:
        h = torch.stack([r.hidden[-1] for r in leaving])  # [M, H] the decode rows
        positions = torch.tensor([r.positions[-1] for r in leaving], device=self.device)
        slots = torch.tensor([r.slots[-1] for r in leaving], device=self.device)
        self.filler.fill(exit_layer, h, positions, slots, self.kv_cache)
        meter.fill([r.request_id for r in leaving], self.costs.propagate_fill(exit_layer))

    def finish(self, request_ids: list[str]) -> None:
        pass

    def replayed_exits(self, s: ScheduledRequest, req: Request, num_layers: int) -> dict[int, list[int]]:
        """A chunk's rows whose output token came from an early exit when first computed leave at
        the same layer again and get the same propagated K/V, so the cache, and the tokens that
        follow, are what they would have been without the preemption."""
        if s.is_decode:
            return {}
        out: dict[int, list[int]] = {}
        P = req.num_prompt_tokens
        for q in range(max(s.start_position, P), s.start_position + s.num_new_tokens):
            j = q - P + 1  # the output token that the row at position q produced
            if j < req.num_output_tokens and req.exit_layers[j] < num_layers and req.exit_layers[j] in self.filler.weights:
                out.setdefault(req.exit_layers[j], []).append(q)
        return out

    def replay(self, exit_layer: int, leaving: list[LeavingRows], meter: FlopMeter) -> None:
        h = torch.cat([r.hidden for r in leaving])  # [M, H]
        positions = torch.tensor([p for r in leaving for p in r.positions], device=self.device)
        slots = torch.tensor([q for r in leaving for q in r.slots], device=self.device)
        self.filler.fill(exit_layer, h, positions, slots, self.kv_cache)
        meter.fill([r.request_id for r in leaving for _ in r.positions], self.costs.propagate_fill(exit_layer))


class Recompute:
    """``recompute``: a leaving row's K/V above its exit is recorded as pending in the KV manager
    (which owns it) and completed by the sequence's next deeper pass. This object holds the
    step's view of it: which pending rows join at which layer, and which rode along.

    Args:
        kv_manager: owner of the pending-KV state.
    """

    def __init__(self, kv_manager: KVCacheManager) -> None:
        self.kv_manager = kv_manager
        self._joins: dict[str, dict[int, list[PendingKV]]] = {}  # request id -> layer -> rows joining
        self._riding: dict[str, list[int]] = {}  # request id -> positions that joined this step

    def begin(self, decode_request_ids: list[str]) -> set[int]:
        self._joins, self._riding = {}, {}
        layers: set[int] = set()
        for rid in decode_request_ids:
            for p in self.kv_manager.pending(rid):
                self._joins.setdefault(rid, {}).setdefault(p.from_layer, []).append(p)
                layers.add(p.from_layer)
        return layers

    def joining(self, request_id: str, layer: int) -> list[PendingKV]:
        rows = self._joins.get(request_id, {}).pop(layer, [])
        if rows:
            self._riding.setdefault(request_id, []).extend(p.position for p in rows)
        return rows

    def riding(self, request_id: str) -> list[int]:
        return self._riding.get(request_id, [])

    def on_exit(self, exit_layer: int, leaving: list[LeavingRows], meter: FlopMeter) -> None:
        # the decode row and the pending rows riding with it stay pending from the exit
        for r in leaving:
            for p, h in zip(r.positions, r.hidden):
                self.kv_manager.set_pending(r.request_id, PendingKV(p, exit_layer, h.clone()))

    def finish(self, request_ids: list[str]) -> None:
        for rid in request_ids:
            for p in self._riding.get(rid, ()):
                self.kv_manager.clear_pending(rid, p)

    def replayed_exits(self, s: ScheduledRequest, req: Request, num_layers: int) -> dict[int, list[int]]:
        # no replay: once its pending rows are filled the cache is the full-depth one, which a
        # chunk computes at once
        return {}

    def replay(self, exit_layer: int, leaving: list[LeavingRows], meter: FlopMeter) -> None:
        raise RuntimeError("recompute replays no exit")


def build_kv_fill(kind: str, model: LlamaModel, exit_layers: tuple[int, ...], kv_cache: KVCache,
                  kv_manager: KVCacheManager, costs: CostModel) -> KVFill:
    """The fill of ``EarlyExitConfig.kv_fill`` (one of ``config.KV_FILLS``).

    Raises:
        ValueError: an unknown fill.
    """
    if kind == "propagate":
        return Propagate(model, exit_layers, kv_cache, costs)
    if kind == "recompute":
        return Recompute(kv_manager)
    raise ValueError(f"kv_fill must be one of {', '.join(KV_FILLS)}, got {kind!r}")
