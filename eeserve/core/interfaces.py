"""Dataclasses handed between the scheduler, the model runner and the engine."""

from __future__ import annotations

from dataclasses import dataclass, field

from eeserve.request import TokenLogprobs


@dataclass(frozen=True)
class ScheduledRequest:
    """Work for one request in one step.

    Attributes:
        request_id: the request.
        token_ids: [num_new_tokens] tokens whose KV this step computes.
        start_position: position of ``token_ids[0]`` in the sequence.
        block_ids: the request's block table (covers positions < start_position + num_new_tokens).
        sample: True when the chunk ends at the last known token, so a next token is sampled.
        is_decode: True for a single generated token that may exit early; prompt tokens and
            tokens recomputed after preemption run all layers.
    """

    request_id: str
    token_ids: tuple[int, ...]
    start_position: int
    block_ids: tuple[int, ...]
    sample: bool
    is_decode: bool

    @property
    def num_new_tokens(self) -> int:
        return len(self.token_ids)


@dataclass(frozen=True)
class SchedulerOutput:
    """What runs in one step.

    Attributes:
        scheduled: requests in batch order.
        preempted_request_ids: requests preempted (blocks freed, to be recomputed) this step.
        num_batched_tokens: total tokens scheduled (sum of num_new_tokens).
        finished_request_ids: requests finished while scheduling (``length``: the whole KV
            cache cannot hold them).
    """

    scheduled: tuple[ScheduledRequest, ...]
    preempted_request_ids: tuple[str, ...] = ()
    num_batched_tokens: int = 0
    finished_request_ids: tuple[str, ...] = ()

    @property
    def is_empty(self) -> bool:
        return not self.scheduled


@dataclass(frozen=True)
class SampledToken:
    """The token sampled for one request in one step.

    Attributes:
        token_id: sampled id.
        exit_layer: layers run before the exit that produced it (L when no early exit).
        logprobs: when requested.
        draft: True when it came from an early exit under ``verify_exits`` and waits for its
            position's full-depth token (the sequence's next step).
    """

    token_id: int
    exit_layer: int
    logprobs: TokenLogprobs | None = None
    draft: bool = False


@dataclass
class StepStats:
    """Work done by the model in one step (FLOPs per docs/design.md section 4, no attention).

    Attributes:
        layer_flops: FLOPs of decoder layers run (all rows).
        head_flops: FLOPs of exit heads and the final LM head.
        kv_fill_flops: FLOPs spent filling skipped layers' K/V.
        decode_full_flops: what the decode rows would have cost at full depth with one head.
        decode_flops: what the decode rows actually cost (layers + heads + fill).
        exits: exit layer -> decode tokens that exited there.
    """

    layer_flops: float = 0.0
    head_flops: float = 0.0
    kv_fill_flops: float = 0.0
    decode_full_flops: float = 0.0
    decode_flops: float = 0.0
    exits: dict[int, int] = field(default_factory=dict)


@dataclass(frozen=True)
class ModelRunnerOutput:
    """Result of one step.

    Attributes:
        sampled: request id -> its new token, for scheduled requests with ``sample``.
        stats: FLOP accounting of the step.
        request_flops: request id -> (FLOPs spent, FLOPs at full depth) for its decode row.
        verified: request id -> the full-depth token of each of its draft positions, in order
            (``verify_exits``; one per draft token the request holds). The scheduler keeps the
            drafts up to the first that differs, which it replaces, and discards the rest.
    """

    sampled: dict[str, SampledToken]
    stats: StepStats = field(default_factory=StepStats)
    request_flops: dict[str, tuple[float, float]] = field(default_factory=dict)
    verified: dict[str, tuple[SampledToken, ...]] = field(default_factory=dict)
