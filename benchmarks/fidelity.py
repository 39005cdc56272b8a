"""Fidelity of reduced-precision weights against fp32: teacher-forced top-1 agreement on held-out
text, and what changes with early exit on (the shipped heads' exits and the demo's tokens).

Held-out text: the CPython documentation shipped with the standard library (``pydoc_data``),
cut into windows of ``--window`` tokens, ``--max-tokens`` in all (none of it is in the eeserve
tests; the exit heads' tuning samples from it, the backbone never saw it in this form). For every
position, the fp32 engine's and the reduced-precision engine's greedy next token are compared.

    python benchmarks/fidelity.py                          # bfloat16 and int8 against float32
    python benchmarks/fidelity.py --variants bfloat16 --max-tokens 4000
"""

from __future__ import annotations

import argparse

import torch

DEMO = "What is the capital of France? Answer in one sentence."


def heldout_windows(tokenizer, window: int, max_tokens: int) -> list[list[int]]:
    from eeserve.tuning.data import pydoc_documents

    out, total = [], 0
    for doc in pydoc_documents():
        ids = tokenizer.encode(doc.text, add_special_tokens=False)
        for s in range(0, len(ids) - window, window):
            out.append(ids[s : s + window])
            total += window
            if total >= max_tokens:
                return out
    return out


def top1(llm, windows: list[list[int]]) -> list[torch.Tensor]:
    return [llm.engine.full_depth_logits(w).argmax(-1) for w in windows]


VARIANTS = {"float32": {"dtype": "float32"}, "bfloat16": {"dtype": "bfloat16"},
            "int8": {"dtype": "float32", "quantization": "int8"}}


def demo_run(model: str, variant: str) -> tuple[str, list[int], list[int]]:
    """The `make demo` chat with the shipped early-exit heads: (text, token ids, exit layers)."""
    from eeserve import LLM, SamplingParams

    llm = LLM(model, num_kv_blocks=64, **VARIANTS[variant])
    out = llm.chat([{"role": "user", "content": DEMO}], SamplingParams(temperature=0, max_tokens=64), use_tqdm=False)[0]
    c = out.outputs[0]
    return c.text, list(c.token_ids), list(c.exit_layers)


def main() -> None:
    from eeserve import LLM

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--variants", default="bfloat16,int8", help=f"comma-separated, of {', '.join(VARIANTS)}")
    ap.add_argument("--window", type=int, default=256)
    ap.add_argument("--max-tokens", type=int, default=8192)
    args = ap.parse_args()
    ref_llm = LLM(args.model, dtype="float32", num_kv_blocks=64, early_exit={"exit_heads": "none"})
    windows = heldout_windows(ref_llm.tokenizer, args.window, args.max_tokens)
    ref = top1(ref_llm, windows)
    del ref_llm
    ref_demo = demo_run(args.model, "float32")
    n = sum(len(w) for w in windows)
    print(f"held-out text: {len(windows)} windows of {args.window} tokens ({n} positions), pydoc_data")
    print("| weights | top-1 agreement with fp32 | demo text equal | demo tokens equal (first differing) | "
          "demo exit layers equal |")
    print("| --- | ---: | --- | --- | --- |")
    for dtype in args.variants.split(","):
        llm = LLM(args.model, num_kv_blocks=64, early_exit={"exit_heads": "none"}, **VARIANTS[dtype])
        got = top1(llm, windows)
        del llm
        same = sum(int((a == b).sum()) for a, b in zip(ref, got))
        text, ids, exits = demo_run(args.model, dtype)
        first = next((i for i, (a, b) in enumerate(zip(ref_demo[1], ids)) if a != b), None)
        print(f"| {dtype} | {same / n:.4f} ({same}/{n}) | {text == ref_demo[0]} | {ids == ref_demo[1]} ({first}) | "
              f"{exits == ref_demo[2]} |")
        if text != ref_demo[0]:
            print(f"  fp32: {ref_demo[0]!r}\n  {dtype}: {text!r}")
        if exits != ref_demo[2]:
            print(f"  exits fp32: {ref_demo[2]}\n  exits {dtype}: {exits}")


if __name__ == "__main__":
    main()
