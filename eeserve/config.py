"""Engine configuration: frozen dataclasses, each validated once in ``__post_init__``.

Only entry points (CLI, server, ``LLM``) read flags or environment variables; everything else
receives one of these objects.
"""

from __future__ import annotations

import math
import numbers
from dataclasses import dataclass, field
from typing import Literal

ExitPolicy = Literal["none", "batch", "token"]
ExitHeadType = Literal["shared", "adapter", "mlp", "untied"]
ConfidenceMeasure = Literal["softmax", "margin", "entropy", "saturation", "classifier"]
KVFill = Literal["propagate", "recompute"]

EXIT_POLICIES = ("none", "batch", "token")
EXIT_HEAD_TYPES = ("shared", "adapter", "mlp", "untied")
CONFIDENCE_MEASURES = ("softmax", "margin", "entropy", "saturation", "classifier")
KV_FILLS = ("propagate", "recompute")
DTYPES = ("float32", "bfloat16", "float16")
MODEL_DTYPES = ("auto", *DTYPES)  # auto: measured, see eeserve.model.kernels.choose_dtype

# The thresholds each confidence measure allows, [low, high] (the range of its score): a token
# exits when its score is >= the threshold (<= for entropy). The CLI, the HTTP server and the
# Python API all check against this table, through ``check_threshold``.
THRESHOLD_RANGES: dict[str, tuple[float, float, str]] = {
    "softmax": (0.0, 1.0, "max probability"),
    "margin": (0.0, 1.0, "top-1 minus top-2 probability"),
    "entropy": (0.0, math.inf, "entropy in nats"),
    "saturation": (-1.0, 1.0, "cosine similarity"),
    "classifier": (0.0, 1.0, "learned probability"),
}
assert tuple(THRESHOLD_RANGES) == CONFIDENCE_MEASURES


def _require(ok: bool, where: str, allowed: str, value: object) -> None:
    if not ok:
        raise ValueError(f"{where} must be {allowed}, got {value!r}")


def is_int(v: object) -> bool:
    """An integer that is not a bool (True is an int in Python, never a count here)."""
    return isinstance(v, numbers.Integral) and not isinstance(v, bool)


def is_number(v: object) -> bool:
    """A finite real number that is not a bool (NaN and infinities are refused)."""
    return isinstance(v, numbers.Real) and not isinstance(v, bool) and math.isfinite(float(v))


def threshold_range(measure: str) -> str:
    """The allowed thresholds of ``measure`` in words, e.g. ``a number in [0, 1] (max probability)``."""
    low, high, what = THRESHOLD_RANGES[measure]
    rng = f"a number >= {low:g}" if math.isinf(high) else f"a number in [{low:g}, {high:g}]"
    return f"{rng} for confidence {measure!r} ({what})"


def check_threshold(measure: str, value: object, where: str = "threshold") -> float:
    """Validate one threshold of confidence measure ``measure``.

    Returns:
        the threshold as a float.

    Raises:
        ValueError: ``value`` is not a finite number in ``THRESHOLD_RANGES[measure]``; the
            message names ``where`` and the range.
    """
    low, high, _ = THRESHOLD_RANGES[measure]
    _require(is_number(value) and low <= float(value) <= high, where, threshold_range(measure), value)
    return float(value)


def _check_device_present(device: str) -> None:
    """Refuse an accelerator this machine does not have (imports torch only for one)."""
    import torch

    if device == "mps":
        _require(torch.backends.mps.is_available(), "device", "an available device (cpu here: no MPS backend)", device)
        return
    n = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if n == 0:
        raise ValueError(f"device must be an available device, got {device!r}: torch finds no CUDA device here "
                         f"(CUDA build: {torch.version.cuda or 'no, a CPU-only torch'}); use cpu")
    index = int(device[5:]) if device.startswith("cuda:") else 0
    _require(index < n, "device", f"cpu or cuda:0..cuda:{n - 1} ({n} CUDA device(s) here)", device)


