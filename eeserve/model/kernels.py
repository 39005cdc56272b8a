"""Matrix-product kernels chosen by measurement on the machine that runs them.

Every product of the model, ``x @ W^T`` with ``W`` stored ``[out, in]``, can run in several
forms whose speed depends on the CPU, its BLAS and the row count (docs/benchmarks.md: on one AMD
EPYC ``W @ x^T`` with one row padded to two was fastest, on an Intel Xeon the same padding
tripled the cost). So nothing is assumed: ``tune`` times each candidate form for each weight
shape and bucketed row count the engine runs, and ``linear`` runs the winner.

Forms (``FORMS``):

- ``f_linear``: ``F.linear(x, W)``.
- ``w_xt``: ``(W @ x^T)^T``, the weight as the left operand (the old hard-coded rule, with its
  row padding, is this form at some buckets).
- ``x_wt``: ``x @ W_t`` on a pre-transposed contiguous copy ``[in, out]``.
- ``onednn``: oneDNN's inner product on a weight reordered once into its blocked layout
  (``torch.ops.mkldnn._reorder_linear_weight``, what inductor's weight freezing uses).

Each form may also compute more rows than asked (zero rows appended, ``Choice.rows``): some
BLAS paths are slow at odd column counts. All forms compute in the weight's dtype with fp32
accumulation; they agree with ``F.linear`` to fp32 rounding (tests/test_kernels.py).

The choice of a machine (``KernelPlan``) is cached as JSON in ``<cache_dir>/kernels.json``
together with the machine's identity (``machine_identity``: CPU model, family/model numbers,
the flags that matter, torch version, threads). A cache whose identity differs is refused and
re-measured. The plan in use is process-wide (``install``), like torch's own backend flags: it
describes the CPU, not one model. The extra layouts (transposed or reordered copies) belong to
their weight and are freed with it.
"""

from __future__ import annotations

import bisect
import json
import logging
import os
import platform
import time
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.utils.weak import WeakIdKeyDictionary

logger = logging.getLogger(__name__)

FORMS = ("f_linear", "w_xt", "x_wt", "onednn")
AUX_FORMS = ("x_wt", "onednn")  # forms that need a copy of the weight in their own layout
# Row counts tuned; a product of m rows uses the choice of the smallest bucket >= m (the largest
# bucket above it). Up to PAD_LIMIT rows the m rows are padded to the bucket (its measured cost:
# memory-bound, padding is free); above it they run unpadded with the bucket's form.
ROW_BUCKETS = (1, 2, 3, 4, 6, 8, 12, 16, 32, 64, 128, 256)
PAD_LIMIT = 16
CACHE_VERSION = 1
CACHE_FILE = "kernels.json"
# Weights are copied until their bytes exceed this, so that timing streams them from memory as a
# decode step does (the L3 caches of these machines hold 32 MB).
STREAM_BYTES = 48 << 20
MAX_RETRIES = 4  # extra passes where every candidate missed a sane bound (a busy machine)
CPU_FLAGS = ("avx2", "avx512f", "avx512_bf16", "avx512_vnni", "amx_bf16", "amx_int8", "amx_tile")


def onednn_available() -> bool:
    """True when torch was built with oneDNN and its prepacked linear ops exist."""
    return (
        torch.backends.mkldnn.is_available()
        and hasattr(torch.ops.mkldnn, "_reorder_linear_weight")
        and hasattr(torch.ops.mkldnn, "_linear_pointwise")
    )


def _cpuinfo() -> dict[str, str]:
    info: dict[str, str] = {}
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if not line.strip():
                    break  # the first processor's block is enough
                key, _, value = line.partition(":")
                info[key.strip()] = value.strip()
    except OSError:
        pass
    return info


def cpu_flags() -> frozenset[str]:
    """The CPU's feature flags from /proc/cpuinfo (empty where there is none)."""
    return frozenset(_cpuinfo().get("flags", "").split())


