"""Engine, early-exit and sampling flags shared by every ``eeserve`` subcommand (vLLM's names)."""

from __future__ import annotations

import argparse
import os
import sys

from eeserve.config import (
    CONFIDENCE_MEASURES,
    EXIT_HEAD_TYPES,
    EXIT_POLICIES,
    KV_FILLS,
    MODEL_DTYPES,
    CacheConfig,
    EngineConfig,
    ModelConfig,
    SchedulerConfig,
)
from eeserve.sampling_params import SamplingParams


def _int_list(text: str) -> tuple[int, ...]:
    try:
        return tuple(int(x) for x in text.split(",") if x.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers such as 8,16,24, got {text!r}")


def _float_list(text: str) -> tuple[float, ...]:
    try:
        return tuple(float(x) for x in text.split(",") if x.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number or comma-separated numbers, got {text!r}")


def _int_at_least(minimum: int):
    """An argparse type: an integer >= ``minimum``."""

    def parse(text: str) -> int:
        try:
            v = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer >= {minimum}, got {text!r}") from None
        if v < minimum:
            raise argparse.ArgumentTypeError(f"expected an integer >= {minimum}, got {v}")
        return v

    return parse


def _float_in(low: float, high: float, low_open: bool = True, high_open: bool = True):
    """An argparse type: a float in the interval (low, high), ends closed where asked."""
    lo, hi = "(" if low_open else "[", ")" if high_open else "]"

    def parse(text: str) -> float:
        try:
            v = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a number in {lo}{low}, {high}{hi}, got {text!r}") from None
        if (v <= low if low_open else v < low) or (v >= high if high_open else v > high):
            raise argparse.ArgumentTypeError(f"expected a number in {lo}{low}, {high}{hi}, got {v}")
        return v

    return parse


def port_number(text: str) -> int:
    """An argparse type: a TCP port, 1..65535."""
    try:
        v = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a TCP port number in 1..65535, got {text!r}") from None
    if not 1 <= v <= 65535:
        raise argparse.ArgumentTypeError(f"expected a TCP port number in 1..65535, got {v}")
    return v


def default_threads() -> int:
    """The CPUs this process may run on (``os.sched_getaffinity``; ``os.cpu_count`` where absent)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not Linux
        return max(1, os.cpu_count() or 1)


def add_threads_arg(p: argparse.ArgumentParser) -> None:
    """``--threads N``: torch's intra-op threads, set once at start-up (``apply_threads``)."""
    p.add_argument(
        "--threads", type=_int_at_least(1), default=None,
        help=f"CPU threads for torch (default: the CPUs this process may use, {default_threads()} here); "
             "lower it when other work shares the machine",
    )


def apply_threads(a: argparse.Namespace) -> int | None:
    """Set torch's thread count from ``--threads`` (or its default) once, before any model work.

    torch is not imported for it (a command refused before its model loads stays fast): before
    torch's import the count goes to ``OMP_NUM_THREADS``, which torch reads when it starts;
    after it, to ``torch.set_num_threads``.

    Returns:
        The count set, or None for a command without ``--threads``.
    """
    if not hasattr(a, "threads"):
        return None
    n = a.threads if a.threads is not None else default_threads()
    torch = sys.modules.get("torch")
    if torch is not None:
        torch.set_num_threads(n)
    else:
        os.environ["OMP_NUM_THREADS"] = str(n)
    return n


def _bytes(text: str) -> int:
    units = {"k": 1 << 10, "m": 1 << 20, "g": 1 << 30}
    t = text.strip().lower().removesuffix("ib").removesuffix("b")
    try:
        if t and t[-1] in units:
            return int(float(t[:-1]) * units[t[-1]])
        return int(float(t))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a byte count such as 512M or 2G, got {text!r}")


def add_engine_args(p: argparse.ArgumentParser, model_positional: bool = False) -> None:
    """Model, cache, scheduler and early-exit flags."""
    g = p.add_argument_group("model and engine")
    if model_positional:
        g.add_argument("model_pos", nargs="?", metavar="MODEL", help="same as --model")
    g.add_argument("--model", default=None,
                   help="alias (smollm2-135m, the default), a .gguf file, or a Hugging Face model folder")
    g.add_argument("--dtype", default="auto", choices=MODEL_DTYPES,
                   help="weight dtype; auto (default): bfloat16 where the CPU has AMX/AVX512-BF16 and bf16 products "
                        "measure faster, else float32 (on CPUs activations and KV cache stay float32)")
    g.add_argument("--quantization", default=None, choices=["int8"],
                   help="weight-only int8 products (one scale per output row), CPU only (default: none)")
    g.add_argument("--kernel-tuning", action=argparse.BooleanOptionalAction, default=True,
                   help="time the matrix-product forms once per machine (cached) and use the fastest (default on)")
    g.add_argument("--device", default="cpu", help="torch device: cpu (default), cuda, cuda:N")
    g.add_argument("--max-model-len", type=int, default=None, help="context length in tokens (default: the model's)")
    g.add_argument("--block-size", type=int, default=16, help="token slots per KV cache block (default 16)")
    g.add_argument("--num-kv-blocks", type=int, default=None, help="number of KV cache blocks (overrides --kv-cache-memory)")
    g.add_argument("--kv-cache-memory", type=_bytes, default=None,
                   help="KV cache budget in bytes, e.g. 512M or 2G (default: enough for max-num-seqs contexts, at most 1G)")
    g.add_argument("--max-num-seqs", type=int, default=32, help="most sequences in one step (default 32)")
    g.add_argument("--max-num-batched-tokens", type=int, default=512,
                   help="most tokens in one step; longer prompts are prefilled in chunks (default 512)")
    g.add_argument("--seed", type=int, default=0, help="seed for requests without their own seed (default 0)")

    e = p.add_argument_group("early exit")
    e.add_argument("--exit-policy", default=None, choices=EXIT_POLICIES,
                   help="none: all layers; batch: decode rows leave together when all are confident (Miao et al. 2024); "
                        "token: each sequence leaves on its own, the batch is compacted (default: the model's exit config, else none)")
    e.add_argument("--exit-layers", type=_int_list, default=None, help="exit points as layer counts, e.g. 12,16,20,24")
    e.add_argument("--exit-head", default=None, choices=EXIT_HEAD_TYPES, help="exit head type (default shared, or the heads folder's)")
    e.add_argument("--confidence", default=None, choices=CONFIDENCE_MEASURES,
                   help="confidence measure (default: the model's exit config, else softmax)")
    e.add_argument("--threshold", type=_float_list, default=None,
                   help="confidence threshold, one global value or one per exit layer (entropy: exit when <= threshold)")
    e.add_argument("--kv-fill", default=None, choices=KV_FILLS,
                   help="KV of skipped layers: propagate or recompute (default: the model's exit config, else propagate)")
    e.add_argument("--exit-heads", default=None,
                   help="folder with exit_heads.safetensors + exit_config.json; 'none' turns off the model's shipped heads")
    e.add_argument("--min-exit-layer", type=int, default=None, help="never exit before this many layers")
    e.add_argument("--vocab-prune-k", type=int, default=None,
                   help="score only the top-K ids of the first exit at later exits (softmax/margin/entropy); 0 = off")
    e.add_argument("--max-exit-batch", type=_int_at_least(0), default=None,
                   help="check exits only in steps with at most this many decode rows; 0 = always "
                        "(default: 1 on CPU with --kv-fill recompute, where larger steps gain nothing, else 0)")
    e.add_argument("--verify-exits", action=argparse.BooleanOptionalAction, default=None,
                   help="verify each early-exit token with its full-depth prediction (computed in the next step with "
                        "--kv-fill recompute) and replace it when they differ: output equal to full depth "
                        "(default: the model's exit config, else off)")
    e.add_argument("--max-draft-tokens", type=_int_at_least(0), default=None,
                   help="with --verify-exits: most unverified early-exit tokens per sequence before a full-depth "
                        "step verifies them; 0 = any number (default: the model's exit config, else 1)")


def add_sampling_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("sampling")
    g.add_argument("--max-tokens", type=int, default=128, help="most tokens to generate (default 128)")
    g.add_argument("--min-tokens", type=int, default=0, help="generate at least this many tokens")
    g.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default), higher = more random")
    g.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling mass in (0, 1]")
    g.add_argument("--top-k", type=int, default=0, help="keep the K most likely tokens; 0 = off")
    g.add_argument("--min-p", type=float, default=0.0, help="drop tokens below min-p x the top probability")
    g.add_argument("--repetition-penalty", type=float, default=1.0)
    g.add_argument("--presence-penalty", type=float, default=0.0)
    g.add_argument("--frequency-penalty", type=float, default=0.0)
    g.add_argument("--sampling-seed", type=int, default=None, help="per-request seed (same seed, same output)")
    g.add_argument("--n", type=int, default=1, help="completions per prompt")
    g.add_argument("--stop", action="append", default=[], help="stop string (repeatable)")
    g.add_argument("--ignore-eos", action="store_true", help="keep generating past the end-of-sequence token")
    g.add_argument("--logprobs", type=int, default=None, help="return the top-N logprobs of each token")


# Config fields whose flag is not simply ``--`` + the field name with dashes.
_FLAG_OF_FIELD = {"SamplingParams.seed": "--sampling-seed", "exit_head": "--exit-head"}


def _with_flag(e: ValueError) -> ValueError:
    """Put the flag in front of a config error that starts with its field name, so the user
    sees ``--top-p: SamplingParams.top_p must be ...`` rather than only the Python name."""
    msg = str(e)
    field_name = msg.split(" ", 1)[0]
    if not field_name or not field_name.replace("_", "").replace(".", "").isalnum() or " must " not in msg:
        return e
    flag = _FLAG_OF_FIELD.get(field_name) or "--" + field_name.rsplit(".", 1)[-1].replace("_", "-")
    return ValueError(f"{flag}: {msg}")


def sampling_params_from_args(a: argparse.Namespace) -> SamplingParams:
    """Raises ValueError naming the flag and the field."""
    try:
        return SamplingParams(
            n=a.n, temperature=a.temperature, top_p=a.top_p, top_k=a.top_k, min_p=a.min_p, seed=a.sampling_seed,
            presence_penalty=a.presence_penalty, frequency_penalty=a.frequency_penalty,
            repetition_penalty=a.repetition_penalty, max_tokens=a.max_tokens, min_tokens=a.min_tokens,
            stop=list(a.stop), ignore_eos=a.ignore_eos, logprobs=a.logprobs,
        )
    except ValueError as e:
        raise _with_flag(e) from None


def early_exit_overrides(a: argparse.Namespace) -> dict:
    """The early-exit flags the user set (None ones are left to the model's exit config)."""
    names = ("exit_policy", "exit_layers", "exit_head", "confidence", "threshold", "kv_fill",
             "exit_heads", "min_exit_layer", "vocab_prune_k", "max_exit_batch", "verify_exits", "max_draft_tokens")
    out = {n: getattr(a, n) for n in names if getattr(a, n, None) is not None}
    if "threshold" in out and len(out["threshold"]) == 1:
        out["threshold"] = out["threshold"][0]
    return out


def engine_config_from_args(a: argparse.Namespace) -> EngineConfig:
    """Build the frozen EngineConfig; raises ValueError naming the bad flag and field."""
    model = getattr(a, "model_pos", None) or a.model or "smollm2-135m"
    from eeserve.early_exit.defaults import resolve_early_exit

    try:
        return EngineConfig(
            model=ModelConfig(model=model, dtype=a.dtype, device=a.device, max_model_len=a.max_model_len, seed=a.seed,
                              kernel_tuning=a.kernel_tuning, quantization=a.quantization),
            cache=CacheConfig(block_size=a.block_size, num_kv_blocks=a.num_kv_blocks, kv_cache_memory=a.kv_cache_memory),
            scheduler=SchedulerConfig(max_num_seqs=a.max_num_seqs, max_num_batched_tokens=a.max_num_batched_tokens),
            early_exit=resolve_early_exit(model, early_exit_overrides(a)),
        )
    except ValueError as e:
        raise _with_flag(e) from None

