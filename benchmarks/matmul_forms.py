"""Which form of the fp32 matrix product streams a decoder's weights fastest on this device.

For the default model's weight shapes (fused q/k/v, o, fused gate/up, down, the LM head) and
batch sizes M = 1..32, it times one product per distinct weight (40 copies of each layer matrix,
so they stream from memory as in decode, not from cache) in three forms:

- ``x @ W_t``: the weight stored pre-transposed, ``[in, out]`` (eeserve's layout before 2026-11-29);
- ``F.linear``: the weight as ``[out, in]``, PyTorch's default form;
- ``W @ x^T``: the weight as ``[out, in]`` as the left operand, one row padded to two;
- ``linear`` (``eeserve.model.kernels.linear``) without a tuned plan installed: the legacy rule
  (``kernels.legacy_choice``: ``W @ x^T`` up to 16 rows with some row counts padded, else
  ``F.linear``). The engine now measures its forms per machine (``eeserve tune-kernels``).

It prints the median time per product (microseconds) and the speed-up of ``linear`` over
``x @ W_t``, checks the forms agree, and writes docs/matmul_forms.png. A second table adds the
products up to a whole decode step of the default model (30 layers of q/k/v, o, gate/up, down,
and the LM head) for ``W @ x^T`` and ``linear``: the effect of the padding.

    python benchmarks/matmul_forms.py                                     # about 1 min on 2 cores
    python benchmarks/matmul_forms.py --rows 1,2,3,4,5,6,7,8,9,10,11,12,13,14,15,16
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from eeserve.model.llama import linear

ROOT = Path(__file__).resolve().parent.parent
LAYERS = 30  # decoder layers of the default model
SHAPES = {"qkv": (576, 960), "o": (576, 576), "gate_up": (576, 3072), "down": (1536, 576), "lm_head": (576, 49152)}


def time_form(fn, x: torch.Tensor, weights: list[torch.Tensor], reps: int) -> float:
    """Median over ``reps`` passes of the mean time per product (us)."""
    for w in weights:
        fn(x, w)
    times = []
    for _ in range(reps):
        t = time.perf_counter()
        for w in weights:
            fn(x, w)
        times.append((time.perf_counter() - t) / len(weights) * 1e6)
    return statistics.median(times)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", default="1,2,4,8,16,32,64,256", help="batch sizes M")
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--out-dir", default=str(ROOT / "docs"))
    args = ap.parse_args()
    torch.manual_seed(0)
    rows = [int(m) for m in args.rows.split(",")]
    forms = {
        "x @ W_t": lambda x, w_t: x @ w_t,
        "F.linear": lambda x, w: F.linear(x, w),
        "W @ x^T": lambda x, w: (w @ (torch.cat([x, x]) if x.shape[0] == 1 else x).t())[:, : x.shape[0]].t().contiguous(),
        "linear": lambda x, w: linear(x, w),
    }
    results: dict[str, dict[int, dict[str, float]]] = {}
    print("| weight [in, out] | M | x @ W_t (us) | F.linear (us) | W @ x^T (us) | linear (us) | linear vs x @ W_t |")
    print("| --- | ---: | ---: | ---: | ---: | ---: | ---: |")
    for name, (k, n) in SHAPES.items():
        copies = 3 if name == "lm_head" else 40
        w_out_in = [torch.randn(n, k) for _ in range(copies)]
        w_in_out = [w.t().contiguous() for w in w_out_in]
        results[name] = {}
        for m in rows:
            x = torch.randn(m, k)
            ref = x @ w_in_out[0]
            for f in ("F.linear", "W @ x^T", "linear"):
                got = forms[f](x, w_out_in[0])
                torch.testing.assert_close(got, ref, rtol=1e-4, atol=1e-3)
            t = {"x @ W_t": time_form(forms["x @ W_t"], x, w_in_out, args.reps)}
            for f in ("F.linear", "W @ x^T", "linear"):
                t[f] = time_form(forms[f], x, w_out_in, args.reps)
            results[name][m] = t
            print(f"| {name} [{k}, {n}] | {m} | {t['x @ W_t']:.0f} | {t['F.linear']:.0f} | {t['W @ x^T']:.0f} | "
                  f"{t['linear']:.0f} | {t['x @ W_t'] / t['linear']:.2f}x |", flush=True)
    print("\n| M | decode step, W @ x^T (ms) | decode step, linear (ms) | linear vs W @ x^T |")
    print("| ---: | ---: | ---: | ---: |")
    for m in rows:
        step = {f: sum(results[name][m][f] * (1 if name == "lm_head" else LAYERS) for name in SHAPES) / 1e3
                for f in ("W @ x^T", "linear")}
        print(f"| {m} | {step['W @ x^T']:.1f} | {step['linear']:.1f} | {step['W @ x^T'] / step['linear']:.2f}x |")
    plot(results, rows, Path(args.out_dir))


def plot(results, rows, out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(results), figsize=(3.2 * len(results), 3.2), squeeze=False)
    for ax, (name, by_m) in zip(axes[0], results.items()):
        for form, style in (("x @ W_t", "o-"), ("F.linear", "s--"), ("W @ x^T", "d:"), ("linear", "^-")):
            ax.plot(rows, [by_m[m][form] for m in rows], style, label=form)
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_title(f"{name} {SHAPES[name]}", fontsize=9)
        ax.set_xlabel("rows M")
        ax.set_ylabel("us per product")
    axes[0][0].legend(fontsize=8)
    fig.suptitle("fp32 product time by form (weights streamed from memory)", fontsize=9)
    fig.tight_layout()
    out.mkdir(parents=True, exist_ok=True)
    fig.savefig(out / "matmul_forms.png", dpi=100)


if __name__ == "__main__":
    main()