def has_bf16_hardware() -> bool:
    """True where the CPU has AMX-BF16 or AVX512-BF16 instructions."""
    flags = cpu_flags()
    return "amx_bf16" in flags or "avx512_bf16" in flags


def machine_identity() -> dict:
    """What a kernel measurement depends on: CPU model, family/model/stepping, relevant flags,
    torch version, threads. A cached plan is used only on a machine with the same identity."""
    info = _cpuinfo()
    flags = set(info.get("flags", "").split())
    return {
        "cpu": info.get("model name") or platform.processor() or platform.machine(),
        "cpu_family": info.get("cpu family", ""),
        "cpu_model": info.get("model", ""),
        "stepping": info.get("stepping", ""),
        "flags": sorted(f for f in CPU_FLAGS if f in flags),
        "torch": torch.__version__,
        "onednn": onednn_available(),
        "threads": torch.get_num_threads(),
    }


@dataclass(frozen=True)
class Choice:
    """How products of one weight shape run at one row bucket.

    Attributes:
        form: one of ``FORMS``.
        rows: rows computed (>= the bucket; more means zero rows are appended).
        us: measured time of one product in microseconds (0 for an unmeasured default).
    """

    form: str
    rows: int
    us: float = 0.0


def shape_key(out_features: int, in_features: int, dtype: torch.dtype) -> str:
    """``"960x576:float32"``: the key of a weight ``[out, in]`` in a plan."""
    return f"{out_features}x{in_features}:{str(dtype).removeprefix('torch.')}"


def bucket_index(m: int) -> int:
    """Index into ``ROW_BUCKETS`` of the bucket serving ``m`` rows (m >= 1)."""
    return min(bisect.bisect_left(ROW_BUCKETS, m), len(ROW_BUCKETS) - 1)


def legacy_choice(m: int) -> Choice:
    """The rule measured on one 2-core AMD EPYC (Zen 3) before tuning existed: ``W @ x^T`` up
    to 16 rows with 1, 3 and 7 rows padded by one and 9-15 padded to 16, ``F.linear`` above."""
    if m > 16:
        return Choice("f_linear", m)
    if m in (1, 3, 7):
        return Choice("w_xt", m + 1)
    if 8 < m < 16:
        return Choice("w_xt", 16)
    return Choice("w_xt", m)


@dataclass
class KernelPlan:
    """The measured choice per weight shape and row bucket on one machine.

    Attributes:
        identity: ``machine_identity()`` of the machine that measured it.
        choices: ``shape_key`` -> one ``Choice`` per entry of ``ROW_BUCKETS``.
        timings: ``shape_key`` -> bucket (as text) -> {"form@rows": microseconds} of every
            candidate that survived the first pass.
        fallback: dtype name -> one ``Choice`` per ``ROW_BUCKETS`` entry for weights the plan has
            no entry for (slices made at run time: no extra layout), least summed time over the
            measured shapes of that dtype.
        dtype_choices: model key -> ``DtypeChoice`` made by ``choose_dtype``.
    """

    identity: dict
    choices: dict[str, list[Choice]] = field(default_factory=dict)
    timings: dict[str, dict[str, dict[str, float]]] = field(default_factory=dict)
    fallback: dict[str, list[Choice]] = field(default_factory=dict)
    dtype_choices: dict[str, dict] = field(default_factory=dict)

    def _fallback(self, dtype: torch.dtype, b: int) -> Choice:
        per = self.fallback.get(str(dtype).removeprefix("torch."))
        return per[b] if per else legacy_choice(ROW_BUCKETS[b])

    def choice(self, weight: torch.Tensor, m: int) -> Choice:
        """The choice for ``m`` rows times ``weight`` [out, in], its rows adapted to ``m``."""
        b = bucket_index(m)
        per = self.choices.get(shape_key(weight.shape[0], weight.shape[1], weight.dtype))
        c = per[b] if per is not None else self._fallback(weight.dtype, b)
        if c.form in AUX_FORMS and c.form not in _AUX.get(weight, ()):
            c = self._fallback(weight.dtype, b)  # a weight that was never prepared
        if m > PAD_LIMIT or m > c.rows:
            return Choice(c.form, m, c.us)
        return c

    def to_json(self) -> dict:
        return {
            "version": CACHE_VERSION,
            "identity": self.identity,
            "choices": {k: [asdict(c) for c in v] for k, v in self.choices.items()},
            "timings": self.timings,
            "fallback": {k: [asdict(c) for c in v] for k, v in self.fallback.items()},
            "dtype_choices": self.dtype_choices,
        }

    @classmethod
    def from_json(cls, obj: dict) -> KernelPlan:
        """Raises ValueError for a file of another format version, KeyError/TypeError for a
        malformed one."""
        if obj.get("version") != CACHE_VERSION:
            raise ValueError(f"kernel cache version {obj.get('version')!r}, expected {CACHE_VERSION}")
        for v in obj["choices"].values():
            for c in v:
                if c["form"] not in FORMS:
                    raise ValueError(f"unknown kernel form {c['form']!r}")
        return cls(
            identity=obj["identity"],
            choices={k: [Choice(**c) for c in v] for k, v in obj["choices"].items()},
            timings=obj.get("timings") or {},
            fallback={k: [Choice(**c) for c in v] for k, v in (obj.get("fallback") or {}).items()},
            dtype_choices=obj.get("dtype_choices") or {},
        )


