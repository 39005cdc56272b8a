"""Throughput of eeserve against transformers and llama.cpp on the same weights, in one run.

Every system runs in its own fresh process, one after another, repeated ``--repeats`` times in
rotating order (the machine is shared: ratios come from medians of runs taken side by side):

- eeserve (``--eeserve-dtypes``, default float32 and bfloat16; ``auto``'s choice on this machine is
  printed) with continuous batching;
- transformers ``generate`` in float32 and bfloat16: batch-1 decode, and one left-padded static
  batch per concurrency;
- llama.cpp through llama-cpp-python, F32 and F16 GGUF files dequantized from the same Q4_1
  file (benchmarks/gguf_dequant.py), batch 1;
- llama.cpp's ``llama-server`` with ``--parallel`` slots (32 by default) where a binary is given
  (``--llama-server`` or on PATH), for the concurrent runs.

Workload: chat-templated prompts, ``--new-tokens`` greedy tokens each, EOS ignored. Batch-1 decode
rate excludes the prefill (time from the first token to the last). Concurrent runs report output
tokens/s over the whole run, prefill included. Prints a markdown table headed by the CPU model
(``lscpu``'s name and its bf16/AMX flags) and the raw JSON.

    python benchmarks/throughput.py                     # about 15 min on 2 busy cores
    python benchmarks/throughput.py --repeats 1 --systems eeserve-float32,transformers-float32
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor
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


def _tokenizer(model: str):
    from transformers import AutoTokenizer

    from eeserve.model.loader import resolve_model

    return AutoTokenizer.from_pretrained(resolve_model(model).path)


def run_eeserve(args, dtype: str) -> dict:
    import torch

    from eeserve import LLM, SamplingParams

    torch.manual_seed(0)
    t0 = time.perf_counter()
    llm = LLM(args.model, dtype=dtype, max_num_seqs=max(args.concurrency), early_exit={"exit_heads": "none"})
    start_s = time.perf_counter() - t0
    params = SamplingParams(temperature=0, max_tokens=args.new_tokens, ignore_eos=True)
    prompts = chat_prompts(llm.tokenizer, max(args.concurrency))
    llm.generate(prompts[:1], SamplingParams(temperature=0, max_tokens=4), use_tqdm=False)  # warm-up
    b1 = []
    for p in prompts[: args.batch1_prompts]:
        out = llm.generate([p], params, use_tqdm=False)[0]
        m = out.metrics
        b1.append((len(out.outputs[0].token_ids) - 1) / (m.finished_time - m.first_token_time))
    res = {"batch1_decode_tok_s": statistics.median(b1), "batch1_runs": b1, "start_s": start_s,
           "report": llm.engine.kernel_report}
    for n in args.concurrency:
        t = time.perf_counter()
        outs = llm.generate(prompts[:n], params, use_tqdm=False)
        res[f"conc{n}_tok_s"] = sum(len(o.outputs[0].token_ids) for o in outs) / (time.perf_counter() - t)
    res["peak_rss_mb"] = peak_rss_mb()
    return res


def run_transformers(args, dtype: str) -> dict:
    import torch
    from transformers import LlamaForCausalLM

    from eeserve.model.loader import resolve_model

    tok = _tokenizer(args.model)
    model = LlamaForCausalLM.from_pretrained(resolve_model(args.model).path, dtype=getattr(torch, dtype)).eval()
    prompts = chat_prompts(tok, max(args.concurrency))
    gen = dict(do_sample=False, max_new_tokens=args.new_tokens, min_new_tokens=args.new_tokens, pad_token_id=tok.eos_token_id)
    res: dict = {}
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
        res.update(batch1_decode_tok_s=statistics.median(b1), batch1_runs=b1)
        for n in args.concurrency:
            batch = prompts[:n]
            width = max(len(p) for p in batch)
            input_ids = torch.tensor([[tok.eos_token_id] * (width - len(p)) + p for p in batch])
            mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in batch])
            t = time.perf_counter()
            out = model.generate(input_ids, attention_mask=mask, **gen)
            res[f"conc{n}_tok_s"] = (out.shape[1] - width) * n / (time.perf_counter() - t)
    res["peak_rss_mb"] = peak_rss_mb()
    return res


def _gguf(args, kind: str) -> Path:
    """The F32/F16 GGUF of the model, written once into the bench cache folder."""
    from gguf_dequant import dequantize_gguf

    from eeserve.model.loader import alias_path, default_cache_dir

    src = Path(args.model) if args.model.endswith(".gguf") else alias_path(args.model)
    dst = default_cache_dir() / "bench" / f"{src.stem}-{kind}.gguf"
    if not dst.is_file() or dst.stat().st_mtime < src.stat().st_mtime:
        dst.parent.mkdir(parents=True, exist_ok=True)
        tmp = dst.with_suffix(f".tmp{os.getpid()}")
        dequantize_gguf(src, tmp, kind)
        os.replace(tmp, dst)
    return dst


def run_llama_cpp(args, kind: str) -> dict:
    """llama-cpp-python, batch 1: decode rate from the first streamed token to the last."""
    from llama_cpp import Llama

    tok = _tokenizer(args.model)
    prompts = chat_prompts(tok, args.batch1_prompts)
    llm = Llama(model_path=str(_gguf(args, kind)), n_ctx=1024, n_threads=args.threads, n_threads_batch=args.threads,
                n_batch=512, verbose=False, seed=0)
    eos = llm.token_eos()

    def one(p: list[int], n: int) -> float:
        llm.reset()
        t_first = None
        count = 0
        for _ in llm.create_completion(p, max_tokens=n, temperature=0.0, top_k=1, stream=True,
                                       logit_bias={eos: -1e9}):
            count += 1
            if t_first is None:
                t_first = time.perf_counter()
        return (count - 1) / (time.perf_counter() - t_first)

    one(prompts[0], 4)  # warm-up
    b1 = [one(p, args.new_tokens) for p in prompts]
    return {"batch1_decode_tok_s": statistics.median(b1), "batch1_runs": b1, "peak_rss_mb": peak_rss_mb()}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_llama_server(args, kind: str) -> dict:
    """``llama-server`` with ``--parallel`` slots; each concurrency's requests sent at once."""
    tok = _tokenizer(args.model)
    prompts = chat_prompts(tok, max(args.concurrency))
    port = _free_port()
    ctx = args.parallel * 512
    cmd = [args.llama_server, "-m", str(_gguf(args, kind)), "--host", "127.0.0.1", "--port", str(port),
           "-np", str(args.parallel), "-c", str(ctx), "-t", str(args.threads), "-tb", str(args.threads), "--cont-batching"]
    log = tempfile.TemporaryFile()
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT)
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.time() + 300
        while True:
            try:
                with urllib.request.urlopen(base + "/health", timeout=2) as r:
                    if r.status == 200:
                        break
            except OSError:
                pass
            if proc.poll() is not None or time.time() > deadline:
                log.seek(0)
                raise RuntimeError(f"llama-server did not start: {log.read()[-2000:].decode(errors='replace')}")
            time.sleep(0.5)

        def post(p: list[int]) -> int:
            body = json.dumps({"prompt": p, "n_predict": args.new_tokens, "temperature": 0, "top_k": 1,
                               "ignore_eos": True, "cache_prompt": False}).encode()
            req = urllib.request.Request(base + "/completion", body, {"Content-Type": "application/json"})
            with urllib.request.urlopen(req, timeout=1800) as r:
                return int(json.loads(r.read())["tokens_predicted"])

        post(prompts[0][:8])  # warm-up
        res: dict = {}
        for n in args.concurrency:
            t = time.perf_counter()
            with ThreadPoolExecutor(n) as ex:
                total = sum(ex.map(post, prompts[:n]))
            res[f"conc{n}_tok_s"] = total / (time.perf_counter() - t)
        return res
    finally:
        proc.terminate()
        proc.wait(30)


