"""Prometheus metrics of one server, in their own registry (several apps can live in one process).

Caller: app.serving records each finished request (`observe_request`); app.routes.ops renders the
text format after copying the engine's latest SchedulerStats into the gauges; app.server's
throughput logger reads the token counters every 10 s. Names follow vLLM's with our prefix.
"""

from __future__ import annotations

from dataclasses import dataclass

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

from engine.protocol import SchedulerStats

PREFIX = "vlserve:"
LATENCY_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 20.0, 40.0, 80.0, 160.0)
TOKEN_LATENCY_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0)


@dataclass
class RequestTiming:
    """Wall-clock marks of one request (time.monotonic seconds)."""

    arrival: float
    first_token: float | None = None
    finished: float | None = None


class ServerMetrics:
    def __init__(self, model_name: str) -> None:
        self.registry = CollectorRegistry()
        labels, self._model = ["model_name"], model_name
        gauge = lambda name, doc: Gauge(PREFIX + name, doc, labels, registry=self.registry)  # noqa: E731
        counter = lambda name, doc: Counter(PREFIX + name, doc, labels, registry=self.registry)  # noqa: E731
        self.num_requests_running = gauge("num_requests_running", "Requests in the running batch.")
        self.num_requests_waiting = gauge("num_requests_waiting", "Requests waiting to be scheduled.")
        self.kv_cache_usage = gauge("kv_cache_usage_perc", "Fraction of KV-cache blocks in use (0..1).")
        self.prompt_tokens = counter("prompt_tokens", "Prompt tokens of finished requests.")
        self.generation_tokens = counter("generation_tokens", "Generated tokens of finished requests.")
        self.request_success = Counter(PREFIX + "request_success", "Finished requests by finish reason.",
                                       ["model_name", "finished_reason"], registry=self.registry)
        histogram = lambda name, doc, buckets: Histogram(  # noqa: E731
            PREFIX + name, doc, labels, buckets=buckets, registry=self.registry)
        self.ttft = histogram("time_to_first_token_seconds", "Time to first token.", LATENCY_BUCKETS)
        self.tpot = histogram("time_per_output_token_seconds", "Time per output token after the first.",
                              TOKEN_LATENCY_BUCKETS)
        self.e2e = histogram("e2e_request_latency_seconds", "End-to-end request latency.", LATENCY_BUCKETS)
        self.total_prompt_tokens = 0
        self.total_generation_tokens = 0

    def set_engine_stats(self, stats: SchedulerStats | None) -> None:
        if stats is None:
            return
        self.num_requests_running.labels(self._model).set(stats.num_running_reqs)
        self.num_requests_waiting.labels(self._model).set(stats.num_waiting_reqs)
        self.kv_cache_usage.labels(self._model).set(stats.kv_cache_usage)

    def observe_request(self, timing: RequestTiming, num_prompt_tokens: int, num_generation_tokens: int,
                        finish_reasons: list[str]) -> None:
        self.prompt_tokens.labels(self._model).inc(num_prompt_tokens)
        self.generation_tokens.labels(self._model).inc(num_generation_tokens)
        self.total_prompt_tokens += num_prompt_tokens
        self.total_generation_tokens += num_generation_tokens
        for reason in finish_reasons:
            self.request_success.labels(self._model, reason or "abort").inc()
        if timing.first_token is not None:
            self.ttft.labels(self._model).observe(timing.first_token - timing.arrival)
        if timing.finished is not None:
            self.e2e.labels(self._model).observe(timing.finished - timing.arrival)
            if timing.first_token is not None and num_generation_tokens > 1:
                per_token = (timing.finished - timing.first_token) / (num_generation_tokens - 1)
                self.tpot.labels(self._model).observe(per_token)

    def render(self) -> bytes:
        return generate_latest(self.registry)
