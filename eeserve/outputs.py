"""What ``LLM.generate`` returns (vLLM's ``RequestOutput`` / ``CompletionOutput``)."""

from __future__ import annotations

from dataclasses import dataclass, field

# One generated position: {token_id: Logprob} holding the top-N and the chosen token.


@dataclass(frozen=True)
class Logprob:
    """Log-probability (natural log) of one token and its 1-based rank; ``decoded_token`` is its text."""

    logprob: float
    rank: int
    decoded_token: str | None = None


@dataclass
class CompletionOutput:
    """One of the ``n`` completions of a request.

    Attributes:
        index: 0..n-1.
        text: generated text (stop string left out unless include_stop_str_in_output).
        token_ids: generated token ids.
        cumulative_logprob: sum of the chosen tokens' logprobs, or None when logprobs is None.
        logprobs: per generated token, {token_id: Logprob} of the top-N and the chosen token.
        finish_reason: ``stop``, ``length``, ``abort``, ``error`` (a step failed because of this
            request; the other requests went on) or None while running.
        stop_reason: the stop string or stop token id that ended it, else None.
        exit_layers: per generated token, the number of layers run before its exit.
        error: with finish_reason ``error``, what failed.
    """

    index: int
    text: str
    token_ids: list[int]
    cumulative_logprob: float | None = None
    logprobs: list[dict[int, Logprob]] | None = None
    finish_reason: str | None = None
    stop_reason: str | int | None = None
    exit_layers: list[int] = field(default_factory=list)
    error: str | None = None

    def finished(self) -> bool:
        return self.finish_reason is not None


@dataclass
class RequestMetrics:
    """Timings (seconds since the epoch) and early-exit figures of a request.

    Attributes:
        arrival_time, first_token_time, finished_time: wall-clock times (time.time()).
        num_preemptions: times the request was preempted and recomputed.
        mean_layers_per_token: mean exit layer over all generated tokens of all completions.
        flops_ratio: FLOPs spent on decode tokens relative to running them at full depth.
    """

    arrival_time: float
    first_token_time: float | None = None
    finished_time: float | None = None
    num_preemptions: int = 0
    mean_layers_per_token: float | None = None
    flops_ratio: float | None = None


@dataclass
class RequestOutput:
    """Output of one request: the prompt and its ``n`` completions."""

    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    outputs: list[CompletionOutput]
    finished: bool
    metrics: RequestMetrics
