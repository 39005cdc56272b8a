"""The one layer loop of a step, full depth or with early exit.

``run_layer_loop`` embeds the packed rows and runs the decoder layers segment by segment. Between
segments it hands the batch to a ``LayerHooks`` object, which may reshape it (rows joining,
rows leaving) and changes the attention layout accordingly; at the end the hooks turn the rows
that are left into a ``ForwardResult``. ``FullDepth`` is the hooks object with no stop at all;
``eeserve.early_exit.executor`` supplies the one that checks exit points.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Generic, Protocol, TypeVar

import torch

from eeserve.model.attention import AttentionMetadata
from eeserve.model.kv_cache import KVCache
from eeserve.model.llama import LlamaModel
from eeserve.worker.flops import CostModel, FlopMeter
from eeserve.worker.inputs import BatchInputs, ForwardResult

R = TypeVar("R", covariant=True)


class LayerHooks(Protocol[R]):
    """What one pass does between layer segments.

    Attributes:
        meta: attention layout of the rows now in the batch (read before every segment).
    """

    meta: AttentionMetadata

    def stops(self) -> list[int]:
        """Layer counts (increasing, each in 1..L-1) after which the loop calls ``at``."""
        ...

    def start(self, h: torch.Tensor) -> None:
        """h: [T, H] the embedded rows, before layer 0."""
        ...

    def ran(self, h: torch.Tensor, start: int, end: int) -> None:
        """Layers ``start..end-1`` ran for the rows of h ([N, H]); count their FLOPs."""
        ...

    def at(self, layer: int, h: torch.Tensor) -> torch.Tensor | None:
        """After ``layer`` layers: return the batch that goes on ([N', H], with ``meta`` updated
        to it), or None when no row goes on."""
        ...

    def finish(self, h: torch.Tensor | None) -> R:
        """h: [N, H] rows that ran all L layers (None: none did) -> the pass's result."""
        ...


def run_layer_loop(model: LlamaModel, kv_cache: KVCache, token_ids: torch.Tensor, hooks: LayerHooks[R]) -> R:
    """Run packed rows through the layers with ``hooks`` between segments.

    Args:
        model: the backbone.
        kv_cache: the cache; every layer that runs writes its rows' K/V at ``hooks.meta``'s slots.
        token_ids: [T] int64 tokens of the rows.
        hooks: the pass's behaviour between segments (``FullDepth``, an early-exit step,
            ``TeacherForced``).
    """
    L = model.args.num_layers
    h: torch.Tensor | None = model.embed(token_ids)  # [T, H]
    hooks.start(h)
    cur = 0
    for b in [*hooks.stops(), L]:
        if b > cur:
            h = model.run_layers(h, cur, b, hooks.meta, kv_cache)
            hooks.ran(h, cur, b)
            cur = b
        if b == L:
            break
        h = hooks.at(b, h)
        if h is None:
            break
    return hooks.finish(h if cur == L else None)


class FullDepth:
    """Hooks of a step without exit checks: every row runs all layers, the shared head runs on the
    sample rows.

    Args:
        model: the backbone.
        inputs: the packed step.
        costs: the model's ``CostModel``.
    """

    def __init__(self, model: LlamaModel, inputs: BatchInputs, costs: CostModel) -> None:
        self.model = model
        self.inputs = inputs
        self.meta = inputs.meta
        self.meter = FlopMeter(costs)

    def stops(self) -> list[int]:
        return []

    def start(self, h: torch.Tensor) -> None:
        pass

    def ran(self, h: torch.Tensor, start: int, end: int) -> None:
        pass  # counted once for the whole step in ``finish``

    def at(self, layer: int, h: torch.Tensor) -> torch.Tensor | None:
        return h

    def finish(self, h: torch.Tensor | None) -> ForwardResult:
        inputs, L = self.inputs, self.model.args.num_layers
        assert h is not None, "a full-depth step keeps every row"
        logits = self.model.compute_logits(h[inputs.sample_rows])  # [S, V]
        self.meter.full_depth_step(inputs.meta.num_rows, len(inputs.sample_request_ids), inputs.decode_request_ids)
        exit_layers = [L] * len(inputs.sample_request_ids)
        return ForwardResult(logits, exit_layers, self.meter.stats, self.meter.request_flops)


@dataclass(frozen=True)
class TeacherForcedResult:
    """Residual hidden states (before the final norm) of the kept rows of a teacher-forced pass.

    Attributes:
        at_stops: per stop layer e, [N, H] after e layers.
        final: [N, H] after all L layers.
    """

    at_stops: list[torch.Tensor]
    final: torch.Tensor


class TeacherForced(Generic[R]):
    """Hooks of a teacher-forced pass (every row runs every layer), keeping the hidden states of
    ``rows`` at ``stops``.

    Args:
        meta: attention layout of the rows.
        stops: layer counts in 1..L-1, increasing.
        rows: [N] int64 rows to keep.
    """

    def __init__(self, meta: AttentionMetadata, stops: tuple[int, ...], rows: torch.Tensor) -> None:
        self.meta = meta
        self._stops = list(stops)
        self.rows = rows
        self.at_stops: list[torch.Tensor] = []

    def stops(self) -> list[int]:
        return self._stops

    def start(self, h: torch.Tensor) -> None:
        pass

    def ran(self, h: torch.Tensor, start: int, end: int) -> None:
        pass

    def at(self, layer: int, h: torch.Tensor) -> torch.Tensor | None:
        self.at_stops.append(h[self.rows])
        return h

    def finish(self, h: torch.Tensor | None) -> TeacherForcedResult:
        assert h is not None, "a teacher-forced pass keeps every row"
        return TeacherForcedResult(self.at_stops, h[self.rows])


def teacher_forced(model: LlamaModel, kv_cache: KVCache, token_ids: torch.Tensor, meta: AttentionMetadata,
                   rows: torch.Tensor, stops: tuple[int, ...] = ()) -> TeacherForcedResult:
    """The one teacher-forced full-depth forward: every row through all L layers (the layer loop
    with no early exit), keeping the hidden states of ``rows`` after each of ``stops`` layers and
    at the end. Used for token agreement and logprob checks (``LLMEngine.full_depth_logits``) and
    by the tuning package (features, scores, full-depth picks).

    Args:
        token_ids: [T] int64 tokens of one or more packed sequences.
        meta: their attention layout (K/V written at its slots of ``kv_cache``).
        rows: [N] int64 rows whose hidden states are kept.
        stops: layer counts in 1..L-1, increasing.
    """
    with torch.no_grad():  # not inference_mode: tuning trains heads on these hidden states
        return run_layer_loop(model, kv_cache, token_ids, TeacherForced(meta, tuple(stops), rows))
