"""Prometheus metrics of one server, with vLLM's names under the `carpool:` prefix.

Each server owns its registry (no process-global state, so tests can run several servers). Engine
counters and gauges are read from the engine's latest stats snapshot when /metrics is scraped, so they
are exactly the engine's numbers; latency histograms are observed as requests stream and finish.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from carpool.engine.core import EngineStats
from carpool.outputs import RequestMetrics

PREFIX = "carpool:"
CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"

# Buckets follow vLLM's: sub-millisecond steps up to minutes for whole requests.
TTFT_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0,
                20.0, 40.0, 80.0, 160.0, 640.0, 2560.0)
TOKEN_BUCKETS = (0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0,
                 20.0, 40.0, 80.0)
REQUEST_BUCKETS = (0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0, 60.0,
                   120.0, 240.0, 480.0, 960.0, 1920.0, 7680.0)


class _EngineStatsCollector(Collector):
    """Turns the engine's cumulative stats into gauges and counters at scrape time."""

    def __init__(self, stats: Callable[[], EngineStats], model_name: str) -> None:
        self._stats = stats
        self._model_name = model_name

    def collect(self) -> Iterator[Metric]:
        s = self._stats()
        labels = ["model_name"]
        values = [self._model_name]

        def gauge(name: str, doc: str, value: float) -> GaugeMetricFamily:
            g = GaugeMetricFamily(PREFIX + name, doc, labels=labels)
            g.add_metric(values, value)
            return g

        def counter(name: str, doc: str, value: float) -> CounterMetricFamily:
            c = CounterMetricFamily(PREFIX + name, doc, labels=labels)
            c.add_metric(values, value)
            return c

        yield gauge("num_requests_running", "Number of requests in the running batch.", s.num_running)
        yield gauge("num_requests_waiting", "Number of requests waiting to be scheduled.", s.num_waiting)
        yield gauge("kv_cache_usage_perc", "KV cache usage: fraction of blocks held by requests (1 = full).",
                    s.kv_cache_usage)
        yield gauge("kv_cache_blocks", "KV cache size in blocks (blocks held = this x kv_cache_usage_perc).",
                    s.num_kv_blocks)
        yield counter("prompt_tokens", "Prompt tokens received (each of n sequences counted).", s.prompt_tokens)
        yield counter("generation_tokens", "Tokens generated.", s.generation_tokens)
        yield counter("num_preemptions", "Requests preempted for lack of KV blocks.", s.num_preemptions)
        yield counter("prefix_cache_queries", "Prompt tokens looked up in the prefix cache.",
                      s.prefix_cache_queries)
        yield counter("prefix_cache_hits", "Prompt tokens found in the prefix cache.", s.prefix_cache_hits)
        if s.spec_decode_num_accepted_tokens_per_pos:  # speculative decoding is configured
            yield from spec_decode_metrics(s, labels, values)


def spec_decode_metrics(s: EngineStats, labels: list[str], values: list[str]) -> Iterator[Metric]:
    """vLLM's speculative decoding counters. Acceptance rate = accepted / draft tokens; mean accepted
    length = accepted tokens / drafts (each verification also emits one token of the target's own)."""
    for name, doc, value in (
            ("spec_decode_num_drafts", "Verifications: a request checking its proposed tokens in one step.",
             s.spec_decode_num_drafts),
            ("spec_decode_num_draft_tokens", "Proposed tokens verified.", s.spec_decode_num_draft_tokens),
            ("spec_decode_num_accepted_tokens", "Proposed tokens accepted.", s.spec_decode_num_accepted_tokens)):
        c = CounterMetricFamily(PREFIX + name, doc, labels=labels)
        c.add_metric(values, value)
        yield c
    per_pos = CounterMetricFamily(PREFIX + "spec_decode_num_accepted_tokens_per_pos",
                                  "Verifications that accepted the proposed token at each position.",
                                  labels=[*labels, "position"])
    for position, value in enumerate(s.spec_decode_num_accepted_tokens_per_pos):
        per_pos.add_metric([*values, str(position)], value)
    yield per_pos


class ServerMetrics:
    """The registry of one server; implements the engine client's OutputObserver."""

    def __init__(self, stats: Callable[[], EngineStats], model_name: str) -> None:
        self.registry = CollectorRegistry()
        self.registry.register(_EngineStatsCollector(stats, model_name))
        self._model_name = model_name

        def histogram(name: str, doc: str, buckets: tuple[float, ...]) -> Histogram:
            return Histogram(PREFIX + name, doc, ["model_name"], buckets=buckets,
                             registry=self.registry).labels(model_name)

        self.time_to_first_token = histogram("time_to_first_token_seconds",
                                             "Time from arrival to the first generated token.", TTFT_BUCKETS)
        self.time_per_output_token = histogram("time_per_output_token_seconds",
                                               "Mean time per output token after the first, per request.",
                                               TOKEN_BUCKETS)
        self.inter_token_latency = histogram("inter_token_latency_seconds",
                                             "Time between two consecutive outputs of a request.", TOKEN_BUCKETS)
        self.e2e_request_latency = histogram("e2e_request_latency_seconds",
                                             "Time from arrival to the last token.", REQUEST_BUCKETS)
        self.request_queue_time = histogram("request_queue_time_seconds",
                                            "Time from arrival to the first scheduled step.", REQUEST_BUCKETS)
        self.request_success = Counter(PREFIX + "request_success", "Requests that finished, by reason.",
                                       ["model_name", "finished_reason"], registry=self.registry)

    def observe_inter_token_latency(self, seconds: float) -> None:
        self.inter_token_latency.observe(seconds)

    def observe_finished(self, metrics: RequestMetrics, num_output_tokens: int, finish_reason: str | None
                         ) -> None:
        if metrics.time_to_first_token is not None:
            self.time_to_first_token.observe(metrics.time_to_first_token)
        if metrics.queue_time is not None:
            self.request_queue_time.observe(metrics.queue_time)
        if metrics.finished_time is not None:
            self.e2e_request_latency.observe(metrics.finished_time - metrics.arrival_time)
        if (num_output_tokens > 1 and metrics.first_token_time is not None
                and metrics.last_token_time is not None):
            self.time_per_output_token.observe(
                (metrics.last_token_time - metrics.first_token_time) / (num_output_tokens - 1))
        self.request_success.labels(self._model_name, finish_reason or "unknown").inc()

    def render(self) -> bytes:
        return generate_latest(self.registry)
