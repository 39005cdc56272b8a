"""Decode speed against torch's thread count (``eeserve --threads``), side by side in one process.

One engine (early exit off) decodes the same greedy request again and again, the thread count
alternating between the values of ``--threads`` (interleaved, so a change in the machine's load
hits every setting alike). Prints the median tokens/s per setting and the ratio to the first, and
the load average (other work on the machine is what makes fewer threads faster).

    python benchmarks/threads.py                      # --threads 1,2 --rounds 5 --new-tokens 32
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import time

import torch

from eeserve import LLM, SamplingParams


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--threads", default=f"1,{len(os.sched_getaffinity(0))}", help="thread counts, comma-separated")
    p.add_argument("--rounds", type=int, default=5, help="runs per thread count (default 5)")
    p.add_argument("--new-tokens", type=int, default=32, help="greedy tokens per run (default 32)")
    args = p.parse_args()
    counts = [int(x) for x in args.threads.split(",")]
    llm = LLM("smollm2-135m", early_exit={"exit_heads": "none"}, num_kv_blocks=64)
    params = SamplingParams(temperature=0, max_tokens=args.new_tokens, ignore_eos=True)
    prompt = "The history of the printing press begins"
    llm.generate([prompt], SamplingParams(temperature=0, max_tokens=4), use_tqdm=False)  # warm-up
    speeds: dict[int, list[float]] = {n: [] for n in counts}
    load_before = os.getloadavg()[0]
    for _ in range(args.rounds):
        for n in counts:
            torch.set_num_threads(n)
            t = time.perf_counter()
            out = llm.generate([prompt], params, use_tqdm=False)[0]
            speeds[n].append(len(out.outputs[0].token_ids) / (time.perf_counter() - t))
    load_after = os.getloadavg()[0]
    cpu = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
    model = next((ln.split(":", 1)[1].strip() for ln in cpu.splitlines() if ln.startswith("Model name")), "?")
    print(f"CPU {model}, {len(os.sched_getaffinity(0))} usable CPUs, load average {load_before:.1f} -> "
          f"{load_after:.1f}; {args.rounds} interleaved runs of {args.new_tokens} tokens, batch 1, early exit off")
    base = statistics.median(speeds[counts[0]])
    print(f"{'threads':>8} {'median tok/s':>13} {'min':>7} {'max':>7} {'ratio':>7}")
    for n in counts:
        xs = speeds[n]
        med = statistics.median(xs)
        print(f"{n:>8} {med:>13.2f} {min(xs):>7.2f} {max(xs):>7.2f} {med / base:>6.2f}x")


if __name__ == "__main__":
    main()
