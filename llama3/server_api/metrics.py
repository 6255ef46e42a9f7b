"""GET /metrics: the server's counters in Prometheus' text format, through prometheus-client.

    llama3_requests_total{endpoint}              requests accepted (after validation)
    llama3_prompt_tokens_total                   prompt tokens read
    llama3_generation_tokens_total               tokens generated
    llama3_time_to_first_token_seconds           request accepted -> first text (histogram)
    llama3_time_per_output_token_seconds         mean gap between tokens after the first, per request
    llama3_queue_depth                           requests waiting for the model
    llama3_running_sequences                     sequences generating now
    llama3_cache_<name>                          what `cache_stats()` reports (the engine's KV blocks
                                                 and prefix-cache use), one gauge per key
    llama3_kernel_calls_total                    calls of the C++ kernels' thread pool (llama3/fast/threads.h)
    llama3_kernel_calls_one_thread_total         of them run on the calling thread alone: a worker had
                                                 lost time, not running (another process has a core)
    llama3_kernel_waits_total                    times a call waited for a worker that was not running
    llama3_kernel_lost_seconds_total             the time those waits lost
                                                 (the kernel_* ones only once the C++ kernels are loaded)

Each app has its own CollectorRegistry (several servers in one process do not mix counts).
The queue's numbers are read when scraped; so is `cache_stats`, the hook the server fills from the
engine (`GenerationQueue.cache_stats`: {"kv_blocks_used": 12, "kv_blocks_free": 500, "prefix_cache_hits": 3, ...}).
"""

from __future__ import annotations

import time
from typing import Callable

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

from llama3.fast import kernels

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)


class Metrics:
    def __init__(self, queue, cache_stats: Callable[[], dict] | None = None):
        self.queue, self.cache_stats = queue, cache_stats
        self.registry = CollectorRegistry()
        self.requests = Counter("llama3_requests", "Requests accepted", ["endpoint"], registry=self.registry)
        self.prompt_tokens = Counter("llama3_prompt_tokens", "Prompt tokens read", registry=self.registry)
        self.generation_tokens = Counter("llama3_generation_tokens", "Tokens generated", registry=self.registry)
        self.first_token = Histogram("llama3_time_to_first_token_seconds", "Request accepted to first text",
                                     buckets=LATENCY_BUCKETS, registry=self.registry)
        self.per_token = Histogram("llama3_time_per_output_token_seconds",
                                   "Mean time between tokens after the first, per request",
                                   buckets=LATENCY_BUCKETS, registry=self.registry)
        self.registry.register(_LiveGauges(self))

    def request(self, endpoint: str, prompt_tokens: int) -> "RequestTimer":
        self.requests.labels(endpoint=endpoint).inc()
        self.prompt_tokens.inc(prompt_tokens)
        return RequestTimer(self)

    def exposition(self) -> bytes:
        return generate_latest(self.registry)


class RequestTimer:
    """One request's clock: `text()` on each piece of text, `done(tokens)` at the end."""

    def __init__(self, metrics: Metrics):
        self.metrics, self.start, self.first = metrics, time.perf_counter(), None

    def text(self) -> None:
        if self.first is None:
            self.first = time.perf_counter()
            self.metrics.first_token.observe(self.first - self.start)

    def done(self, tokens: int) -> None:
        self.metrics.generation_tokens.inc(tokens)
        if self.first is not None and tokens > 1:
            self.metrics.per_token.observe((time.perf_counter() - self.first) / (tokens - 1))


# the C++ kernels' thread pool (kernels.thread_stats): a busy machine shows as calls run on one thread
KERNEL_COUNTERS = (
    ("llama3_kernel_calls", "jobs", "Calls of the C++ kernels' thread pool"),
    ("llama3_kernel_calls_one_thread", "solo_jobs",
     "Kernel calls run on the calling thread alone after a worker lost time (another process had its core)"),
    ("llama3_kernel_waits", "losses", "Times a kernel call waited for a worker thread that was not running"),
    ("llama3_kernel_lost_seconds", "lost_seconds", "Seconds those waits lost"),
)


class _LiveGauges:
    """Gauges read at scrape time from the queue (and the engine's cache_stats hook)."""

    def __init__(self, metrics: Metrics):
        self.metrics = metrics

    def describe(self):
        return []  # nothing fixed to register ahead: the values are read in collect()

    def collect(self):
        stats = self.metrics.queue.stats()
        running = int(stats.get("running_sequences", stats.get("running", 0)))  # the engine: sequences now
        yield GaugeMetricFamily("llama3_queue_depth", "Requests waiting for the model", value=stats.get("queued", 0))
        yield GaugeMetricFamily("llama3_running_sequences", "Sequences generating now", value=running)
        if self.metrics.cache_stats is not None:
            for name, value in self.metrics.cache_stats().items():
                yield GaugeMetricFamily(f"llama3_cache_{name}", f"engine cache: {name}", value=value)
        pool = kernels.thread_stats(build=False)  # None unless the C++ kernels are loaded
        if pool is not None:
            for name, key, help_text in KERNEL_COUNTERS:
                yield CounterMetricFamily(name, help_text, value=pool[key])
