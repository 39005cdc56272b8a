"""``eeserve bench serve``: load-test a running server, early exit on and off, side by side.

Sends the same prompts twice through streaming /v1/completions (Poisson arrivals at
``--request-rate``, at most ``--max-concurrency`` in flight): once with ``early_exit: {"enabled":
true}`` and once with ``{"enabled": false}``. Reports request throughput, output tokens/s, time
to first token (TTFT), time per output token (TPOT, after the first) and inter-token latency
(ITL), each as mean / p50 / p99, plus the exit statistics from each choice's ``exit_layers``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import time
from dataclasses import dataclass, field

_DEFAULT_PROMPTS = (
    "The capital of France is",
    "Write a short poem about the sea.",
    "Explain what a hash table is in one paragraph.",
    "List three uses of early-exit language models:",
    "Once upon a time, in a small village,",
    "The three primary colors are",
    "Translate to French: The cat sleeps on the mat.",
    "def fibonacci(n):",
)


def add_cli_args(parser: argparse.ArgumentParser) -> None:
    """Flags of ``eeserve bench serve``."""
    parser.add_argument("--base-url", default="http://127.0.0.1:8000", help="server address (default http://127.0.0.1:8000)")
    parser.add_argument("--model", default=None, help="model name to send (default: the server's first model)")
    parser.add_argument("--api-key", default=None, help="bearer token, when the server needs one")
    parser.add_argument("--num-prompts", type=int, default=32, help="requests per run (default 32)")
    parser.add_argument("--request-rate", type=float, default=float("inf"),
                        help="requests per second, Poisson arrivals (default inf: all at once)")
    parser.add_argument("--max-concurrency", type=int, default=None, help="most requests in flight (default: no limit)")
    parser.add_argument("--max-tokens", type=int, default=64, help="output tokens per request (default 64)")
    parser.add_argument("--prompts-file", default=None, help="text file, one prompt per line (default: built-in prompts)")
    parser.add_argument("--threshold", type=float, default=None, help="per-request early-exit threshold for the 'on' run")
    parser.add_argument("--seed", type=int, default=0, help="seed of the arrival times (default 0)")
    parser.add_argument("--modes", default="on,off", help="runs to do, in order: on, off or on,off (default)")
    parser.add_argument("--json", dest="json_out", default=None, help="also write the results to this JSON file")


@dataclass
class RequestResult:
    """One request's timings (seconds) and tokens."""

    ok: bool
    latency: float = 0.0
    ttft: float = 0.0
    itls: list[float] = field(default_factory=list)
    num_output_tokens: int = 0
    exit_layers: list[int] = field(default_factory=list)
    error: str = ""


@dataclass
class RunResult:
    mode: str
    duration: float
    requests: list[RequestResult]


def _pct(xs: list[float], q: float) -> float:
    if not xs:
        return float("nan")
    s = sorted(xs)
    k = min(len(s) - 1, max(0, round(q / 100 * (len(s) - 1))))
    return s[k]


def _mean(xs: list[float]) -> float:
    return sum(xs) / len(xs) if xs else float("nan")


async def _one(client, url: str, body: dict, headers: dict) -> RequestResult:
    start = time.perf_counter()
    last = start
    res = RequestResult(ok=False)
    try:
        async with client.stream("POST", url, json=body, headers=headers) as r:
            if r.status_code != 200:
                res.error = f"HTTP {r.status_code}: {(await r.aread())[:200]!r}"
                return res
            async for line in r.aiter_lines():
                if not line.startswith("data: "):
                    continue
                data = line[6:]
                if data == "[DONE]":
                    break
                chunk = json.loads(data)
                if "error" in chunk:
                    res.error = chunk["error"].get("message", "error")
                    return res
                if chunk.get("usage"):
                    res.num_output_tokens = chunk["usage"]["completion_tokens"]
                for ch in chunk.get("choices", []):
                    exits = ch.get("exit_layers") or []
                    if not exits:
                        continue
                    now = time.perf_counter()
                    if not res.exit_layers:
                        res.ttft = now - start
                    else:
                        res.itls.append((now - last) / len(exits))
                    last = now
                    res.exit_layers.extend(exits)
        res.latency = time.perf_counter() - start
        res.num_output_tokens = res.num_output_tokens or len(res.exit_layers)
        res.ok = True
    except Exception as e:  # noqa: BLE001 - a failed request is counted, not fatal
        res.error = repr(e)
    return res