# ---- the process-wide plan and the weights' extra layouts -------------------------------------

_AUX: WeakIdKeyDictionary = WeakIdKeyDictionary()  # weight -> {form: tensor in that form's layout}
_PLAN: KernelPlan | None = None  # None: the legacy rule (no tuning)


def install(plan: KernelPlan | None) -> None:
    """Make ``plan`` the one ``linear`` follows (None: the legacy rule)."""
    global _PLAN
    _PLAN = plan


def active_plan() -> KernelPlan | None:
    return _PLAN


def _aux_tensor(weight: torch.Tensor, form: str) -> torch.Tensor:
    if form == "x_wt":
        return weight.t().contiguous()  # [in, out]
    if form == "onednn":
        return torch.ops.mkldnn._reorder_linear_weight(weight.detach())
    raise ValueError(f"form {form!r} needs no extra layout")


def prepare(weights: Iterable[torch.Tensor], plan: KernelPlan) -> int:
    """Build the extra layouts that ``plan`` chooses for these weights (once per weight).

    Returns:
        bytes allocated for the new layouts.
    """
    new = 0
    for w in weights:
        per = plan.choices.get(shape_key(w.shape[0], w.shape[1], w.dtype))
        if per is None or w.device.type != "cpu":
            continue
        have = _AUX.setdefault(w, {})
        for form in {c.form for c in per} & set(AUX_FORMS):
            if form not in have:
                have[form] = _aux_tensor(w, form)
                new += w.numel() * w.element_size()
    return new


def run_form(x: torch.Tensor, weight: torch.Tensor, form: str, rows: int, aux: torch.Tensor | None = None) -> torch.Tensor:
    """``x @ weight^T`` in ``form``, computing ``rows`` >= M rows. x: [M, in] (weight's dtype),
    weight: [out, in], aux: the form's layout of ``weight`` where it needs one. -> [M, out]."""
    m = x.shape[0]
    if rows > m:
        x = torch.cat([x, x.new_zeros(rows - m, x.shape[1])])
    if form == "f_linear":
        y = F.linear(x, weight)
    elif form == "w_xt":
        y = (weight @ x.t()).t()
    elif form == "x_wt":
        y = x @ aux
    elif form == "onednn":
        y = torch.ops.mkldnn._linear_pointwise(x, aux, None, "none", [], "")
    else:
        raise ValueError(f"form must be one of {', '.join(FORMS)}, got {form!r}")
    if rows > m:
        y = y[:m]
    return y.contiguous()


