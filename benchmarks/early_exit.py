"""Early-exit throughput and quality on the default model (issue: early exit inside the engine).

For exit policies none / batch / token x KV fill propagate / recompute x several thresholds, at
concurrency 1 and ``--concurrency`` (32), ``--new-tokens`` (128) greedy tokens per request, it
reports output tokens/s, speed-up over ``none`` measured in the same run, mean layers per token,
FLOPs per token relative to full depth, and token agreement (docs/design.md: the early-exit output
teacher-forced through the full-depth model; share of tokens equal to its greedy pick). It
writes PNG plots (speed-up against agreement per policy; histogram of exit layers) and, with
``--record``, the table into docs/benchmarks.md.

Heads: the tuned heads shipped for the model when they exist (their confidence measure), else
the shared head with the softmax measure; the table says which.

    python benchmarks/early_exit.py                       # full run (about 15 min on 2 cores)
    python benchmarks/early_exit.py --quick               # 2 thresholds, fewer prompts
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import torch
from common import PROMPTS

ROOT = Path(__file__).resolve().parent.parent



@dataclass
class Row:
    heads: str
    policy: str
    kv_fill: str
    threshold: str
    concurrency: int
    tok_s: float
    mean_layers: float
    flops_ratio: float
    agreement: float
    speedup: float = 0.0
    exit_hist: Counter = field(default_factory=Counter)


def agreement(llm, outs) -> float:
    """Token agreement (docs/design.md) of the outputs, by ``eeserve.tuning.calibrate.token_agreement``."""
    from eeserve.tuning.calibrate import token_agreement

    same, total = token_agreement(llm.engine.model, [o.prompt_token_ids for o in outs],
                                  [list(o.outputs[0].token_ids) for o in outs])
    return same / max(total, 1)


def run_config(llm, prompts, params, concurrency: int, reps: int):
    """Generate; returns (outputs, tok/s median over reps)."""
    rates, outs = [], None
    for _ in range(reps):
        if concurrency == 1:
            t = time.perf_counter()
            outs = [llm.generate([p], params, use_tqdm=False)[0] for p in prompts]
        else:
            t = time.perf_counter()
            outs = llm.generate(prompts, params, use_tqdm=False)
        dt = time.perf_counter() - t
        rates.append(sum(len(o.outputs[0].token_ids) for o in outs) / dt)
    return outs, statistics.median(rates)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--concurrency", type=int, default=32)
    ap.add_argument("--single-prompts", type=int, default=3, help="prompts run one at a time for concurrency 1")
    ap.add_argument("--thresholds", default=None, help="comma-separated; default depends on the heads")
    ap.add_argument("--exit-heads", default=None, help="heads folder; 'none' = shared head (default: shipped heads)")
    ap.add_argument("--exit-layers", default=None, help="for the shared head; default 8,12,16,20,24,27")
    ap.add_argument("--reps", type=int, default=1)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--out-dir", default=str(ROOT / "docs"))
    args = ap.parse_args()

    from eeserve import LLM, SamplingParams
    from eeserve.early_exit.defaults import resolve_early_exit

    torch.manual_seed(0)
    base = resolve_early_exit(args.model, {} if args.exit_heads is None else {"exit_heads": args.exit_heads})
    tuned = base.exit_heads is not None and base.exit_head != "shared"
    if tuned:
        heads_desc = f"tuned {base.exit_head} heads ({Path(base.exit_heads).name}), confidence {base.confidence}"
        layers = base.exit_layers
        confidence = base.confidence
        default_thr = "calibrated,0.5,0.7,0.9" if not args.quick else "calibrated,0.9"
    else:
        heads_desc = "shared head (final norm + LM head), softmax confidence: no tuned heads"
        layers = tuple(int(x) for x in (args.exit_layers or "8,12,16,20,24,27").split(","))
        confidence = "softmax"
        default_thr = "0.5,0.7,0.8,0.9,0.95" if not args.quick else "0.8,0.95"
    thresholds = (args.thresholds or default_thr).split(",")
    policies = ("batch", "token")
    fills = ("propagate", "recompute")
    n_conc = args.concurrency
    llm = LLM(args.model, max_num_seqs=max(n_conc, 1), early_exit={"exit_heads": "none"})
    prompts = []
    for i in range(max(n_conc, args.single_prompts)):
        msg = [{"role": "user", "content": PROMPTS[i % len(PROMPTS)] + ("" if i < len(PROMPTS) else f" ({i})")}]
        prompts.append(llm.apply_chat_template(msg))
    params = SamplingParams(temperature=0, max_tokens=args.new_tokens, ignore_eos=True)
    llm.generate(prompts[:1], SamplingParams(max_tokens=4), use_tqdm=False)

    rows: list[Row] = []
    for conc in (1, n_conc):
        ps = prompts[: args.single_prompts] if conc == 1 else prompts[:n_conc]
        llm.engine.set_early_exit(resolve_early_exit(args.model, {"exit_heads": "none"}))
        outs, rate = run_config(llm, ps, params, conc, args.reps)
        none_rate = rate
        rows.append(Row("-", "none", "-", "-", conc, rate, 30.0, 1.0, 1.0, 1.0))
        print(f"conc {conc} none: {rate:.1f} tok/s", flush=True)
        for fill in fills:
            for pol in policies:
                for thr in thresholds:
                    over = {"exit_policy": pol, "kv_fill": fill, "exit_layers": layers, "confidence": confidence,
                            "max_exit_batch": 0}  # the policies themselves, at every concurrency
                    if args.exit_heads is not None:
                        over["exit_heads"] = args.exit_heads
                    elif not tuned:
                        over["exit_heads"] = "none"
                    if thr != "calibrated":
                        over["threshold"] = float(thr)
                    cfg = resolve_early_exit(args.model, over)
                    llm.engine.set_early_exit(cfg)
                    outs, rate = run_config(llm, ps, params, conc, args.reps)
                    exits = [e for o in outs for e in o.outputs[0].exit_layers[1:]]
                    r = Row(
                        "tuned" if tuned else "shared", pol, fill, thr, conc, rate,
                        statistics.mean(exits), statistics.mean(o.metrics.flops_ratio for o in outs),
                        agreement(llm, outs), rate / none_rate, Counter(exits),
                    )
                    rows.append(r)
                    print(f"conc {conc} {pol}/{fill} thr {thr}: {rate:.1f} tok/s x{r.speedup:.2f} "
                          f"layers {r.mean_layers:.1f} flops {r.flops_ratio:.2f} agree {r.agreement:.3f}", flush=True)
    llm.engine.set_early_exit(resolve_early_exit(args.model, {"exit_heads": "none"}))

    lines = [f"Heads: {heads_desc}; exit layers {list(layers)}; {args.new_tokens} greedy tokens per request; "
             "layers and FLOPs are per decode token (FLOPs include exit heads and KV fill, relative to full depth).",
             "",
             "| conc | policy | kv fill | threshold | tok/s | speed-up vs none | mean layers | FLOPs ratio | token agreement |",
             "| ---: | --- | --- | --- | ---: | ---: | ---: | ---: | ---: |"]
    for r in rows:
        lines.append(f"| {r.concurrency} | {r.policy} | {r.kv_fill} | {r.threshold} | {r.tok_s:.1f} | {r.speedup:.2f}x | "
                     f"{r.mean_layers:.1f} | {r.flops_ratio:.2f} | {r.agreement:.3f} |")
    table = "\n".join(lines)
    print(table)
    out = Path(args.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "early_exit_table.md").write_text(table + "\n")
    plot(rows, out, heads_desc)


def plot(rows: list[Row], out: Path, heads_desc: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    concs = sorted({r.concurrency for r in rows})
    fig, axes = plt.subplots(1, len(concs), figsize=(5.5 * len(concs), 4), squeeze=False)
    markers = {"propagate": "o", "recompute": "s"}
    colors = {"batch": "tab:orange", "token": "tab:blue"}
    for ax, conc in zip(axes[0], concs):
        for pol in ("batch", "token"):
            for fill in ("propagate", "recompute"):
                rs = sorted((r for r in rows if r.concurrency == conc and r.policy == pol and r.kv_fill == fill),
                            key=lambda r: r.agreement)
                if rs:
                    ax.plot([r.agreement for r in rs], [r.speedup for r in rs], marker=markers[fill], color=colors[pol],
                            linestyle="-" if fill == "propagate" else "--", label=f"{pol} / {fill}")
        ax.axhline(1.0, color="gray", linewidth=0.8)
        ax.set_xlabel("token agreement with full depth")
        ax.set_ylabel("speed-up over exit_policy none")
        ax.set_title(f"concurrency {conc}")
        ax.legend(fontsize=8)
    fig.suptitle(heads_desc, fontsize=9)
    fig.tight_layout()
    fig.savefig(out / "early_exit_speedup.png", dpi=110)

    fig, ax = plt.subplots(figsize=(6, 3.5))
    token_rows = [r for r in rows if r.policy == "token" and r.kv_fill == "propagate" and r.concurrency == max(concs)]
    if token_rows:
        r = token_rows[len(token_rows) // 2]
        layers = sorted(r.exit_hist)
        ax.bar([str(e) for e in layers], [r.exit_hist[e] for e in layers], color="tab:blue")
        ax.set_xlabel("exit layer (layers run)")
        ax.set_ylabel("decode tokens")
        ax.set_title(f"exit layers, token policy, threshold {r.threshold}, concurrency {r.concurrency}")
    fig.tight_layout()
    fig.savefig(out / "early_exit_hist.png", dpi=110)


if __name__ == "__main__":
    main()
