"""Early-exit speed-up measured in interleaved pairs, to see a gain smaller than the machine's drift.

On a shared machine the speed drifts by 20-40% within minutes (docs/benchmarks.md), so a
configuration measured after another one can look faster or slower by more than early exit
changes. Here every round generates the same prompts three times in a row, once per arm, in an
order that rotates from round to round:

- ``none``: full depth (``exit_policy`` none);
- ``early exit``: the heads and serving setting shipped for the model (or ``--exit-heads``);
  with ``--setting`` (repeatable), one early-exit arm per setting instead, each the shipped
  setting with some fields changed;
- ``none (again)``: full depth once more, the A/A control: its ratio to ``none`` is the noise
  floor of the method, and should come out near 1.00.

The speed-up of a round is the ratio of its arms' output tokens/s; the table reports the median
over rounds, the interquartile range, and the share of rounds where early exit was faster. The
early-exit arm's outputs give token agreement (docs/design.md: teacher-forced through the full-depth
model), mean layers per decode token and the FLOPs ratio. A PNG shows every round's ratios.

    python benchmarks/early_exit_paired.py                          # concurrency 1 and 8
    python benchmarks/early_exit_paired.py --concurrency 8 --rounds 10
    python benchmarks/early_exit_paired.py --concurrency 1 --setting verify_exits=false \
        --setting verify_exits=true,threshold=0.45
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
NONE, CONTROL = "none", "none (again)"


@dataclass
class Quality:
    """An early-exit arm's outputs over all rounds of one concurrency."""

    agreement: float | None  # token agreement (docs/design.md), teacher-forced; None when sampling
    mean_layers: float  # mean exit layer of decode tokens (the first token, from the prefill, left out)
    flops_ratio: float  # mean per request of FLOPs spent / FLOPs at full depth


@dataclass
class PairedResult:
    """Per concurrency: per-round tokens/s of each arm and the early-exit arms' quality figures."""

    concurrency: int
    rates: dict[str, list[float]]  # arm -> [rounds] output tokens/s
    quality: dict[str, Quality]  # early-exit arm -> its quality figures

    def ratios(self, arm: str) -> list[float]:
        return [a / b for a, b in zip(self.rates[arm], self.rates[NONE])]


def _fmt_agreement(x: float | None) -> str:
    return "-" if x is None else f"{x:.3f}"