SYSTEMS = {
    "eeserve-float32": lambda a: run_eeserve(a, "float32"),
    "eeserve-bfloat16": lambda a: run_eeserve(a, "bfloat16"),
    "eeserve-auto": lambda a: run_eeserve(a, "auto"),
    "transformers-float32": lambda a: run_transformers(a, "float32"),
    "transformers-bfloat16": lambda a: run_transformers(a, "bfloat16"),
    "llama.cpp-F32": lambda a: run_llama_cpp(a, "f32"),
    "llama.cpp-F16": lambda a: run_llama_cpp(a, "f16"),
    "llama-server-F32": lambda a: run_llama_server(a, "f32"),
    "llama-server-F16": lambda a: run_llama_server(a, "f16"),
}


def worker(args) -> None:
    import torch

    torch.set_num_threads(args.threads)
    print("RESULT " + json.dumps(SYSTEMS[args.worker](args)))


def spawn(system: str, args) -> dict:
    cmd = [sys.executable, __file__, "--worker", system, "--model", args.model, "--new-tokens", str(args.new_tokens),
           "--concurrency", ",".join(map(str, args.concurrency)), "--batch1-prompts", str(args.batch1_prompts),
           "--threads", str(args.threads), "--parallel", str(args.parallel)]
    if args.llama_server:
        cmd += ["--llama-server", args.llama_server]
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
    for line in proc.stdout.splitlines():
        if line.startswith("RESULT "):
            return json.loads(line[7:])
    raise RuntimeError(f"{system} worker failed:\n{proc.stderr[-3000:]}")


