"""``eeserve tune-kernels``: measure the matrix-product forms for a model's weight shapes on this
machine now (replacing the cached choice) and print what was chosen. The engine does the same at
its first start on a machine; this command re-measures on request, e.g. on a quieter machine."""

from __future__ import annotations

import argparse


def add_cli_args(p: argparse.ArgumentParser) -> None:
    from eeserve.config import MODEL_DTYPES

    p.add_argument("--model", default="smollm2-135m", help="alias, .gguf file or Hugging Face folder (default smollm2-135m)")
    p.add_argument("--dtype", default="auto", choices=MODEL_DTYPES,
                   help="dtype to measure; auto measures float32 and, where the CPU has bf16 instructions, bfloat16")


def main(args: argparse.Namespace) -> int:
    import torch

    from eeserve.model import kernels, loader
    from eeserve.model.llama import ModelArgs

    files = loader.resolve_model(args.model)
    margs = ModelArgs.from_hf_config(loader.load_config(files))
    shapes = margs.linear_shapes()
    setup = kernels.setup_for_model(shapes, args.dtype, "cpu", True, loader.default_cache_dir(), retune=True)
    print(setup.report)
    print(f"CPU: {setup.plan.identity['cpu']} (flags {' '.join(setup.plan.identity['flags'])}), "
          f"torch {setup.plan.identity['torch']}, {setup.plan.identity['threads']} threads")
    names = ["float32", "bfloat16"] if args.dtype == "auto" and kernels.has_bf16_hardware() else [
        "float32" if args.dtype == "auto" else args.dtype]
    print("| weight [out, in] | dtype | " + " | ".join(f"{b} rows" for b in kernels.ROW_BUCKETS) + " |")
    print("| --- | --- | " + " | ".join("---" for _ in kernels.ROW_BUCKETS) + " |")
    for name in names:
        for o, i, _ in shapes:
            per = setup.plan.choices[kernels.shape_key(o, i, getattr(torch, name))]
            cells = [f"{c.form}{'@' + str(c.rows) if c.rows != b else ''} {c.us:.0f}us" for c, b in zip(per, kernels.ROW_BUCKETS)]
            print(f"| [{o}, {i}] | {name} | " + " | ".join(cells) + " |")
    print(f"saved to {kernels.cache_path(loader.default_cache_dir())}")
    return 0