@dataclass(frozen=True)
class ModelConfig:
    """Which model to run and how.

    Attributes:
        model: alias (``smollm2-135m``), path to a ``.gguf`` file, or a Hugging Face model folder.
        dtype: weight dtype, one of ``MODEL_DTYPES``. ``auto`` picks bfloat16 where the CPU has
            AMX-BF16 or AVX512-BF16 and bf16 products measure faster, else float32. On CPUs the
            residual stream, norms and KV cache stay float32 whatever the weights.
        device: torch device string (``cpu``, ``cuda``, ``cuda:1``).
        max_model_len: context length in tokens (prompt + output); None = the model's own.
        seed: seed of the engine-wide generator used by requests without a seed.
        quantization: None, or ``"int8"``: weight-only int8 products (one scale per output row)
            on CPUs, for memory-bound decode; the fp32 weights stay for everything else.
        kernel_tuning: on CPUs, time the matrix-product forms for this model's shapes once per
            machine (cached) and use the fastest (``eeserve.model.kernels``); False keeps the
            fixed legacy rule (and ``auto`` means float32).
    """

    model: str = "smollm2-135m"
    dtype: str = "auto"
    device: str = "cpu"
    max_model_len: int | None = None
    seed: int = 0
    kernel_tuning: bool = True
    quantization: str | None = None

    def __post_init__(self) -> None:
        _require(self.quantization in (None, "int8"), "quantization", "None or 'int8'", self.quantization)
        _require(self.dtype in MODEL_DTYPES, "dtype", f"one of {', '.join(MODEL_DTYPES)}", self.dtype)
        _require(
            self.max_model_len is None or self.max_model_len >= 1,
            "max_model_len", "None or an integer >= 1", self.max_model_len,
        )
        _require(
            isinstance(self.device, str) and (self.device == "cpu" or self.device == "mps" or self.device == "cuda"
                                              or (self.device.startswith("cuda:") and self.device[5:].isdigit())),
            "device", "cpu, cuda, cuda:N or mps", self.device,
        )
        if self.device != "cpu":
            _check_device_present(self.device)


@dataclass(frozen=True)
class CacheConfig:
    """Paged KV cache budget.

    Attributes:
        block_size: token slots per KV block.
        num_kv_blocks: number of blocks; takes precedence over ``kv_cache_memory``.
        kv_cache_memory: KV budget in bytes (all layers, K and V); None with no
            ``num_kv_blocks`` means enough blocks for ``max_num_seqs`` full contexts, capped at 2 GiB.
        debug_nan_fill: fill never-written slots with NaN so that a read of one poisons the
            output (a test aid, see tests/test_early_exit.py).
    """

    block_size: int = 16
    num_kv_blocks: int | None = None
    kv_cache_memory: int | None = None
    debug_nan_fill: bool = False

    def __post_init__(self) -> None:
        _require(
            self.block_size in (1, 2, 4, 8, 16, 32, 64, 128, 256),
            "block_size", "a power of two in [1, 256]", self.block_size,
        )
        _require(
            self.num_kv_blocks is None or self.num_kv_blocks >= 1,
            "num_kv_blocks", "None or an integer >= 1", self.num_kv_blocks,
        )
        _require(
            self.kv_cache_memory is None or self.kv_cache_memory > 0,
            "kv_cache_memory", "None or a positive number of bytes", self.kv_cache_memory,
        )


@dataclass(frozen=True)
class SchedulerConfig:
    """Iteration-level batching limits (vLLM's names).

    Attributes:
        max_num_seqs: most requests in one step.
        max_num_batched_tokens: most tokens (prefill chunks + decode tokens) in one step;
            longer prompts are prefilled in chunks.
    """

    max_num_seqs: int = 32
    max_num_batched_tokens: int = 512

    def __post_init__(self) -> None:
        _require(self.max_num_seqs >= 1, "max_num_seqs", "an integer >= 1", self.max_num_seqs)
        _require(
            self.max_num_batched_tokens >= 1,
            "max_num_batched_tokens", "an integer >= 1", self.max_num_batched_tokens,
        )