async def _run(args, model: str, prompts: list[str], mode: str, headers: dict) -> RunResult:
    import httpx

    rng = random.Random(args.seed)
    sem = asyncio.Semaphore(args.max_concurrency) if args.max_concurrency else None
    ee: dict = {"enabled": mode == "on"}
    if mode == "on" and args.threshold is not None:
        ee["threshold"] = args.threshold
    url = args.base_url.rstrip("/") + "/v1/completions"

    async def limited(client, body):
        if sem is None:
            return await _one(client, url, body, headers)
        async with sem:
            return await _one(client, url, body, headers)

    limits = httpx.Limits(max_connections=max(args.max_concurrency or args.num_prompts, 1))
    async with httpx.AsyncClient(timeout=httpx.Timeout(None), limits=limits) as client:
        tasks = []
        start = time.perf_counter()
        for i in range(args.num_prompts):
            body = {
                "model": model, "prompt": prompts[i % len(prompts)], "max_tokens": args.max_tokens,
                "temperature": 0, "ignore_eos": True, "stream": True,
                "stream_options": {"include_usage": True}, "early_exit": ee,
            }
            tasks.append(asyncio.ensure_future(limited(client, body)))
            if args.request_rate != float("inf") and i + 1 < args.num_prompts:
                await asyncio.sleep(rng.expovariate(args.request_rate))
        results = await asyncio.gather(*tasks)
        return RunResult(mode, time.perf_counter() - start, list(results))


def summarize(run: RunResult) -> dict:
    """The figures of one run (times in ms)."""
    ok = [r for r in run.requests if r.ok]
    out_tokens = sum(r.num_output_tokens for r in ok)
    ttft = [1000 * r.ttft for r in ok]
    tpot = [1000 * (r.latency - r.ttft) / (r.num_output_tokens - 1) for r in ok if r.num_output_tokens > 1]
    itl = [1000 * x for r in ok for x in r.itls]
    exits = [e for r in ok for e in r.exit_layers]
    hist: dict[int, int] = {}
    for e in exits:
        hist[e] = hist.get(e, 0) + 1
    s = {
        "mode": run.mode,
        "completed": len(ok),
        "failed": len(run.requests) - len(ok),
        "duration_s": run.duration,
        "request_throughput": len(ok) / run.duration if run.duration > 0 else 0.0,
        "output_throughput": out_tokens / run.duration if run.duration > 0 else 0.0,
        "total_output_tokens": out_tokens,
        "mean_layers_per_token": _mean([float(e) for e in exits]),
        "exit_histogram": dict(sorted(hist.items())),
        "errors": [r.error for r in run.requests if not r.ok][:3],
    }
    for name, xs in (("ttft_ms", ttft), ("tpot_ms", tpot), ("itl_ms", itl)):
        s[f"mean_{name}"], s[f"p50_{name}"], s[f"p99_{name}"] = _mean(xs), _pct(xs, 50), _pct(xs, 99)
    return s


def format_table(summaries: list[dict]) -> str:
    """Side-by-side table of the runs."""
    rows = [
        ("Successful requests", "completed", "{:.0f}"),
        ("Failed requests", "failed", "{:.0f}"),
        ("Benchmark duration (s)", "duration_s", "{:.2f}"),
        ("Request throughput (req/s)", "request_throughput", "{:.2f}"),
        ("Output token throughput (tok/s)", "output_throughput", "{:.2f}"),
        ("Total output tokens", "total_output_tokens", "{:.0f}"),
    ]
    for name, label in (("ttft_ms", "TTFT (ms)"), ("tpot_ms", "TPOT (ms)"), ("itl_ms", "ITL (ms)")):
        for stat in ("mean", "p50", "p99"):
            rows.append((f"{stat.capitalize()} {label}", f"{stat}_{name}", "{:.2f}"))
    rows.append(("Mean layers per token", "mean_layers_per_token", "{:.2f}"))
    heads = [f"early exit {s['mode']}" for s in summaries]
    w0 = max(len(r[0]) for r in rows) + 2
    lines = [f"{'':<{w0}}" + "".join(f"{h:>18}" for h in heads), "-" * (w0 + 18 * len(heads))]
    for label, key, fmt in rows:
        lines.append(f"{label:<{w0}}" + "".join(f"{fmt.format(s[key]):>18}" for s in summaries))
    lines.extend(_ratio_lines(summaries, w0))
    for s in summaries:
        hist = ", ".join(f"{e}:{n}" for e, n in s["exit_histogram"].items()) or "-"
        lines.append(f"exit layers (layer:tokens), early exit {s['mode']}: {hist}")
        for err in s["errors"]:
            lines.append(f"  error ({s['mode']}): {err}")
    return "\n".join(lines)


