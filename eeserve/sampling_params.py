"""Per-request sampling parameters, named and validated as vLLM's ``SamplingParams``."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field, fields

from eeserve.config import is_int, is_number
from eeserve.errors import InvalidRequestError

_MAX_SEED = 2**63 - 1
MAX_N = 64  # most sequences one request may ask for
MAX_LOGPROBS = 20  # most top logprobs per token (OpenAI's limit)
MAX_LOGIT_BIAS = 100.0  # |bias| limit (OpenAI's)
_MAX_TOP_K = 2**63 - 1  # the sampler never builds a tensor from more (values >= the vocabulary filter nothing)


def _check(ok: bool, name: str, allowed: str, value: object) -> None:
    if not ok:
        raise InvalidRequestError(f"SamplingParams.{name} must be {allowed}, got {value!r}", param=name)


@dataclass
class EarlyExitOverride:
    """Per-request early-exit setting (overrides the engine's ``EarlyExitConfig``).

    Attributes:
        enabled: False runs every layer for this request's tokens.
        threshold: a global confidence threshold for this request, or None to keep the
            engine's per-exit thresholds. Its range depends on the engine's confidence measure
            (``eeserve.config.THRESHOLD_RANGES``); the engine checks it when the request is added.

    Raises:
        ValueError: ``enabled`` not a bool, ``threshold`` not a finite number or None.
    """

    enabled: bool = True
    threshold: float | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.enabled, bool):
            raise InvalidRequestError(f"SamplingParams.early_exit.enabled must be True or False, got {self.enabled!r}",
                                      param="early_exit.enabled")
        if self.threshold is not None:
            if not is_number(self.threshold):
                raise InvalidRequestError(
                    f"SamplingParams.early_exit.threshold must be a finite number or None, got {self.threshold!r}",
                    param="early_exit.threshold")
            self.threshold = float(self.threshold)

    @classmethod
    def coerce(cls, value: object) -> EarlyExitOverride | None:
        """An override from None, an ``EarlyExitOverride`` or a dict of its fields.

        Raises:
            ValueError: anything else, or a dict with other keys.
        """
        if value is None or isinstance(value, cls):
            return value
        if isinstance(value, Mapping):
            names = {f.name for f in fields(cls)}
            extra = [k for k in value if k not in names]
            if extra:
                raise InvalidRequestError(
                    f"SamplingParams.early_exit has unknown fields {extra}; allowed: {', '.join(sorted(names))}",
                    param="early_exit")
            return cls(**value)
        raise InvalidRequestError(
            "SamplingParams.early_exit must be None, an EarlyExitOverride or a dict with 'enabled' and/or "
            f"'threshold', got {value!r}", param="early_exit")


def _stop_list(stop: object) -> list[str]:
    if stop is None:
        return []
    if isinstance(stop, str):
        return [stop]
    _check(isinstance(stop, (list, tuple)), "stop", "a string or a list of non-empty strings", stop)
    return list(stop)  # type: ignore[arg-type]


def _logit_bias(bias: object) -> dict[int, float] | None:
    """``{token id: bias}``; keys may be ints or decimal strings (JSON object keys)."""
    if bias is None:
        return None
    allowed = f"a mapping of token ids to numbers in [-{MAX_LOGIT_BIAS:g}, {MAX_LOGIT_BIAS:g}]"
    _check(isinstance(bias, Mapping), "logit_bias", allowed, bias)
    out: dict[int, float] = {}
    for k, v in bias.items():  # type: ignore[union-attr]
        tid = int(k) if isinstance(k, str) and k.isascii() and k.isdigit() else k
        _check(is_int(tid) and tid >= 0, "logit_bias", allowed + " (keys are token ids >= 0)", k)
        _check(is_number(v) and abs(float(v)) <= MAX_LOGIT_BIAS, "logit_bias", allowed, v)
        out[int(tid)] = float(v)
    return out


@dataclass
class SamplingParams:
    """How to sample the tokens of one request (vLLM's names and defaults).

    Every field is checked here, without knowing the model; the engine's ``add_request`` checks
    what needs the model (token ids against the vocabulary, ``max_tokens`` against the context,
    ``early_exit.threshold`` against the confidence measure). The Python API and the HTTP server
    both go through these two checks.

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
    logit_bias: dict[int, float] | None = None  # token id -> added to its logit before sampling
    early_exit: EarlyExitOverride | None = None

    def __post_init__(self) -> None:
        self.stop = _stop_list(self.stop)
        if self.stop_token_ids is None:
            self.stop_token_ids = []
        _check(isinstance(self.stop_token_ids, (list, tuple)), "stop_token_ids", "a list of token ids >= 0",
               self.stop_token_ids)
        self.stop_token_ids = list(self.stop_token_ids)
        if self.top_k == -1:
            self.top_k = 0
        self.early_exit = EarlyExitOverride.coerce(self.early_exit)
        self.logit_bias = _logit_bias(self.logit_bias)
        _check(is_int(self.n) and 1 <= self.n <= MAX_N, "n", f"an integer in [1, {MAX_N}]", self.n)
        _check(
            is_number(self.temperature) and 0.0 <= self.temperature <= 2.0,
            "temperature", "a number in [0, 2] (0 = greedy)", self.temperature,
        )
        _check(
            is_number(self.top_p) and 0.0 < self.top_p <= 1.0,
            "top_p", "a number in (0, 1]", self.top_p,
        )
        _check(
            is_int(self.top_k) and 0 <= self.top_k <= _MAX_TOP_K,
            "top_k", f"an integer in [1, {_MAX_TOP_K}], or 0 / -1 to disable", self.top_k,
        )
        _check(
            is_number(self.min_p) and 0.0 <= self.min_p <= 1.0,
            "min_p", "a number in [0, 1]", self.min_p,
        )
        _check(
            self.seed is None or (is_int(self.seed) and 0 <= self.seed <= _MAX_SEED),
            "seed", f"None or an integer in [0, {_MAX_SEED}]", self.seed,
        )
        for name in ("presence_penalty", "frequency_penalty"):
            v = getattr(self, name)
            _check(is_number(v) and -2.0 <= v <= 2.0, name, "a number in [-2, 2]", v)
        _check(
            is_number(self.repetition_penalty) and 0.0 < self.repetition_penalty <= 10.0,
            "repetition_penalty", "a number in (0, 10]", self.repetition_penalty,
        )
        _check(
            self.max_tokens is None or (is_int(self.max_tokens) and self.max_tokens >= 1),
            "max_tokens", "None or an integer >= 1", self.max_tokens,
        )
        _check(
            is_int(self.min_tokens) and self.min_tokens >= 0,
            "min_tokens", "an integer >= 0", self.min_tokens,
        )
        if self.max_tokens is not None:
            _check(
                self.min_tokens <= self.max_tokens,
                "min_tokens", f"<= max_tokens ({self.max_tokens})", self.min_tokens,
            )
        _check(
            all(isinstance(s, str) and s for s in self.stop),
            "stop", "a string or a list of non-empty strings", self.stop,
        )
        _check(
            all(is_int(t) and t >= 0 for t in self.stop_token_ids),
            "stop_token_ids", "a list of token ids >= 0", self.stop_token_ids,
        )
        for name in ("logprobs", "prompt_logprobs"):
            v = getattr(self, name)
            _check(v is None or (is_int(v) and 0 <= v <= MAX_LOGPROBS), name,
                   f"None or an integer in [0, {MAX_LOGPROBS}]", v)
        for name in ("include_stop_str_in_output", "ignore_eos", "skip_special_tokens"):
            v = getattr(self, name)
            _check(isinstance(v, bool), name, "True or False", v)

    def token_ids_used(self) -> list[tuple[str, int]]:
        """(field, token id) of every token id this request names, for the engine's vocabulary check."""
        return [("stop_token_ids", t) for t in self.stop_token_ids] + [
            ("logit_bias", t) for t in (self.logit_bias or {})]

    @property
    def greedy(self) -> bool:
        """True when sampling reduces to argmax (temperature 0)."""
        return self.temperature < 1e-5