@dataclass(frozen=True)
class EarlyExitConfig:
    """Early exit: where tokens may leave, how confidence is judged, how a batch decides.

    Semantics and terms: docs/design.md sections 2-4; the seed paper is Miao et al. 2024,
    arXiv 2407.20272.

    Attributes:
        exit_policy: ``none`` (all layers), ``batch`` (decode rows leave together when all are
            confident), ``token`` (each row leaves on its own; the batch is compacted).
        exit_layers: exit points as layer counts, each in 1..L-1, increasing.
        exit_head: ``shared`` (final norm + LM head), ``adapter``, ``mlp`` or ``untied`` (need exit_heads).
        confidence: ``softmax``, ``margin``, ``entropy``, ``saturation`` or ``classifier``.
        threshold: one global threshold, or one per exit layer. For ``entropy`` a token exits when
            entropy (nats) <= threshold; for the others when confidence >= threshold.
        kv_fill: ``propagate`` or ``recompute`` (KV of skipped layers).
        exit_heads: folder with exit_heads.safetensors + exit_config.json, or None.
        min_exit_layer: exits below this layer count are never taken.
        vocab_prune_k: for softmax/margin/entropy, score only the top-K ids of the first exit
            point at later exit points (arXiv 2410.18952); 0 = full vocabulary everywhere.
        max_exit_batch: exit points are checked only in steps with at most this many decode rows;
            larger steps run all layers and pay no check. 0 = always check; None (default) =
            ``exit_batch_limit``'s choice for the device: 1 on CPUs with ``recompute``, else 0.
        verify_exits: treat every early-exit token as a draft and verify it with the full-depth
            prediction of its position, which ``recompute`` computes in the sequence's next pass
            anyway (self-speculative decoding with a draft from the exit head, as LayerSkip,
            Elhoushi et al. 2024, arXiv 2404.16710, section 4). A draft that the full model would
            not have picked is replaced and the tokens computed after it are discarded, so the
            output is the full-depth output, token for token, greedy or sampled (sampling noise
            is keyed by the request's seed and the token's index). Needs ``kv_fill='recompute'``.
        max_draft_tokens: with ``verify_exits``, the most unverified drafts a sequence may hold: a
            row whose sequence holds this many runs all layers and verifies them. A long chain
            costs more when its first draft is wrong (every row after it is discarded, and the
            pending rows ride the verifying step; docs/benchmarks.md). 0 = no limit.
    """

    exit_policy: str = "none"
    exit_layers: tuple[int, ...] = ()
    exit_head: str = "shared"
    confidence: str = "softmax"
    threshold: float | tuple[float, ...] = 0.9
    kv_fill: str = "propagate"
    exit_heads: str | None = None
    min_exit_layer: int = 1
    vocab_prune_k: int = 0
    max_exit_batch: int | None = None
    verify_exits: bool = False
    max_draft_tokens: int = 1

    def __post_init__(self) -> None:
        for name, allowed in (("exit_policy", EXIT_POLICIES), ("exit_head", EXIT_HEAD_TYPES),
                              ("confidence", CONFIDENCE_MEASURES), ("kv_fill", KV_FILLS)):
            v = getattr(self, name)
            _require(isinstance(v, str) and v in allowed, name, f"one of {', '.join(allowed)}", v)
        layers = self.exit_layers
        _require(
            isinstance(layers, (list, tuple)) and all(is_int(e) and e >= 1 for e in layers)
            and list(layers) == sorted(set(layers)),
            "exit_layers", "strictly increasing layer counts >= 1", layers,
        )
        layers = tuple(int(e) for e in layers)
        object.__setattr__(self, "exit_layers", layers)
        self._check_threshold()
        _require(self.exit_heads is None or isinstance(self.exit_heads, str), "exit_heads",
                 "None or the path of a folder with exit_heads.safetensors and exit_config.json", self.exit_heads)
        _require(is_int(self.min_exit_layer) and self.min_exit_layer >= 1, "min_exit_layer", "an integer >= 1",
                 self.min_exit_layer)
        _require(is_int(self.vocab_prune_k) and self.vocab_prune_k >= 0, "vocab_prune_k", "an integer >= 0",
                 self.vocab_prune_k)
        _require(self.max_exit_batch is None or (is_int(self.max_exit_batch) and self.max_exit_batch >= 0),
                 "max_exit_batch", "an integer >= 0 (0 = no limit) or None (the device's default)", self.max_exit_batch)
        if self.exit_policy != "none":
            _require(len(layers) > 0, "exit_layers", "non-empty when exit_policy is not none", layers)
            _require(self.min_exit_layer <= layers[-1], "min_exit_layer",
                     f"<= the last exit layer ({layers[-1]}), or no exit point is left", self.min_exit_layer)
        _require(isinstance(self.verify_exits, bool), "verify_exits", "True or False", self.verify_exits)
        _require(is_int(self.max_draft_tokens) and self.max_draft_tokens >= 0, "max_draft_tokens",
                 "an integer >= 0 (0 = no limit)", self.max_draft_tokens)
        if self.verify_exits and self.kv_fill != "recompute":
            raise ValueError(
                f"verify_exits must be used with kv_fill 'recompute' (an exit is verified by the deferred pass "
                f"over its skipped layers), got kv_fill {self.kv_fill!r}: set kv_fill='recompute' (--kv-fill recompute)"
            )

    def _check_threshold(self) -> None:
        """One number, or one per exit layer, each in the confidence measure's range."""
        t, layers = self.threshold, self.exit_layers
        if isinstance(t, (list, tuple)) and len(t) == 1:
            t = t[0]
        if not isinstance(t, (list, tuple)):
            object.__setattr__(self, "threshold", check_threshold(self.confidence, t))
            return
        _require(len(layers) > 0, "threshold", "one number when no exit_layers are given", t)
        _require(
            len(t) == len(layers),
            "threshold", f"one number or {len(layers)} numbers (one per exit layer)" if len(layers) > 1
            else "one number (there is one exit layer)", t,
        )
        object.__setattr__(self, "threshold", tuple(check_threshold(self.confidence, v) for v in t))

    def check_model(self, num_layers: int) -> None:
        """Check the exit points against a model of ``num_layers`` decoder layers.

        ``min_exit_layer`` needs no check here: ``__post_init__`` keeps it at most the last exit layer.

        Raises:
            ValueError: an exit layer outside 1..num_layers-1.
        """
        top = num_layers - 1
        bad = [e for e in self.exit_layers if not 1 <= e <= top]
        _require(not bad, "exit_layers", f"in 1..{top} for this {num_layers}-layer model", list(bad))

    @property
    def enabled(self) -> bool:
        return self.exit_policy != "none" and len(self.exit_layers) > 0

    def exit_batch_limit(self, device_type: str) -> int:
        """``max_exit_batch``, with None resolved for a device type (``cpu``, ``cuda``, ...).

        With ``recompute`` a token's skipped layers run in the next step as an extra row, so an
        exit saves time only where an extra row is nearly free. On a CPU that holds for one
        sequence (its row is padded to two anyway) but not from two rows up, where a step costs
        about in proportion to its rows: measured on the 2-core development machine, early exit
        ran 1.08-1.15x the full-depth speed for one request and 0.90-0.91x for 2-8
        (docs/benchmarks.md, interleaved pairs). So None means 1 on CPUs with ``recompute``, and
        no limit otherwise (``propagate`` saves the FLOPs; a GPU decode step is memory-bound).
        """
        if self.max_exit_batch is not None:
            return self.max_exit_batch
        return 1 if device_type == "cpu" and self.kv_fill == "recompute" else 0

    def threshold_at(self, index: int) -> float:
        """Threshold of the exit point ``exit_layers[index]``."""
        if isinstance(self.threshold, tuple):
            return self.threshold[index]
        return float(self.threshold)


@dataclass(frozen=True)
class EngineConfig:
    """Everything an ``LLMEngine`` needs."""

    model: ModelConfig = field(default_factory=ModelConfig)
    cache: CacheConfig = field(default_factory=CacheConfig)
    scheduler: SchedulerConfig = field(default_factory=SchedulerConfig)
    early_exit: EarlyExitConfig = field(default_factory=EarlyExitConfig)
