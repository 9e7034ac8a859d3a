"""Traces (OpenTelemetry, OTLP) and metrics (Prometheus text format).

Tracing is configured by the standard variables: OTEL_TRACES_EXPORTER (otlp | console | none, the
default), OTEL_EXPORTER_OTLP_[TRACES_]PROTOCOL (grpc | http/protobuf), OTEL_EXPORTER_OTLP_[TRACES_]ENDPOINT,
OTEL_TRACES_SAMPLER[_ARG], OTEL_SERVICE_NAME. Off, every span is a no-op and no attributes are built.
Each Serve process (ingress, engine replicas) sets itself up; the trace context crosses the Ray hop
inside the request dict as a W3C traceparent carrier.

Metric names follow vLLM's where vLLM has the metric (so its dashboards work), `tidal:` otherwise. Every
ingress replica keeps its own registry; /metrics on any of them sums the counters and histograms of all
(`additive_samples`, `merged_exposition`; the coordinator holds the copies).
"""

from __future__ import annotations

import os
from collections import defaultdict

from opentelemetry import propagate, trace
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.metrics_core import Metric

from router.stats import ServerLoad
from workers.request import RequestTotals, StepRecord

ADDITIVE = {"counter": ("_total",), "histogram": ("_bucket", "_count", "_sum")}  # family type -> sample suffixes
OTEL_PREFIX = "OTEL_"
_tracing_ready = False


def otel_env() -> dict[str, str]:
    """The OTEL_* variables of this process, to forward to Ray workers."""
    return {k: v for k, v in os.environ.items() if k.startswith(OTEL_PREFIX)}


def setup_tracing(service: str = "tidal") -> None:
    global _tracing_ready
    if _tracing_ready:
        return
    _tracing_ready = True
    kind = os.environ.get("OTEL_TRACES_EXPORTER", "none").strip().lower()
    if kind in ("", "none"):
        return
    from opentelemetry.sdk.resources import Resource
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import BatchSpanProcessor, ConsoleSpanExporter

    if kind == "console":
        exporter = ConsoleSpanExporter()
    elif kind == "otlp":
        protocol = (os.environ.get("OTEL_EXPORTER_OTLP_TRACES_PROTOCOL")
                    or os.environ.get("OTEL_EXPORTER_OTLP_PROTOCOL") or "grpc")
        if protocol == "grpc":
            from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter
        else:
            from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
        exporter = OTLPSpanExporter()
    else:
        raise ValueError(f"OTEL_TRACES_EXPORTER={kind!r} is not supported (otlp, console or none)")
    resource = Resource.create({"service.name": os.environ.get("OTEL_SERVICE_NAME", service)})
    provider = TracerProvider(resource=resource)  # the sampler comes from OTEL_TRACES_SAMPLER
    provider.add_span_processor(BatchSpanProcessor(exporter))
    trace.set_tracer_provider(provider)


def tracer():
    return trace.get_tracer("tidal")


def extract(carrier: dict[str, str]):
    """Trace context from gRPC metadata, HTTP headers or a forwarded carrier (keys lower-case)."""
    return propagate.extract({k.lower(): v for k, v in carrier.items()})


def inject_from(span) -> dict[str, str]:
    """A traceparent carrier naming `span` as the parent, for the next hop."""
    carrier: dict[str, str] = {}
    propagate.inject(carrier, context=trace.set_span_in_context(span))
    return carrier


def ns(seconds: float | None) -> int | None:
    return None if seconds is None else int(seconds * 1e9)