def cpu_line() -> str:
    """``lscpu``'s model name, family/model and the bf16/AMX flags that decide the kernels."""
    from eeserve.model.kernels import machine_identity

    ident = machine_identity()
    return (f"CPU: {ident['cpu']} (family {ident['cpu_family']} model {ident['cpu_model']}; "
            f"{' '.join(ident['flags'])}; {os.cpu_count()} cores), torch {ident['torch']}")


def table(runs: dict[str, list[dict]], args) -> str:
    med = {s: {k: statistics.median(r[k] for r in rs) for k in rs[0] if isinstance(rs[0][k], (int, float))}
           for s, rs in runs.items() if rs}
    keys = [("batch1_decode_tok_s", "batch-1 decode tok/s")] + [
        (f"conc{n}_tok_s", f"{n} at once x {args.new_tokens}, output tok/s") for n in args.concurrency]
    lines = [cpu_line(), "", f"medians of {args.repeats} run(s) per system, {args.threads} threads", "",
             "| system | " + " | ".join(t for _, t in keys) + " | peak RSS (MB) |",
             "| --- | " + " | ".join("---:" for _ in keys) + " | ---: |"]
    for s, m in med.items():
        cells = [f"{m[k]:.1f}" if k in m else "-" for k, _ in keys]
        rss = f"{m['peak_rss_mb']:.0f}" if "peak_rss_mb" in m else "-"
        lines.append(f"| {s} | " + " | ".join(cells) + f" | {rss} |")
    # the targets' ratios: eeserve against the better transformers and llama.cpp at the same precision
    for e in [s for s in med if s.startswith("eeserve")]:
        parts = []
        for k, title in keys:
            tf = max((med[s][k] for s in med if s.startswith("transformers") and k in med[s]), default=None)
            if tf and k in med[e]:
                parts.append(f"{title}: {med[e][k] / tf:.2f}x transformers (better of fp32/bf16)")
        ll = {"eeserve-float32": "llama.cpp-F32", "eeserve-bfloat16": "llama.cpp-F16"}.get(e)
        if ll in med and "batch1_decode_tok_s" in med[e]:
            parts.append(f"batch 1: {med[e]['batch1_decode_tok_s'] / med[ll]['batch1_decode_tok_s']:.2f}x {ll}")
        srv = [s for s in med if s.startswith("llama-server")]
        for n in args.concurrency:
            best = max((med[s].get(f"conc{n}_tok_s", 0) for s in srv), default=0)
            if best and f"conc{n}_tok_s" in med[e]:
                parts.append(f"{n} at once: {med[e][f'conc{n}_tok_s'] / best:.2f}x llama-server ({args.parallel} slots)")
        lines.append(f"\n{e}: " + "; ".join(parts))
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--concurrency", type=lambda s: [int(x) for x in s.split(",")], default=[16, 32])
    ap.add_argument("--batch1-prompts", type=int, default=4)
    ap.add_argument("--threads", type=int, default=len(os.sched_getaffinity(0)))
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--systems", default=None, help=f"comma-separated, of: {', '.join(SYSTEMS)} (default: all available)")
    ap.add_argument("--llama-server", default=shutil.which("llama-server"), help="llama-server binary (default: on PATH)")
    ap.add_argument("--parallel", type=int, default=32, help="llama-server slots (default 32)")
    ap.add_argument("--out", default=None, help="also write the JSON of every run here")
    ap.add_argument("--worker", choices=sorted(SYSTEMS), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        worker(args)
        return
    if args.systems:
        systems = args.systems.split(",")
        bad = [s for s in systems if s not in SYSTEMS]
        if bad:
            ap.error(f"--systems: unknown {bad}; choose from {', '.join(SYSTEMS)}")
    else:
        systems = [s for s in SYSTEMS if s != "eeserve-auto"]
        try:
            import llama_cpp  # noqa: F401
        except ImportError:
            print("llama-cpp-python is not installed: llama.cpp batch-1 runs skipped", file=sys.stderr)
            systems = [s for s in systems if not s.startswith("llama.cpp")]
        if not args.llama_server:
            print("no llama-server binary (--llama-server or PATH): llama-server runs skipped", file=sys.stderr)
            systems = [s for s in systems if not s.startswith("llama-server")]
    runs: dict[str, list[dict]] = {s: [] for s in systems}
    for rep in range(args.repeats):
        order = systems[rep % len(systems):] + systems[: rep % len(systems)]  # rotate who goes first
        for s in order:
            r = spawn(s, args)
            runs[s].append(r)
            print(f"[{rep + 1}/{args.repeats}] {s}: " + json.dumps({k: (round(v, 1) if isinstance(v, float) else v)
                                                                    for k, v in r.items() if k != "batch1_runs"}),
                  flush=True)
    print(table(runs, args))
    if args.out:
        Path(args.out).write_text(json.dumps({"cpu": cpu_line(), "runs": runs}, indent=1))


if __name__ == "__main__":
    main()