def parse_setting(text: str) -> dict:
    """``key=value,key=value`` of EarlyExitConfig fields; values parsed as bool, int, float or
    comma-free text. Raises ValueError naming the bad part."""
    out: dict = {}
    for part in text.split(","):
        key, sep, value = part.partition("=")
        if not sep or not key:
            raise ValueError(f"--setting: expected key=value pairs separated by commas, got {part!r} in {text!r}")
        low = value.lower()
        if low in ("true", "false"):
            out[key] = low == "true"
            continue
        for cast in (int, float):
            try:
                out[key] = cast(value)
                break
            except ValueError:
                pass
        else:
            out[key] = value
    return out


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
    ap.add_argument("--new-tokens", type=int, default=128, help="tokens per request, EOS ignored (default 128)")
    ap.add_argument("--temperature", type=float, default=0.0,
                    help="0 = greedy (default); above 0 each request samples with its own seed, and token "
                         "agreement (a greedy measure) is not reported")
    ap.add_argument("--max-exit-batch", type=int, default=None, help="early-exit arm's max_exit_batch (default: the engine's, 1 on CPU with recompute; 0 = check always)")
    ap.add_argument("--setting", action="append", default=[],
                    help="an early-exit arm: the shipped setting with these EarlyExitConfig fields changed, "
                         "e.g. verify_exits=true,threshold=0.45 (repeatable; default: one arm, the shipped setting)")
    ap.add_argument("--dtype", default="auto", help="engine dtype (default auto: the engine's default)")
    ap.add_argument("--kernel-tuning", action=argparse.BooleanOptionalAction, default=True,
                    help="measured kernels (default); --no-kernel-tuning: the fixed legacy rule")
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
    if args.temperature < 0:
        ap.error(f"--temperature must be >= 0, got {args.temperature}")

    from eeserve import LLM, SamplingParams
    from eeserve.early_exit.defaults import resolve_early_exit
    from eeserve.tuning.calibrate import token_agreement

    torch.manual_seed(0)
    over = {} if args.exit_heads is None else {"exit_heads": args.exit_heads}
    if args.max_exit_batch is not None:
        over["max_exit_batch"] = args.max_exit_batch
    try:
        arms_cfg = {text: resolve_early_exit(args.model, {**over, **parse_setting(text)}) for text in args.setting}
        if not arms_cfg:
            arms_cfg = {"early exit": resolve_early_exit(args.model, over)}
    except ValueError as e:
        ap.error(str(e))
    if any(c.exit_heads is None for c in arms_cfg.values()):
        raise SystemExit(f"--model {args.model}: no tuned exit heads shipped; pass --exit-heads DIR")
    full_cfg = resolve_early_exit(args.model, {"exit_heads": "none"})
    llm = LLM(args.model, max_num_seqs=max(concs), early_exit={"exit_heads": "none"}, dtype=args.dtype,
              kernel_tuning=args.kernel_tuning)
    print(f"engine: {llm.engine.kernel_report}")
    prompts = [llm.apply_chat_template([{"role": "user", "content": p}]) for p in PROMPTS]
    greedy = args.temperature == 0
    params = [SamplingParams(temperature=args.temperature, max_tokens=args.new_tokens, ignore_eos=True,
                             seed=None if greedy else i) for i in range(max(concs))]
    llm.generate(prompts[:1], SamplingParams(max_tokens=4), use_tqdm=False)  # warm-up
    ee_cfg = next(iter(arms_cfg.values()))
    desc = (f"{Path(ee_cfg.exit_heads).name}: exits {list(ee_cfg.exit_layers)}, {ee_cfg.confidence} "
            f"{list(ee_cfg.threshold) if isinstance(ee_cfg.threshold, tuple) else ee_cfg.threshold}, "
            f"{ee_cfg.exit_policy} policy, {ee_cfg.kv_fill}"
            + f", max_exit_batch {ee_cfg.exit_batch_limit(llm.engine.model.device.type)}"
            + f", verify_exits {ee_cfg.verify_exits}")
    print(desc, flush=True)
    arms = (NONE, *arms_cfg, CONTROL)

    results = []
    for conc in concs:
        rates: dict[str, list[float]] = {a: [] for a in arms}
        counts = {a: [0, 0] for a in arms_cfg}  # arm -> [agreeing tokens, tokens]
        layers: dict[str, list[int]] = {a: [] for a in arms_cfg}
        flops: dict[str, list[float]] = {a: [] for a in arms_cfg}
        for r in range(args.rounds):
            group = [prompts[(r * conc + i) % len(prompts)] for i in range(conc)]
            k = r % len(arms)
            for arm in arms[k:] + arms[:k]:
                llm.engine.set_early_exit(arms_cfg.get(arm, full_cfg))
                t = time.perf_counter()
                outs = llm.generate(group, params[: len(group)], use_tqdm=False)
                dt = time.perf_counter() - t
                rates[arm].append(sum(len(o.outputs[0].token_ids) for o in outs) / dt)
                if arm in arms_cfg:
                    a, n = (token_agreement(llm.engine.model, group, [list(o.outputs[0].token_ids) for o in outs])
                            if greedy else (0, 0))
                    counts[arm][0] += a
                    counts[arm][1] += n
                    layers[arm] += [e for o in outs for e in o.outputs[0].exit_layers[1:]]
                    flops[arm] += [o.metrics.flops_ratio for o in outs]
            print(f"conc {conc} round {r + 1}/{args.rounds}: "
                  + ", ".join(f"{a} {rates[a][-1]:.1f}" for a in arms) + " tok/s", flush=True)
        llm.engine.set_early_exit(full_cfg)
        quality = {a: Quality(counts[a][0] / counts[a][1] if counts[a][1] else None, statistics.mean(layers[a]),
                              statistics.mean(flops[a]))
                   for a in arms_cfg}
        results.append(PairedResult(conc, rates, quality))

    how = "greedy" if greedy else f"sampled (temperature {args.temperature}, a seed per request)"
    lines = [f"Early exit: {desc}; {args.new_tokens} {how} tokens per request; {args.rounds} rounds per "
             "concurrency, arms in rotating order.", "",
             "| conc | arm | tok/s (median) | speed-up vs none, median of rounds [IQR] | "
             "rounds faster | mean layers | FLOPs ratio | token agreement |",
             "| ---: | --- | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for res in results:
        full = "1.000" if greedy else "-"
        lines.append(f"| {res.concurrency} | none | {statistics.median(res.rates[NONE]):.1f} | | | 30 | 1.00 | {full} |")
        for arm in (*arms_cfg, CONTROL):
            x = res.ratios(arm)
            q = quartiles(x)
            qual = res.quality.get(arm)
            figures = (f"{qual.mean_layers:.2f} | {qual.flops_ratio:.2f} | {_fmt_agreement(qual.agreement)}" if qual
                       else f"30 | 1.00 | {full} (A/A control)")
            lines.append(f"| {res.concurrency} | {arm} | {statistics.median(res.rates[arm]):.1f} | "
                         f"{q[1]:.3f}x [{q[0]:.3f}, {q[2]:.3f}] | {sum(v > 1 for v in x)}/{len(x)} | {figures} |")
    table = "\n".join(lines)
    print(table)
    out = Path(args.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    plot(results, out / "early_exit_paired.png", desc)


def plot(results: list[PairedResult], path: Path, desc: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    arms = [a for a in results[0].rates if a != NONE]
    fig, axes = plt.subplots(1, len(results), figsize=(max(5.5, 2 + 1.9 * len(arms)) * len(results), 4), squeeze=False)
    for ax, res in zip(axes[0], results):
        data = [res.ratios(a) for a in arms]
        ax.boxplot(data, showfliers=False)
        for i, ys in enumerate(data, start=1):
            ax.scatter([i + (j % 5 - 2) * 0.03 for j in range(len(ys))], ys, s=12, alpha=0.7)
        labels = [f"{a} / none" + (f"\nagreement {_fmt_agreement(res.quality[a].agreement)}, "
                                    f"{res.quality[a].mean_layers:.1f} layers"
                                    if a in res.quality else "\n(A/A control)") for a in arms]
        ax.set_xticks(range(1, len(arms) + 1), [lab.replace(",", ",\n", 1) if len(lab) > 40 else lab for lab in labels],
                      fontsize=7)
        ax.axhline(1.0, color="gray", linewidth=0.8)
        ax.set_ylabel("tokens/s ratio within a round")
        ax.set_title(f"concurrency {res.concurrency}", fontsize=9)
    fig.suptitle(desc, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


if __name__ == "__main__":
    main()
