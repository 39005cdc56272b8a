"""Engine decode throughput of two git revisions, side by side (early exit off, or with
``--early-exit`` the given early-exit settings, e.g. the shipped ones: ``'{}'``).

Checks the old revision out into a temporary git worktree and alternates fresh processes of the
old and the current tree (``--rounds`` each), each timing ``LLM.generate`` on ``--requests`` (1, 8
and 32) chat prompts at once, ``--new-tokens`` greedy tokens per request, EOS ignored. Prints the output
tokens/s of every run and the ratio of medians. Used to check a kernel change on this noisy
machine, where separate runs minutes apart differ by 20%.

    python benchmarks/compare_checkouts.py --old-rev 72215d7     # about 5 min
    python benchmarks/compare_checkouts.py --old-rev 09bd6c7 --requests 1,8,12 --rounds 3
    python benchmarks/compare_checkouts.py --old-rev eb0f5d5 --requests 1,8 --early-exit '{}'
    python benchmarks/compare_checkouts.py --old-rev eb0f5d5 --requests 8 --early-exit '{"max_exit_batch": 0}'
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

CHILD = r"""
import json, sys, time
sys.path.insert(0, sys.argv[1]); sys.path.insert(0, sys.argv[1] + "/benchmarks")
from common import PROMPTS
from eeserve import LLM, SamplingParams
llm = LLM("smollm2-135m", max_num_seqs=32, early_exit=json.loads(sys.argv[4]))
tok = llm.tokenizer
msgs = [[{"role": "user", "content": PROMPTS[i % len(PROMPTS)] + f" ({i})"}] for i in range(32)]
ps = [tok.encode(tok.apply_chat_template(m, tokenize=False, add_generation_prompt=True), add_special_tokens=False)
      for m in msgs]
params = SamplingParams(temperature=0, max_tokens=int(sys.argv[2]), ignore_eos=True)
llm.generate(ps[:1], SamplingParams(max_tokens=4), use_tqdm=False)
out = {}
for n in map(int, sys.argv[3].split(",")):
    t = time.perf_counter()
    llm.generate(ps[:n], params, use_tqdm=False)
    out[n] = n * int(sys.argv[2]) / (time.perf_counter() - t)
print(json.dumps(out))
"""


def run(tree: Path, new_tokens: int, requests: str, early_exit: str) -> dict[int, float]:
    res = subprocess.run([sys.executable, "-c", CHILD, str(tree), str(new_tokens), requests, early_exit], cwd=tree,
                         capture_output=True, text=True, check=True)
    return {int(k): v for k, v in json.loads(res.stdout.strip().splitlines()[-1]).items()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--old-rev", required=True, help="git revision to compare against the working tree")
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--requests", default="1,8,32", help="comma-separated requests run at once, at most 32")
    ap.add_argument("--early-exit", default='{"exit_heads": "none"}',
                    help="early-exit settings as JSON, as LLM(early_exit=...) takes them; '{}' for the shipped "
                         "heads and setting (default: early exit off)")
    args = ap.parse_args()
    json.loads(args.early_exit)  # fail early on bad JSON
    if not all(1 <= int(n) <= 32 for n in args.requests.split(",")):
        raise SystemExit(f"--requests: numbers in 1..32, got {args.requests!r}")
    with tempfile.TemporaryDirectory() as tmp:
        old = Path(tmp) / "old"
        subprocess.run(["git", "worktree", "add", "--detach", str(old), args.old_rev], cwd=ROOT, check=True,
                       capture_output=True)
        try:
            rates: dict[str, dict[int, list[float]]] = {"old": {}, "new": {}}
            for _ in range(args.rounds):
                for name, tree in (("old", old), ("new", ROOT)):
                    for n, r in run(tree, args.new_tokens, args.requests, args.early_exit).items():
                        rates[name].setdefault(n, []).append(r)
                    print(name, {n: round(v[-1], 1) for n, v in rates[name].items()}, flush=True)
        finally:
            subprocess.run(["git", "worktree", "remove", "--force", str(old)], cwd=ROOT, check=False)
    print(f"early_exit={args.early_exit}, {args.new_tokens} greedy tokens per request, {args.rounds} rounds")
    print(f"| requests at once | {args.old_rev} (old) | working tree (new) | new / old (medians) |")
    print("| ---: | --- | --- | ---: |")
    for n in sorted(rates["old"]):
        o, w = rates["old"][n], rates["new"][n]
        print(f"| {n} | {', '.join(f'{v:.1f}' for v in o)} | {', '.join(f'{v:.1f}' for v in w)} | "
              f"{statistics.median(w) / statistics.median(o):.2f}x |")


if __name__ == "__main__":
    main()