QUANTIZATIONS = ("int8",)


def quantize_int8(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Weight-only int8 with one scale per output row (symmetric, round to nearest).

    Returns:
        (q [out, in] int8, scales [out] in the weight's dtype), ``q * scales[:, None] ~ weight``.
    """
    w = weight.detach().float()
    scales = (w.abs().amax(dim=1) / 127.0).clamp(min=1e-12)  # [out]
    q = torch.round(w / scales[:, None]).clamp(-127, 127).to(torch.int8)
    return q, scales.to(weight.dtype)


def quantize(weights: Iterable[torch.Tensor], method: str) -> int:
    """Give these weights a quantized copy that ``linear`` then uses instead of the weight itself
    (``torch.ops.aten._weight_int8pack_mm``: int8 weights, activations in the weight's dtype).
    The dense weight stays (the embedding, KV fill and exit heads read it).

    Returns:
        bytes of the quantized copies.

    Raises:
        ValueError: ``method`` is not one of ``QUANTIZATIONS``.
    """
    if method not in QUANTIZATIONS:
        raise ValueError(f"quantization must be one of {', '.join(QUANTIZATIONS)}, got {method!r}")
    total = 0
    for w in weights:
        have = _AUX.setdefault(w, {})
        if "int8" not in have:
            have["int8"] = quantize_int8(w)
            total += w.numel() + w.shape[0] * w.element_size()
    return total


def linear(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """``x @ weight^T``: [M, in] x [out, in] -> [M, out] in x's dtype, contiguous.

    On CPUs a weight given an int8 copy by ``quantize`` runs on it; otherwise the form is the
    installed plan's choice for this weight shape and row count (the legacy rule without a plan); the product runs in the weight's dtype (x is cast to it, fp32
    accumulation) and the result is cast back to x's dtype. Elsewhere ``F.linear``.
    """
    if x.device.type != "cpu":
        return F.linear(x.to(weight.dtype), weight).to(x.dtype)
    in_dtype = x.dtype
    if in_dtype != weight.dtype:
        x = x.to(weight.dtype)
    m = x.shape[0]
    if m == 0:
        return x.new_zeros(0, weight.shape[0]).to(in_dtype)
    own = _AUX.get(weight)
    if own is not None and "int8" in own:  # a quantized weight (``quantize``)
        q, scales = own["int8"]
        y = torch.ops.aten._weight_int8pack_mm(x.contiguous(), q, scales)
        return y if y.dtype == in_dtype else y.to(in_dtype)
    plan = _PLAN
    if plan is None:
        c = legacy_choice(m)
        aux = None
    else:
        c = plan.choice(weight, m)
        aux = _AUX[weight][c.form] if c.form in AUX_FORMS else None
    y = run_form(x, weight, c.form, max(c.rows, m), aux)
    return y if y.dtype == in_dtype else y.to(in_dtype)


# ---- measuring ---------------------------------------------------------------------------------


def candidates(bucket: int) -> list[tuple[str, int]]:
    """(form, rows) pairs timed at ``bucket`` rows: each available form unpadded; below
    ``PAD_LIMIT`` rows the BLAS forms also padded to the next bucket (their slow paths at odd
    column counts); from 128 rows on, where every form is compute-bound, only ``f_linear`` and
    ``onednn``."""
    forms = [f for f in FORMS if f != "onednn" or onednn_available()]
    if bucket >= 128:
        forms = [f for f in forms if f in ("f_linear", "onednn")]
    out = [(f, bucket) for f in forms]
    i = ROW_BUCKETS.index(bucket)
    if bucket < PAD_LIMIT:
        out += [(f, ROW_BUCKETS[i + 1]) for f in ("f_linear", "w_xt")]
    return out


def _low(ts: list[float]) -> float:
    """The least: on a shared machine other processes only ever add time (a thread descheduled
    mid-product stalls the other for a whole time slice, 4-20 ms), so the low end is the
    kernel's own cost. The copies cycle, so even the least streams its weight from memory."""
    return min(ts)


def measure_shape(
    out_features: int, in_features: int, dtype: torch.dtype, buckets: Iterable[int] = ROW_BUCKETS, reps: int = 2,
    samples: int = 3,
) -> tuple[list[Choice], dict[int, dict[str, float]]]:
    """Time every candidate for a random weight ``[out, in]`` of ``dtype``.

    Calls cycle through copies of the weight (``STREAM_BYTES`` in all), so that each call finds
    its weight out of cache, as a decode step does. Each of ``reps`` passes makes ``samples``
    calls per candidate, interleaved call by call across candidates; each call is timed on its
    own and a candidate's time is its least (``_low``). After a clean first pass candidates over
    1.5x the best are dropped. Where even the best misses a generous bound (2 GB/s, 5 GFLOP/s),
    every thread was stalled by other processes: up to ``MAX_RETRIES`` more passes are made.

    Returns:
        (the fastest ``Choice`` per bucket, bucket -> {"form@rows": microseconds}).
    """
    g = torch.Generator().manual_seed(0)
    nbytes = out_features * in_features * torch.tensor([], dtype=dtype).element_size()
    n = max(1, min(64, -(-STREAM_BYTES // nbytes)))
    ws = [(torch.randn(out_features, in_features, generator=g) * in_features**-0.5).to(dtype) for _ in range(n)]
    aux: dict[str, list[torch.Tensor]] = {}
    best: list[Choice] = []
    report: dict[int, dict[str, float]] = {}
    j = 0  # copy counter, shared by all candidates
    for bucket in buckets:
        cands = candidates(bucket)
        for f, _ in cands:
            if f in AUX_FORMS and f not in aux:
                aux[f] = [_aux_tensor(w, f) for w in ws]
        x = torch.randn(bucket, in_features, generator=g).to(dtype)
        times: dict[tuple[str, int], list[float]] = {c: [] for c in cands}
        for f, r in cands:  # warm-up: primitive creation, first touch of the layouts
            run_form(x, ws[0], f, r, aux[f][0] if f in aux else None)
        # a bound no sane kernel misses: 2 GB/s for the weight, 5 GFLOP/s for the arithmetic, and
        # 1 ms for a tiny product (a stalled thread costs a 4-20 ms time slice)
        bound = max(nbytes / 2e9, 2.0 * bucket * out_features * in_features / 5e9, 1e-3)
        for rep in range(reps + MAX_RETRIES):
            if rep >= reps and min(_low(t) for t in times.values()) <= bound:
                break  # only a stalled measurement (a busy machine) is taken again
            for _ in range(samples):
                for f, r in times:
                    k = j % n
                    j += 1
                    t0 = time.perf_counter()
                    run_form(x, ws[k], f, r, aux[f][k] if f in aux else None)
                    times[(f, r)].append(time.perf_counter() - t0)
            fastest = min(_low(t) for t in times.values())
            if rep == 0 and fastest <= bound:  # prune on a clean first pass only
                times = {c: t for c, t in times.items() if _low(t) <= 1.5 * fastest}
        low = {c: _low(t) * 1e6 for c, t in times.items()}
        (f, r), us = min(low.items(), key=lambda kv: kv[1])
        best.append(Choice(f, r, round(us, 1)))
        report[bucket] = {f"{f}@{r}": round(v, 1) for (f, r), v in low.items()}
    return best, report


def _fallback(plan: KernelPlan, dtype_name: str) -> list[Choice]:
    """Per bucket, the no-extra-layout choice with the least summed time over the measured
    shapes of one dtype (the legacy rule where none survived the first pass)."""
    out = []
    for b in ROW_BUCKETS:
        total: dict[str, float] = {}
        for key, per_bucket in plan.timings.items():
            if not key.endswith(":" + dtype_name):
                continue
            for k, us in per_bucket.get(str(b), {}).items():
                if k.split("@")[0] not in AUX_FORMS:
                    total[k] = total.get(k, 0.0) + us
        if total:
            k = min(total, key=total.get)
            f, r = k.split("@")
            out.append(Choice(f, int(r), 0.0))
        else:
            out.append(legacy_choice(b))
    return out


def tune(shapes: Iterable[tuple[int, int, torch.dtype]], plan: KernelPlan | None = None, reps: int = 2) -> KernelPlan:
    """Measure ``shapes`` ([out, in], dtype) missing from ``plan`` (a new plan for this machine
    when None) and return the plan with them added."""
    plan = plan or KernelPlan(identity=machine_identity())
    t0 = time.perf_counter()
    todo = [s for s in dict.fromkeys(shapes) if shape_key(*s) not in plan.choices]
    for o, i, dt in todo:
        best, report = measure_shape(o, i, dt, reps=reps)
        plan.choices[shape_key(o, i, dt)] = best
        plan.timings[shape_key(o, i, dt)] = {str(b): v for b, v in report.items()}
    for name in {str(dt).removeprefix("torch.") for _, _, dt in todo}:
        plan.fallback[name] = _fallback(plan, name)
    if todo:
        logger.info("kernel tuning: %d weight shapes measured in %.1f s", len(todo), time.perf_counter() - t0)
    return plan


# ---- the cache -------------------------------------------------------------------------------


def cache_path(cache_dir: Path) -> Path:
    return Path(cache_dir) / CACHE_FILE


def load_cached(cache_dir: Path, identity: dict | None = None) -> tuple[KernelPlan | None, str]:
    """The cached plan if it was measured on a machine with this ``identity`` (default: this
    machine's).

    Returns:
        (plan or None, why: "" when used, else the reason it was refused).
    """
    path = cache_path(cache_dir)
    identity = identity or machine_identity()
    if not path.is_file():
        return None, "no cached kernel choice"
    try:
        plan = KernelPlan.from_json(json.loads(path.read_text(encoding="utf-8")))
    except (ValueError, KeyError, TypeError) as e:
        return None, f"unreadable kernel cache {path} ({e})"
    if plan.identity != identity:
        diff = sorted(k for k in set(plan.identity) | set(identity) if plan.identity.get(k) != identity.get(k))
        what = ", ".join(f"{k} {plan.identity.get(k)!r} -> {identity.get(k)!r}" for k in diff)
        return None, f"cached kernel choice was measured on another machine ({what})"
    return plan, ""


def save(plan: KernelPlan, cache_dir: Path) -> Path:
    """Write ``plan`` to the cache atomically; returns the file."""
    path = cache_path(cache_dir)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(f".tmp{os.getpid()}")
    tmp.write_text(json.dumps(plan.to_json(), indent=1), encoding="utf-8")
    os.replace(tmp, path)
    return path


def load_or_tune(shapes: Iterable[tuple[int, int, torch.dtype]], cache_dir: Path, retune: bool = False) -> tuple[KernelPlan, str]:
    """The plan for ``shapes`` on this machine: the cached one (measuring only shapes it lacks),
    or a new measurement where the cache is missing, from another machine or torch version, or
    ``retune`` is set. Saves the result.

    Returns:
        (plan, a one-line account of what was done, for the start-up log).
    """
    shapes = list(dict.fromkeys(shapes))
    plan, why = (None, "re-measuring on request") if retune else load_cached(cache_dir)
    missing = [s for s in shapes if plan is None or shape_key(*s) not in plan.choices]
    if not missing:
        return plan, f"kernel choice from {cache_path(cache_dir)}"
    t0 = time.perf_counter()
    plan = tune(missing, plan)
    save(plan, cache_dir)
    note = f"{why}; " if why else ""
    return plan, f"{note}measured {len(missing)} weight shapes in {time.perf_counter() - t0:.1f} s"


# ---- the dtype --------------------------------------------------------------------------------

# bf16 is chosen only where it is at least this much faster for a whole decode step, at one row
# and at 16 (its products round activations to bf16: a small loss of fidelity for the speed)
BF16_MIN_GAIN = 0.9


def step_us(plan: KernelPlan, shapes: Iterable[tuple[int, int, int]], dtype: torch.dtype, rows: int) -> float:
    """Measured time (us) of all products of one step at ``rows`` rows: ``shapes`` are (out, in,
    products per step), e.g. ``ModelArgs.linear_shapes()``."""
    b = bucket_index(rows)
    return sum(n * plan.choices[shape_key(o, i, dtype)][b].us for o, i, n in shapes)


def choose_dtype(plan: KernelPlan, shapes: list[tuple[int, int, int]], bf16_hardware: bool) -> tuple[str, str]:
    """``"bfloat16"`` where the CPU has bf16 instructions and bf16 products make a decode step at
    least ``1 / BF16_MIN_GAIN`` faster at 1 and at 16 rows, else ``"float32"``.

    Args:
        plan: holding float32 (and, with ``bf16_hardware``, bfloat16) timings of ``shapes``.
        shapes: (out, in, products per step).
        bf16_hardware: ``has_bf16_hardware()``.

    Returns:
        (dtype name, a one-line reason).
    """
    if not bf16_hardware:
        return "float32", "this CPU has no AMX-BF16 or AVX512-BF16"
    parts, wins = [], True
    for rows in (1, 16):
        f32, b16 = step_us(plan, shapes, torch.float32, rows), step_us(plan, shapes, torch.bfloat16, rows)
        parts.append(f"{rows} row{'s' if rows > 1 else ''}: fp32 {f32 / 1e3:.1f} ms, bf16 {b16 / 1e3:.1f} ms")
        wins = wins and b16 <= BF16_MIN_GAIN * f32
    reason = "measured products of a decode step, " + "; ".join(parts)
    return ("bfloat16" if wins else "float32"), reason


@dataclass(frozen=True)
class KernelSetup:
    """What ``setup_for_model`` decided.

    Attributes:
        plan: the plan to install (None: no tuning; the legacy rule).
        weight_dtype: dtype name of the model's matrices (``"float32"``, ``"bfloat16"``, ...).
        report: one line for the start-up log (the dtype, why, and where the kernels came from).
    """

    plan: KernelPlan | None
    weight_dtype: str
    report: str


def setup_for_model(shapes: list[tuple[int, int, int]], dtype: str, device: str, tuning: bool,
                    cache_dir: Path, retune: bool = False) -> KernelSetup:
    """Resolve ``dtype`` (``"auto"`` or a dtype name) and the kernel plan for a model.

    Args:
        shapes: the model's (out, in, products per step), ``ModelArgs.linear_shapes()``.
        dtype: the requested dtype; ``"auto"`` measures float32 against bfloat16 where the CPU has
            bf16 instructions (``choose_dtype``) and is float32 off the CPU.
        tuning: measure kernels (cached); False keeps the legacy rule (and auto means float32).
        cache_dir: where ``kernels.json`` lives.
    """
    if device != "cpu":
        wd = "float32" if dtype == "auto" else dtype
        return KernelSetup(None, wd, f"dtype {wd} (device {device}: F.linear)")
    if not tuning:
        wd = "float32" if dtype == "auto" else dtype
        return KernelSetup(None, wd, f"dtype {wd}; kernel tuning off (legacy rule)")
    bf16_hw = has_bf16_hardware()
    names = (["float32", "bfloat16"] if bf16_hw else ["float32"]) if dtype == "auto" else [dtype]
    want = [(o, i, getattr(torch, n)) for n in names for o, i, _ in shapes]
    plan, how = load_or_tune(want, cache_dir, retune=retune)
    if dtype != "auto":
        return KernelSetup(plan, dtype, f"dtype {dtype}; {how}")
    wd, why = choose_dtype(plan, shapes, bf16_hw)
    return KernelSetup(plan, wd, f"dtype auto -> {wd} ({why}); {how}")
