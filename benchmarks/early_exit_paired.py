"""Early-exit speed-up measured in interleaved pairs, to see a gain smaller than the machine's drift.

On a shared machine the speed drifts by 20-40% within minutes (docs/benchmarks.md), so a
configuration measured after another one can look faster or slower by more than early exit
changes. Here every round generates the same prompts three times in a row, once per arm, in an
order that rotates from round to round:

- ``none``: full depth (``exit_policy`` none);
- ``early exit``: the heads and serving setting shipped for the model (or ``--exit-heads``);
- ``none (again)``: full depth once more, the A/A control: its ratio to ``none`` is the noise
  floor of the method, and should come out near 1.00.

The speed-up of a round is the ratio of its arms' output tokens/s; the table reports the median
over rounds, the interquartile range, and the share of rounds where early exit was faster. The
early-exit arm's outputs give token agreement (DESIGN.md: teacher-forced through the full-depth
model), mean layers per decode token and the FLOPs ratio. A PNG shows every round's ratios.

    python benchmarks/early_exit_paired.py                          # concurrency 1 and 8
    python benchmarks/early_exit_paired.py --concurrency 8 --rounds 10
"""

from __future__ import annotations

import argparse
import statistics
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from common import PROMPTS

ROOT = Path(__file__).resolve().parent.parent
ARMS = ("none", "early exit", "none (again)")


@dataclass
class PairedResult:
    """Per concurrency: per-round tokens/s of each arm and the early-exit arm's quality figures."""

    concurrency: int
    rates: dict[str, list[float]]  # arm -> [rounds] output tokens/s
    agreement: float
    mean_layers: float
    flops_ratio: float

    def ratios(self, arm: str) -> list[float]:
        return [a / b for a, b in zip(self.rates[arm], self.rates["none"])]


