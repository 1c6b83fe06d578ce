"""`GET /metrics`: the server's counters and the runtime's `Stats`, in Prometheus text format.

Request counters live in this module's registry; the expert-cache figures are read from a fresh
`Stats` snapshot at every scrape (a custom collector), so they are never stale and never kept twice.
See docs/serve.md for the list.
"""

from __future__ import annotations

from collections.abc import Callable

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

from ..stats import Stats

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
LATENCY_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300)


class ServerMetrics:
    def __init__(
        self,
        stats: Callable[[], Stats | None],
        queue_depth: Callable[[], int],
        running: Callable[[], int],
        capacity: int,
    ):
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter(
            "localmoe_requests", "HTTP requests answered, by endpoint and status code", ["endpoint", "code"], registry=r
        )
        self.generations = Counter(
            "localmoe_generations",
            "Generations run, by how they ended (completed, cancelled: the client left, failed)",
            ["outcome"],
            registry=r,
        )
        self.prompt_tokens = Counter(
            "localmoe_prompt_tokens", "Prompt tokens of the generations run (tokens in)", registry=r
        )
        self.completion_tokens = Counter("localmoe_completion_tokens", "Tokens generated (tokens out)", registry=r)
        self.cancel_overrun = Counter(
            "localmoe_cancel_overrun_tokens",
            (
                "Tokens that were being made when their client disconnected (the worker checks before each next "
                "token: at most one per cancelled generation)"
            ),
            registry=r,
        )
        self.latency = Histogram(
            "localmoe_request_duration_seconds",
            "Seconds from admission to the last token of a generation (queueing included)",
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.first_token = Histogram(
            "localmoe_time_to_first_token_seconds",
            "Seconds from admission to the first generated token (queueing and prompt included)",
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.queue_wait = Histogram(
            "localmoe_queue_wait_seconds",
            "Seconds a generation waited for the model",
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        r.register(_RuntimeCollector(stats, queue_depth, running, capacity))

    def render(self) -> bytes:
        return generate_latest(self.registry)


class _RuntimeCollector(Collector):
    def __init__(
        self,
        stats: Callable[[], Stats | None],
        queue_depth: Callable[[], int],
        running: Callable[[], int],
        capacity: int,
    ):
        self._stats, self._depth, self._running, self._capacity = stats, queue_depth, running, capacity

    def collect(self):
        yield GaugeMetricFamily("localmoe_queue_depth", "Requests waiting for the model", value=self._depth())
        yield GaugeMetricFamily("localmoe_queue_capacity", "Requests that may wait (--queue)", value=self._capacity)
        yield GaugeMetricFamily("localmoe_requests_running", "Generations running now (0 or 1)", value=self._running())
        st = self._stats()
        yield GaugeMetricFamily("localmoe_model_loaded", "1 once the model is loaded", value=int(st is not None))
        if st is None:
            return
        yield CounterMetricFamily(
            "localmoe_model_tokens",
            "Tokens run through the model, prompt and generated (a reused prompt prefix is not run again)",
            value=st.tokens,
        )
        for name, help_, modelled, measured in (
            (
                "localmoe_prompt_tokens_per_second",
                "Prompt tokens per second of the last generation, on the runtime's clock (label clock)",
                st.prompt_tps,
                st.prompt_tps_measured,
            ),
            (
                "localmoe_decode_tokens_per_second",
                "Generated tokens per second of the last generation, on the runtime's clock (label clock)",
                st.decode_tps,
                st.decode_tps_measured,
            ),
        ):
            g = GaugeMetricFamily(name, help_, labels=["clock"])
            g.add_metric([st.clock], modelled)
            if st.clock != "measured":
                g.add_metric(["measured"], measured)
            yield g
        yield CounterMetricFamily(
            "localmoe_expert_hits", "Routed expert uses served by an expert resident in the GPU tier", value=st.hits
        )
        misses = CounterMetricFamily(
            "localmoe_expert_misses",
            "Routed expert uses whose expert was not resident, by what served them (fetch: the remainder)",
            labels=["outcome"],
        )
        subs = sum(st.substitutions.get(k, 0) for k in ("buddy", "little", "drop"))
        misses.add_metric(["fetch"], max(0, st.misses - st.cpu_experts - subs))
        misses.add_metric(["cpu"], st.cpu_experts)
        for kind in ("buddy", "little", "drop"):
            misses.add_metric([kind], st.substitutions.get(kind, 0))
        yield misses
        yield GaugeMetricFamily(
            "localmoe_expert_hit_rate", "hits / (hits + misses) since the model was loaded", value=st.hit_rate
        )
        yield CounterMetricFamily(
            "localmoe_expert_bytes_to_gpu",
            "Expert bytes copied to the GPU tier (demand fetches, prefetches, background uploads)",
            value=st.bytes_to_gpu,
        )
        yield CounterMetricFamily("localmoe_prefetch_issued", "Experts prefetched", value=st.prefetch_issued)
        yield CounterMetricFamily(
            "localmoe_prefetch_used", "Prefetched experts that the router then used", value=st.prefetch_used
        )
        yield GaugeMetricFamily(
            "localmoe_prefetch_precision",
            "Share of predicted experts the router then chose",
            value=st.prefetch_precision,
        )
        yield GaugeMetricFamily(
            "localmoe_prefetch_recall", "Share of routed experts that had been predicted", value=st.prefetch_recall
        )
        yield GaugeMetricFamily(
            "localmoe_gpu_tier_bytes_in_use", "Expert bytes in the GPU tier now", value=st.gpu_bytes_in_use
        )
        yield GaugeMetricFamily(
            "localmoe_gpu_tier_bytes_peak", "Most expert bytes the GPU tier has held", value=st.gpu_bytes_peak
        )
        if st.gpu_budget is not None:
            yield GaugeMetricFamily(
                "localmoe_gpu_tier_budget_bytes",
                "The GPU tier's byte budget for experts (absent: every expert resident)",
                value=st.gpu_budget,
            )
        layer = GaugeMetricFamily("localmoe_layer_hit_rate", "Expert hit rate per layer", labels=["layer"])
        for ls in st.layers:
            uses = ls.hits + ls.misses
            layer.add_metric([str(ls.layer)], ls.hits / uses if uses else 0.0)
        yield layer
