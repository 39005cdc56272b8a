"""Per-request sampling parameters, named and validated as vLLM's ``SamplingParams``."""

from __future__ import annotations

from dataclasses import dataclass, field

_MAX_SEED = 2**63 - 1


def _check(ok: bool, name: str, allowed: str, value: object) -> None:
    if not ok:
        raise ValueError(f"SamplingParams.{name} must be {allowed}, got {value!r}")


@dataclass
class EarlyExitOverride:
    """Per-request early-exit setting (overrides the engine's ``EarlyExitConfig``).

    Attributes:
        enabled: False runs every layer for this request's tokens.
        threshold: a global confidence threshold for this request, or None to keep the
            engine's per-exit thresholds.
    """

    enabled: bool = True
    threshold: float | None = None

    def __post_init__(self) -> None:
        if self.threshold is not None and not isinstance(self.threshold, (int, float)):
            raise ValueError(
                f"early_exit.threshold must be a number or None, got {self.threshold!r}"
            )


@dataclass
class SamplingParams:
    """How to sample the tokens of one request (vLLM's names and defaults).

    Raises:
        ValueError: at construction, naming the field and its allowed values.
    """

    n: int = 1
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0  # 0 or -1: off
    min_p: float = 0.0
    seed: int | None = None
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0
    max_tokens: int | None = 16  # None: up to the context length
    min_tokens: int = 0
    stop: list[str] = field(default_factory=list)
    stop_token_ids: list[int] = field(default_factory=list)
    include_stop_str_in_output: bool = False
    ignore_eos: bool = False
    logprobs: int | None = None  # top-N logprobs per generated token (plus the chosen one)
    prompt_logprobs: int | None = None
    skip_special_tokens: bool = True
    early_exit: EarlyExitOverride | None = None

    def __post_init__(self) -> None:
        if isinstance(self.stop, str):
            self.stop = [self.stop]
        self.stop = list(self.stop or [])
        self.stop_token_ids = list(self.stop_token_ids or [])
        if self.top_k == -1:
            self.top_k = 0
        if isinstance(self.early_exit, dict):
            self.early_exit = EarlyExitOverride(**self.early_exit)
        _check(isinstance(self.n, int) and self.n >= 1, "n", "an integer >= 1", self.n)
        _check(
            isinstance(self.temperature, (int, float)) and 0.0 <= self.temperature <= 100.0,
            "temperature", "a number in [0, 100] (0 = greedy)", self.temperature,
        )
        _check(
            isinstance(self.top_p, (int, float)) and 0.0 < self.top_p <= 1.0,
            "top_p", "a number in (0, 1]", self.top_p,
        )
        _check(
            isinstance(self.top_k, int) and self.top_k >= 0,
            "top_k", "an integer >= 1, or 0 / -1 to disable", self.top_k,
        )
        _check(
            isinstance(self.min_p, (int, float)) and 0.0 <= self.min_p <= 1.0,
            "min_p", "a number in [0, 1]", self.min_p,
        )
        _check(
            self.seed is None or (isinstance(self.seed, int) and 0 <= self.seed <= _MAX_SEED),
            "seed", f"None or an integer in [0, {_MAX_SEED}]", self.seed,
        )
        for name in ("presence_penalty", "frequency_penalty"):
            v = getattr(self, name)
            _check(isinstance(v, (int, float)) and -2.0 <= v <= 2.0, name, "a number in [-2, 2]", v)
        _check(
            isinstance(self.repetition_penalty, (int, float)) and 0.0 < self.repetition_penalty <= 10.0,
            "repetition_penalty", "a number in (0, 10]", self.repetition_penalty,
        )
        _check(
            self.max_tokens is None or (isinstance(self.max_tokens, int) and self.max_tokens >= 1),
            "max_tokens", "None or an integer >= 1", self.max_tokens,
        )
        _check(
            isinstance(self.min_tokens, int) and self.min_tokens >= 0,
            "min_tokens", "an integer >= 0", self.min_tokens,
        )
        if self.max_tokens is not None:
            _check(
                self.min_tokens <= self.max_tokens,
                "min_tokens", f"<= max_tokens ({self.max_tokens})", self.min_tokens,
            )
        _check(
            all(isinstance(s, str) and s for s in self.stop),
            "stop", "a list of non-empty strings", self.stop,
        )
        _check(
            all(isinstance(t, int) and t >= 0 for t in self.stop_token_ids),
            "stop_token_ids", "a list of token ids >= 0", self.stop_token_ids,
        )
        for name in ("logprobs", "prompt_logprobs"):
            v = getattr(self, name)
            _check(v is None or (isinstance(v, int) and 0 <= v <= 20), name, "None or an integer in [0, 20]", v)

    @property
    def greedy(self) -> bool:
        """True when sampling reduces to argmax (temperature 0)."""
        return self.temperature < 1e-5