def quartiles(xs: list[float]) -> tuple[float, float, float]:
    """(25th percentile, median, 75th percentile)."""
    q = statistics.quantiles(xs, n=4, method="inclusive")
    return q[0], q[1], q[2]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--exit-heads", default=None, help="heads folder (default: the model's shipped heads)")
    ap.add_argument("--concurrency", default="1,8", help="comma-separated request counts run at once (default 1,8)")
    ap.add_argument("--rounds", type=int, default=15, help="rounds per concurrency (default 15)")
    ap.add_argument("--new-tokens", type=int, default=128, help="greedy tokens per request, EOS ignored (default 128)")
    ap.add_argument("--max-exit-batch", type=int, default=None, help="early-exit arm's max_exit_batch (default: the engine's, 1 on CPU with recompute; 0 = check always)")
    ap.add_argument("--out-dir", default=str(ROOT / "docs"))
    args = ap.parse_args()
    try:
        concs = [int(c) for c in args.concurrency.split(",")]
    except ValueError:
        ap.error(f"--concurrency: comma-separated integers, got {args.concurrency!r}")
    if not all(c >= 1 for c in concs):
        ap.error(f"--concurrency: each value must be >= 1, got {args.concurrency!r}")
    if args.rounds < 2:
        ap.error(f"--rounds must be >= 2 (quartiles need two rounds), got {args.rounds}")
    if args.max_exit_batch is not None and args.max_exit_batch < 0:
        ap.error(f"--max-exit-batch must be >= 0 (0 = always check), got {args.max_exit_batch}")
    if args.new_tokens < 1:
        ap.error(f"--new-tokens must be >= 1, got {args.new_tokens}")

    from eeserve import LLM, SamplingParams
    from eeserve.early_exit.defaults import resolve_early_exit
    from eeserve.tuning.calibrate import token_agreement

    torch.manual_seed(0)
    over = {} if args.exit_heads is None else {"exit_heads": args.exit_heads}
    if args.max_exit_batch is not None:
        over["max_exit_batch"] = args.max_exit_batch
    ee_cfg = resolve_early_exit(args.model, over)
    if ee_cfg.exit_heads is None:
        raise SystemExit(f"--model {args.model}: no tuned exit heads shipped; pass --exit-heads DIR")
    full_cfg = resolve_early_exit(args.model, {"exit_heads": "none"})
    llm = LLM(args.model, max_num_seqs=max(concs), early_exit={"exit_heads": "none"})
    prompts = [llm.apply_chat_template([{"role": "user", "content": p}]) for p in PROMPTS]
    params = SamplingParams(temperature=0, max_tokens=args.new_tokens, ignore_eos=True)
    llm.generate(prompts[:1], SamplingParams(max_tokens=4), use_tqdm=False)  # warm-up
    desc = (f"{Path(ee_cfg.exit_heads).name}: exits {list(ee_cfg.exit_layers)}, {ee_cfg.confidence} "
            f"{list(ee_cfg.threshold) if isinstance(ee_cfg.threshold, tuple) else ee_cfg.threshold}, "
            f"{ee_cfg.exit_policy} policy, {ee_cfg.kv_fill}"
            + f", max_exit_batch {ee_cfg.exit_batch_limit(llm.engine.model.device.type)}")
    print(desc, flush=True)

    results = []
    for conc in concs:
        rates: dict[str, list[float]] = {a: [] for a in ARMS}
        agree = total = 0
        layers, flops = [], []
        for r in range(args.rounds):
            group = [prompts[(r * conc + i) % len(prompts)] for i in range(conc)]
            order = ARMS[r % 3:] + ARMS[: r % 3]
            for arm in order:
                llm.engine.set_early_exit(ee_cfg if arm == "early exit" else full_cfg)
                t = time.perf_counter()
                outs = llm.generate(group, params, use_tqdm=False)
                dt = time.perf_counter() - t
                rates[arm].append(sum(len(o.outputs[0].token_ids) for o in outs) / dt)
                if arm == "early exit":
                    a, n = token_agreement(llm.engine.model, group, [list(o.outputs[0].token_ids) for o in outs])
                    agree, total = agree + a, total + n
                    layers += [e for o in outs for e in o.outputs[0].exit_layers[1:]]
                    flops += [o.metrics.flops_ratio for o in outs]
            print(f"conc {conc} round {r + 1}/{args.rounds}: "
                  + ", ".join(f"{a} {rates[a][-1]:.1f}" for a in ARMS) + " tok/s", flush=True)
        llm.engine.set_early_exit(full_cfg)
        results.append(PairedResult(conc, rates, agree / max(total, 1), statistics.mean(layers),
                                    statistics.mean(flops)))

    lines = [f"Early exit: {desc}; {args.new_tokens} greedy tokens per request; {args.rounds} rounds per "
             "concurrency, arms in rotating order.", "",
             "| conc | none tok/s (median) | early exit tok/s (median) | speed-up, median of rounds [IQR] | "
             "rounds faster | A/A control [IQR] | mean layers | FLOPs ratio | token agreement |",
             "| ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for res in results:
        ee, aa = res.ratios("early exit"), res.ratios("none (again)")
        q_ee, q_aa = quartiles(ee), quartiles(aa)
        faster = sum(x > 1 for x in ee)
        lines.append(f"| {res.concurrency} | {statistics.median(res.rates['none']):.1f} | "
                     f"{statistics.median(res.rates['early exit']):.1f} | "
                     f"{q_ee[1]:.3f}x [{q_ee[0]:.3f}, {q_ee[2]:.3f}] | {faster}/{len(ee)} | "
                     f"{q_aa[1]:.3f}x [{q_aa[0]:.3f}, {q_aa[2]:.3f}] | {res.mean_layers:.2f} | "
                     f"{res.flops_ratio:.2f} | {res.agreement:.3f} |")
    table = "\n".join(lines)
    print(table)
    out = Path(args.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    plot(results, out / "early_exit_paired.png", desc)


def plot(results: list[PairedResult], path: Path, desc: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(results), figsize=(5.5 * len(results), 4), squeeze=False)
    for ax, res in zip(axes[0], results):
        data = [res.ratios("early exit"), res.ratios("none (again)")]
        ax.boxplot(data, showfliers=False)
        for i, ys in enumerate(data, start=1):
            ax.scatter([i + (j % 5 - 2) * 0.03 for j in range(len(ys))], ys, s=12, alpha=0.7)
        ax.set_xticks([1, 2], ["early exit / none", "none again / none\n(A/A control)"])
        ax.axhline(1.0, color="gray", linewidth=0.8)
        ax.set_ylabel("tokens/s ratio within a round")
        ax.set_title(f"concurrency {res.concurrency}: agreement {res.agreement:.3f}, "
                     f"{res.mean_layers:.1f} layers", fontsize=9)
    fig.suptitle(desc, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


if __name__ == "__main__":
    main()
