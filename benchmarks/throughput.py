"""Throughput of eeserve against transformers' ``generate`` on the same weights (issue: core engine).

Measures, each system in its own fresh process (so peak RSS is its own):
- batch-1 decode tokens/s: prompts one after another, ``--new-tokens`` greedy tokens each;
- output tokens/s for ``--concurrency`` requests x ``--new-tokens`` tokens: eeserve with
  continuous batching; transformers with one left-padded static batch.
Prints a table, writes ``docs/throughput.png`` and, with ``--record``, the table into
docs/benchmarks.md. Early exit is off here (see benchmarks/early_exit.py).

    python benchmarks/throughput.py            # defaults: 4 batch-1 prompts, 32 x 128 tokens
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

from common import PROMPTS

ROOT = Path(__file__).resolve().parent.parent


def chat_prompts(tokenizer, n: int) -> list[list[int]]:
    out = []
    for i in range(n):
        msg = [{"role": "user", "content": PROMPTS[i % len(PROMPTS)] + (f" (variant {i})" if i >= len(PROMPTS) else "")}]
        text = tokenizer.apply_chat_template(msg, tokenize=False, add_generation_prompt=True)
        out.append(tokenizer.encode(text, add_special_tokens=False))
    return out


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def run_eeserve(args) -> dict:
    import torch

    from eeserve import LLM, SamplingParams

    torch.manual_seed(0)
    llm = LLM(args.model, max_num_seqs=max(args.concurrency, 1), early_exit={"exit_heads": "none"})
    params = SamplingParams(temperature=0, max_tokens=args.new_tokens, ignore_eos=True)
    prompts = chat_prompts(llm.tokenizer, args.concurrency)
    llm.generate(prompts[:1], SamplingParams(temperature=0, max_tokens=4), use_tqdm=False)  # warm-up
    b1 = []
    for p in prompts[: args.batch1_prompts]:
        out = llm.generate([p], params, use_tqdm=False)[0]
        m = out.metrics
        b1.append((len(out.outputs[0].token_ids) - 1) / (m.finished_time - m.first_token_time))
    t = time.perf_counter()
    outs = llm.generate(prompts, params, use_tqdm=False)
    dt = time.perf_counter() - t
    total = sum(len(o.outputs[0].token_ids) for o in outs)
    return {"batch1_decode_tok_s": statistics.median(b1), "batch1_runs": b1,
            "concurrent_tok_s": total / dt, "concurrent_s": dt, "peak_rss_mb": peak_rss_mb()}


def run_transformers(args) -> dict:
    import torch
    from transformers import AutoTokenizer, LlamaForCausalLM

    from eeserve.model.loader import resolve_model

    files = resolve_model(args.model)
    tok = AutoTokenizer.from_pretrained(files.path)
    model = LlamaForCausalLM.from_pretrained(files.path, dtype=torch.float32).eval()
    prompts = chat_prompts(tok, args.concurrency)
    gen = dict(do_sample=False, max_new_tokens=args.new_tokens, min_new_tokens=args.new_tokens, pad_token_id=tok.eos_token_id)
    with torch.inference_mode():
        model.generate(torch.tensor([prompts[0]]), do_sample=False, max_new_tokens=4, pad_token_id=tok.eos_token_id)
        b1 = []
        for p in prompts[: args.batch1_prompts]:
            ids = torch.tensor([p])
            # decode rate: time of new_tokens minus the time of a 1-token generate (prefill)
            t0 = time.perf_counter()
            model.generate(ids, do_sample=False, max_new_tokens=1, pad_token_id=tok.eos_token_id)
            t_prefill = time.perf_counter() - t0
            t0 = time.perf_counter()
            model.generate(ids, **gen)
            b1.append((args.new_tokens - 1) / (time.perf_counter() - t0 - t_prefill))
        width = max(len(p) for p in prompts)
        input_ids = torch.tensor([[tok.eos_token_id] * (width - len(p)) + p for p in prompts])
        mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])
        t = time.perf_counter()
        out = model.generate(input_ids, attention_mask=mask, **gen)
        dt = time.perf_counter() - t
    total = (out.shape[1] - width) * len(prompts)
    return {"batch1_decode_tok_s": statistics.median(b1), "batch1_runs": b1,
            "concurrent_tok_s": total / dt, "concurrent_s": dt, "peak_rss_mb": peak_rss_mb()}


def worker(args) -> None:
    res = run_eeserve(args) if args.worker == "eeserve" else run_transformers(args)
    print("RESULT " + json.dumps(res))


def spawn(system: str, args) -> dict:
    cmd = [sys.executable, __file__, "--worker", system, "--model", args.model, "--new-tokens", str(args.new_tokens),
           "--concurrency", str(args.concurrency), "--batch1-prompts", str(args.batch1_prompts)]
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
    for line in proc.stdout.splitlines():
        if line.startswith("RESULT "):
            return json.loads(line[7:])
    raise RuntimeError(f"{system} worker failed:\n{proc.stderr[-3000:]}")


def table(res: dict, args) -> str:
    e, t = res["eeserve"], res["transformers"]
    rows = [
        ("batch-1 decode tok/s (median)", e["batch1_decode_tok_s"], t["batch1_decode_tok_s"]),
        (f"{args.concurrency} requests x {args.new_tokens} tokens, output tok/s", e["concurrent_tok_s"], t["concurrent_tok_s"]),
        ("peak RSS (MB)", e["peak_rss_mb"], t["peak_rss_mb"]),
    ]
    lines = ["| measure | eeserve | transformers | ratio |", "| --- | ---: | ---: | ---: |"]
    for name, a, b in rows:
        lines.append(f"| {name} | {a:.1f} | {b:.1f} | {a / b:.2f}x |")
    return "\n".join(lines)


def plot(res: dict, args, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(8, 3.2))
    for ax, key, title in ((axes[0], "batch1_decode_tok_s", "batch-1 decode"),
                           (axes[1], "concurrent_tok_s", f"{args.concurrency} concurrent x {args.new_tokens}")):
        vals = [res["eeserve"][key], res["transformers"][key]]
        ax.bar(["eeserve", "transformers"], vals, color=["tab:blue", "tab:gray"])
        ax.set_title(title)
        ax.set_ylabel("output tokens/s")
        for i, v in enumerate(vals):
            ax.text(i, v, f"{v:.1f}", ha="center", va="bottom")
    fig.suptitle(f"{args.model}, fp32, CPU ({os.cpu_count()} cores)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--concurrency", type=int, default=32)
    ap.add_argument("--batch1-prompts", type=int, default=4)
    ap.add_argument("--worker", choices=["eeserve", "transformers"], help=argparse.SUPPRESS)
    ap.add_argument("--plot", default=str(ROOT / "docs" / "throughput.png"))
    args = ap.parse_args()
    if args.worker:
        worker(args)
        return
    res = {"eeserve": spawn("eeserve", args), "transformers": spawn("transformers", args)}
    print(table(res, args))
    print(json.dumps(res, indent=1))
    plot(res, args, Path(args.plot))
    print(f"plot: {args.plot}")


if __name__ == "__main__":
    main()