def made_early_exits(on: dict, off: dict) -> bool:
    """Whether the early-exit run left any token before the depth every token of the other
    (early exit off, full depth) run used."""
    full = max(off["exit_histogram"], default=None)
    return full is not None and any(e < full for e in on["exit_histogram"])


def _ratio_lines(summaries: list[dict], w0: int) -> list[str]:
    """The throughput ratio of two runs, labelled for what it measures.

    A ratio is a speed-up only when the runs did different work. Two runs with the same settings,
    or an early-exit run in which no token left early, did the same work: their ratio shows only
    how much this machine's timing varies (an A/A comparison), and is labelled so.
    """
    if len(summaries) != 2 or summaries[1]["output_throughput"] <= 0:
        return []
    a, b = summaries
    ratio = a["output_throughput"] / b["output_throughput"]
    band = f"{100 * abs(ratio - 1):.0f}%"
    if a["mode"] == b["mode"]:
        return [f"{'A/A ratio (same settings: noise)':<{w0}}{ratio:>18.2f}x",
                f"the two runs did the same work: differences up to about {band} are this machine's noise"]
    on, off = (a, b) if a["mode"] == "on" else (b, a)
    if not made_early_exits(on, off):
        return [f"{'Speed-up':<{w0}}{'none':>18}",
                f"no token exited early (every token ran all layers in both runs), so the runs did the same work: "
                f"their throughput ratio {ratio:.2f}x (first/second) is noise, not a speed-up "
                f"(an A/A band of about {band})"]
    return [f"{'Speed-up (output tok/s, first/second)':<{w0}}{ratio:>18.2f}x"]


def _load_prompts(path: str | None) -> list[str]:
    if path is None:
        return list(_DEFAULT_PROMPTS)
    with open(path, encoding="utf-8") as f:
        prompts = [line.rstrip("\n") for line in f if line.strip()]
    if not prompts:
        raise ValueError(f"--prompts-file {path} holds no prompts")
    return prompts


def _server_model(base_url: str, headers: dict) -> str:
    """The first model a server lists; first, whether a server answers at all.

    Raises:
        ValueError: naming --base-url (nothing listening, not an eeserve/OpenAI server) or
            --api-key (refused).
    """
    import httpx

    url = base_url.rstrip("/") + "/v1/models"
    try:
        r = httpx.get(url, headers=headers, timeout=30)
    except httpx.InvalidURL as e:
        raise ValueError(f"--base-url {base_url!r} is not a valid URL ({e})") from None
    except httpx.UnsupportedProtocol:
        raise ValueError(f"--base-url {base_url!r} must start with http:// or https://") from None
    except httpx.HTTPError as e:
        raise ValueError(f"--base-url {base_url}: no server answers there ({type(e).__name__}: {e}); "
                         "start one with `eeserve serve`, or pass its address") from None
    if r.status_code == 401:
        raise ValueError(f"--api-key: the server at {base_url} refused the key (HTTP 401)")
    try:
        r.raise_for_status()
        return str(r.json()["data"][0]["id"])
    except (httpx.HTTPError, ValueError, KeyError, IndexError, TypeError) as e:
        raise ValueError(f"--base-url {base_url}: GET /v1/models did not list a model (HTTP {r.status_code}: "
                         f"{type(e).__name__}); is it an OpenAI-compatible server?") from None


def main(args: argparse.Namespace) -> int:
    """Run the benchmark; returns the exit status (1 if any request failed)."""
    if args.num_prompts < 1:
        raise ValueError("--num-prompts must be >= 1")
    if args.request_rate <= 0:
        raise ValueError("--request-rate must be > 0 (inf: all at once)")
    modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    if not modes or any(m not in ("on", "off") for m in modes):
        raise ValueError(f"--modes must be on, off or on,off; got {args.modes!r}")
    headers = {"Authorization": f"Bearer {args.api_key}"} if args.api_key else {}
    model = _server_model(args.base_url, headers)
    if args.model is not None:
        model = args.model
    prompts = _load_prompts(args.prompts_file)
    summaries = []
    for mode in modes:
        run = asyncio.run(_run(args, model, prompts, mode, headers))
        summaries.append(summarize(run))
    print(f"eeserve bench serve: {args.num_prompts} prompts, rate {args.request_rate} req/s, "
          f"max concurrency {args.max_concurrency or 'unlimited'}, {args.max_tokens} output tokens each, model {model}")
    print(format_table(summaries))
    if args.json_out:
        with open(args.json_out, "w", encoding="utf-8") as f:
            json.dump(summaries, f, indent=2)
    return 1 if any(s["failed"] for s in summaries) else 0
