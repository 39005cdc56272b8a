"""Engine-side state of one sequence being generated."""

from __future__ import annotations

import enum
from dataclasses import dataclass, field

from eeserve.sampling_params import SamplingParams


class RequestStatus(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    PREEMPTED = "preempted"
    FINISHED_STOPPED = "stop"
    FINISHED_LENGTH = "length"
    FINISHED_ABORTED = "abort"
    FINISHED_ERROR = "error"  # a step failed because of this request; the others went on (vLLM's name)

    @property
    def finished(self) -> bool:
        return self in (
            RequestStatus.FINISHED_STOPPED,
            RequestStatus.FINISHED_LENGTH,
            RequestStatus.FINISHED_ABORTED,
            RequestStatus.FINISHED_ERROR,
        )

    @property
    def finish_reason(self) -> str | None:
        """OpenAI/vLLM finish reason: ``stop``, ``length``, ``abort``, ``error``; None while unfinished."""
        return self.value if self.finished else None


@dataclass(frozen=True)
class TokenLogprobs:
    """Log-probabilities (natural log, of the model's unmodified distribution) for one token.

    Attributes:
        token_id: the sampled token.
        logprob: its log-probability.
        rank: 1-based rank of the sampled token in the distribution.
        top: the top-N (token id, logprob) pairs, best first.
    """

    token_id: int
    logprob: float
    rank: int
    top: tuple[tuple[int, float], ...]


@dataclass
class Request:
    """One sequence (a child of a user request when n > 1).

    The scheduler changes ``status`` and ``num_computed_tokens``, appends sampled tokens and
    settles drafts (``verify_exits``); the engine cuts the outputs at a stop string. Block tables
    live in the KV manager, never here.
    """

    request_id: str
    prompt_token_ids: list[int]
    sampling_params: SamplingParams
    arrival_time: float  # seconds, time.time()
    max_tokens: int  # resolved output budget (tokens)
    eos_token_ids: tuple[int, ...] = ()  # every id that ends generation (EOS; generation_config.json's list)
    output_token_ids: list[int] = field(default_factory=list)
    output_logprobs: list[TokenLogprobs] = field(default_factory=list)
    exit_layers: list[int] = field(default_factory=list)  # layers run, one per output token
    num_computed_tokens: int = 0  # tokens whose KV is in the cache
    num_preemptions: int = 0
    status: RequestStatus = RequestStatus.WAITING
    seed: int | None = None  # sampling seed: output token j's noise is keyed by (seed, j) (worker/sampler.py)
    first_token_time: float | None = None  # seconds, time.time()
    finished_time: float | None = None
    stop_reason: str | int | None = None  # the stop string or stop token that ended it
    error: str | None = None  # why a step failed for this request alone (status FINISHED_ERROR)
    flops: float = 0.0  # FLOPs spent on this request's decode tokens
    full_flops: float = 0.0  # FLOPs the same tokens would cost at full depth
    num_draft_tokens: int = 0  # trailing output tokens from early exits not yet verified (verify_exits)

    @property
    def num_prompt_tokens(self) -> int:
        return len(self.prompt_token_ids)

    @property
    def num_output_tokens(self) -> int:
        return len(self.output_token_ids)

    @property
    def num_tokens(self) -> int:
        return len(self.prompt_token_ids) + len(self.output_token_ids)

    @property
    def num_confirmed_tokens(self) -> int:
        """Output tokens that are final: all but the trailing drafts (``verify_exits``)."""
        return len(self.output_token_ids) - self.num_draft_tokens

    def truncate_outputs(self, num_tokens: int) -> None:
        """Keep the first ``num_tokens`` output tokens (with their exit layers and logprobs); the
        tokens dropped are the last ones, drafts first."""
        dropped = max(0, len(self.output_token_ids) - num_tokens)
        self.num_draft_tokens = max(0, self.num_draft_tokens - dropped)
        del self.output_token_ids[num_tokens:]
        del self.exit_layers[num_tokens:]
        del self.output_logprobs[num_tokens:]

    @property
    def all_token_ids(self) -> list[int]:
        return self.prompt_token_ids + self.output_token_ids

    @property
    def is_finished(self) -> bool:
        return self.status.finished