class Metrics:
    """Counters and histograms the ingress updates from the streamed step events."""

    def __init__(self, model_name: str):
        self.registry = r = CollectorRegistry()
        self.model = model_name
        labels = ["model_name"]
        self.num_drafts = Counter("vllm:spec_decode_num_drafts", "Verify steps that checked drafts", labels, registry=r)
        self.num_draft_tokens = Counter("vllm:spec_decode_num_draft_tokens", "Draft tokens offered", labels, registry=r)
        self.num_accepted_tokens = Counter("vllm:spec_decode_num_accepted_tokens", "Draft tokens accepted", labels,
                                           registry=r)
        self.accepted_per_pos = Counter("vllm:spec_decode_num_accepted_tokens_per_pos",
                                        "Accepted draft tokens by draft position", labels + ["position"], registry=r)
        self.tokens_per_forward = Histogram("tidal:tokens_per_forward", "Tokens a request committed in one step",
                                            labels, buckets=(1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 64), registry=r)
        self.ttft = Histogram("vllm:time_to_first_token_seconds", "Time to first token", labels, registry=r,
                              buckets=(0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30))
        self.itl = Histogram("vllm:inter_token_latency_seconds", "Time between streamed steps per token", labels,
                             registry=r, buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5))
        self.requests = Counter("vllm:request_success", "Finished requests by finish reason",
                                labels + ["finished_reason"], registry=r)
        self.rejected = Counter("tidal:requests_rejected", "Requests refused by status", labels + ["status"],
                                registry=r)
        self.waiting = Gauge("vllm:num_requests_waiting", "Requests admitted, waiting for a batch slot", labels,
                             registry=r)
        self.running = Gauge("vllm:num_requests_running", "Requests in the running batch", labels, registry=r)
        self.kv_usage = Gauge("vllm:kv_cache_usage_perc", "Share of KV blocks in use (mean over replicas)", labels,
                              registry=r)
        self.replicas = Gauge("tidal:engine_replicas", "Live engine replicas", labels, registry=r)
        self.prefix_queries = Counter("vllm:prefix_cache_queries", "Prompt tokens of finished requests (looked up "
                                      "in the prefix cache)", labels, registry=r)
        self.prefix_hits = Counter("vllm:prefix_cache_hits", "Of them, tokens found in the prefix cache", labels,
                                   registry=r)
        self.prefix_usage = Gauge("tidal:prefix_cache_usage_perc", "Share of KV blocks nobody holds that keep a "
                                  "cached prefix (mean over replicas; evicted on demand)", labels, registry=r)

    def step(self, step: StepRecord) -> None:
        """One decode step of one request: drafts offered and accepted (by position), tokens committed."""
        m = self.model
        if step.drafted:
            self.num_drafts.labels(m).inc()
            self.num_draft_tokens.labels(m).inc(step.drafted)
            self.num_accepted_tokens.labels(m).inc(step.accepted)
            for pos in range(step.accepted):
                self.accepted_per_pos.labels(m, str(pos)).inc()
        if step.committed:
            self.tokens_per_forward.labels(m).observe(step.committed)

    def load(self, summary: ServerLoad) -> None:
        m = self.model
        self.waiting.labels(m).set(summary.queue_depth)
        self.running.labels(m).set(summary.running)
        self.kv_usage.labels(m).set(summary.kv_usage)
        self.prefix_usage.labels(m).set(summary.prefix_cache_usage)
        self.replicas.labels(m).set(summary.replicas)

    def finished(self, prompt_tokens: int, stats: RequestTotals) -> None:
        """A request finished: its prompt's prefix-cache lookup (counted once, when it first started)."""
        m = self.model
        self.prefix_queries.labels(m).inc(prompt_tokens)
        self.prefix_hits.labels(m).inc(stats.cached_tokens)


def additive_samples(registry: CollectorRegistry) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """The registry's counter and histogram samples, which add up across ingress replicas (not their
    `_created` timestamps, and not gauges)."""
    return {(x.name, tuple(sorted(x.labels.items()))): x.value for family in registry.collect()
            if family.type in ADDITIVE for x in family.samples if not x.name.endswith("_created")}


def merged_exposition(registry: CollectorRegistry, everyone: list[dict]) -> bytes:
    """Prometheus text of `registry` with every counter and histogram sample summed over `everyone` (each
    ingress's additive_samples, this one's included); gauges (the load, read from the stats board) as
    `registry` has them. A label set only another ingress has seen is included."""
    totals: dict = defaultdict(float)
    for samples in everyone:
        for key, value in samples.items():
            totals[key] += value

    class Merged:
        def collect(self):
            for family in registry.collect():
                if family.type not in ADDITIVE:
                    yield family
                    continue
                names = {family.name + suffix for suffix in ADDITIVE[family.type]}
                merged = Metric(family.name, family.documentation, family.type, family.unit)
                seen = set()
                for x in family.samples:
                    if x.name in names:
                        key = (x.name, tuple(sorted(x.labels.items())))
                        seen.add(key)
                        merged.add_sample(x.name, x.labels, totals.get(key, x.value))
                for name, labels in sorted(k for k in totals if k[0] in names and k not in seen):
                    merged.add_sample(name, dict(labels), totals[(name, labels)])
                yield merged

    out = CollectorRegistry(auto_describe=False)
    out.register(Merged())
    return generate_latest(out)
