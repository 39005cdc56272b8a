"""Prometheus metrics of the server (prefix ``eeserve:``, label ``model_name``), vLLM-style names.

Engine-wide figures (queues, KV usage, token counters, exits, FLOPs) are read from the engine
thread's last ``EngineSnapshot`` at scrape time; per-request latencies are histograms observed by
the server as outputs arrive. Each app has its own ``CollectorRegistry``.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable

from prometheus_client import CollectorRegistry, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from eeserve.engine.async_engine import EngineSnapshot
from eeserve.outputs import RequestOutput

P = "eeserve:"
CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"

_LATENCY_BUCKETS = (0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0, 40.0, 80.0)
_E2E_BUCKETS = (0.1, 0.3, 0.5, 1.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 60.0, 120.0, 300.0)


class _EngineCollector(Collector):
    """Reads the engine snapshot at scrape time."""

    def __init__(self, model_name: str, snapshot: Callable[[], EngineSnapshot]) -> None:
        self.model_name = model_name
        self.snapshot = snapshot

    def collect(self) -> Iterable[Metric]:
        s = self.snapshot()
        m = [self.model_name]

        def gauge(name: str, doc: str, value: float) -> GaugeMetricFamily:
            g = GaugeMetricFamily(P + name, doc, labels=["model_name"])
            g.add_metric(m, value)
            return g

        def counter(name: str, doc: str, value: float) -> CounterMetricFamily:
            c = CounterMetricFamily(P + name, doc, labels=["model_name"])
            c.add_metric(m, value)
            return c

        yield gauge("num_requests_running", "Requests in the running batch.", s.num_running)
        yield gauge("num_requests_waiting", "Requests waiting to be scheduled.", s.num_waiting)
        yield gauge("kv_cache_usage_perc", "KV cache usage (used blocks / all blocks), 0..1.", s.kv_cache_usage)
        yield counter("prompt_tokens", "Prompt tokens admitted.", s.num_prompt_tokens)
        yield counter("generation_tokens", "Tokens generated.", s.num_generation_tokens)
        yield counter("num_preemptions", "Preemptions (a request's KV freed and recomputed later).", s.num_preemptions)

        exits = CounterMetricFamily(
            P + "exit_tokens", "Generated tokens by the layer whose head made them (num_layers = full depth, "
            "where each sequence's first token is made); sums to generation_tokens.",
            labels=["model_name", "exit_layer"],
        )
        for e in sorted(s.exits):
            exits.add_metric([self.model_name, str(e)], s.exits[e])
        yield exits
        total = sum(s.exits.values())
        mean = sum(e * n for e, n in s.exits.items()) / total if total else float(s.num_layers)
        yield gauge("mean_layers_per_token", "Mean layers run per generated token since start.", mean)
        yield counter("decode_flops", "FLOPs spent on decode tokens.", s.decode_flops)
        yield counter("decode_full_depth_flops", "FLOPs decode tokens would cost at full depth.", s.decode_full_flops)
        yield counter(
            "flops_saved", "Decode FLOPs saved by early exit (full depth - spent; may be negative).",
            s.decode_full_flops - s.decode_flops,
        )
        ratio = 1.0 - s.decode_flops / s.decode_full_flops if s.decode_full_flops > 0 else 0.0
        yield gauge("flops_saved_ratio", "Share of decode FLOPs saved by early exit since start.", ratio)
        yield counter("draft_tokens_accepted", "verify_exits: early-exit tokens the full model agreed with.",
                      s.num_drafts_accepted)
        yield counter("draft_tokens_rejected", "verify_exits: early-exit tokens replaced by the full model's.",
                      s.num_drafts_rejected)


class ServerMetrics:
    """All metrics of one app.

    Args:
        model_name: the ``model_name`` label value (the served model name).
        snapshot: returns the engine's latest ``EngineSnapshot``.
        num_layers: decoder layers (bounds of the exit layer histogram).
    """

    def __init__(self, model_name: str, snapshot: Callable[[], EngineSnapshot], num_layers: int) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        self.model_name = model_name
        self.registry.register(_EngineCollector(model_name, snapshot))
        labels = ["model_name"]
        self.ttft = Histogram(
            P + "time_to_first_token_seconds", "Time to first token.", labels,
            buckets=_LATENCY_BUCKETS, registry=self.registry,
        ).labels(model_name)
        self.itl = Histogram(
            P + "inter_token_latency_seconds", "Time between consecutive output tokens.", labels,
            buckets=_LATENCY_BUCKETS, registry=self.registry,
        ).labels(model_name)
        self.e2e = Histogram(
            P + "e2e_request_latency_seconds", "End-to-end latency of each finished sequence (each of n choices).",
            labels,
            buckets=_E2E_BUCKETS, registry=self.registry,
        ).labels(model_name)
        self.exit_layer = Histogram(
            P + "exit_layer", "Layers run per generated token (its exit layer).", labels,
            buckets=tuple(float(i) for i in range(1, num_layers + 1)), registry=self.registry,
        ).labels(model_name)
        self.request_layers = Histogram(
            P + "request_mean_layers_per_token", "Mean layers per token of each finished request.", labels,
            buckets=tuple(float(i) for i in range(1, num_layers + 1)), registry=self.registry,
        ).labels(model_name)
        self.request_success = CounterByReason(self.registry, model_name)

    def export(self) -> bytes:
        return generate_latest(self.registry)

    def tracker(self) -> RequestTracker:
        return RequestTracker(self)


class CounterByReason:
    """``eeserve:request_success_total{finished_reason}``."""

    def __init__(self, registry: CollectorRegistry, model_name: str) -> None:
        from prometheus_client import Counter

        self._c = Counter(
            P + "request_success", "Finished sequences (each of n choices) by finish reason.", ["model_name", "finished_reason"],
            registry=registry,
        )
        self.model_name = model_name

    def inc(self, reason: str) -> None:
        self._c.labels(self.model_name, reason).inc()


class RequestTracker:
    """Observes one request's latencies from its stream of cumulative outputs."""

    def __init__(self, metrics: ServerMetrics) -> None:
        self.m = metrics
        self.start = time.time()
        self.last_time: float | None = None
        self.num_tokens: dict[int, int] = {}
        self.finished: set[int] = set()  # choice indexes already counted as finished
        self.done = False

    def observe(self, out: RequestOutput) -> None:
        now = time.time()
        new = 0
        for c in out.outputs:
            prev = self.num_tokens.get(c.index, 0)
            new += len(c.token_ids) - prev
            self.num_tokens[c.index] = len(c.token_ids)
        if new > 0:
            if self.last_time is None:
                self.m.ttft.observe(now - out.metrics.arrival_time)
            else:
                self.m.itl.observe(now - self.last_time)
            self.last_time = now
        # e2e latency and request_success count the same unit: sequences (each of a request's n
        # choices, as vLLM counts its child requests), each when it finishes
        for c in out.outputs:
            if c.index in self.finished or (c.finish_reason is None and not out.finished):
                continue
            self.finished.add(c.index)
            self.m.e2e.observe(now - out.metrics.arrival_time)
            for e in c.exit_layers:
                self.m.exit_layer.observe(e)
            self.m.request_success.inc(c.finish_reason or "abort")
        if out.finished and not self.done:
            self.done = True
            if out.metrics.mean_layers_per_token is not None:
                self.m.request_layers.observe(out.metrics.mean_layers_per_token)
