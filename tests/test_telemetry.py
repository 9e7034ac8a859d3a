"""Traces and metrics (GitHub issue 7).

1. In process, without Ray: an `EngineReplica` on a tiny-vocabulary TiDAR checkpoint, traced into an
   in-memory exporter under a parent span the test opens itself. The engine span must hang under that
   parent, carry queue/prefill child spans in time order, and one "decode_step" event per engine step
   whose numbers add up to the request's own stats. First, with no tracer provider installed, the same
   replica must work and build no span data at all.
2. `tidal serve --mode tidar` as a subprocess, exporting over OTLP/gRPC to a collector the test runs
   (a grpc.server implementing TraceService): a gRPC request sent with a W3C traceparent must come back
   as the ingress span "text_completion tidal" (SERVER, gen_ai.* attributes) with the engine span and
   its queue/prefill children below it, all in the caller's trace.
3. `/metrics` of that server parses as Prometheus text and its counters move with the requests.

OTLP over http/protobuf: the protocol is fixed when the server starts, and a second `tidal serve`
(start + SIGTERM) costs ~30-40 s on 2 cores. Instead a short subprocess (~3 s) runs `setup_tracing`
with http/protobuf and an `EngineReplica` (no Ray) against an HTTP receiver the test runs: the exporter
branch every Serve process (ingress and replicas) takes, without a second Serve cluster.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import math
import os
import signal
import subprocess
import sys
import textwrap
import threading
import time
import urllib.request
from concurrent import futures
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import grpc
import pytest
import ray
import torch
from conftest import free_port, wait_ready
from opentelemetry import trace
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2 as tsv
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2_grpc as tsv_grpc
from opentelemetry.proto.trace.v1 import trace_pb2
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from prometheus_client.parser import text_string_to_metric_families

from proto import tidal_pb2 as pb
from proto import tidal_pb2_grpc as pbg
from proto.channel import insecure_channel
from router import telemetry
from router.engine_replica import EngineReplica
from router.events import EngineRequest, StreamEvent
from workers.config import EngineConfig, SamplingParams
from workers.request import StepRecord

ROOT = Path(__file__).resolve().parents[1]
MD = [("application", "tidal")]
PROMPT = "Hello tidal"

# set_tracer_provider works once per process: one provider for the module, installed by the first
# test that needs it (after the tracing-off check has run against the default no-op provider)
EXPORTER = InMemorySpanExporter()
PROVIDER = TracerProvider()
PROVIDER.add_span_processor(SimpleSpanProcessor(EXPORTER))

# the in-process replica: 8-token vocabulary so that natural TiDAR drafts are accepted now and then
V, MASK_ID = 8, 7
# a static draft schedule (every step drafts K=4): the default policy may decode plain AR for a while
TIDAR = dict(block_size=4, levels=[0, 2, 4], schedule=[dict(max_batch=64, block_size=4, levels=[0, 2, 4])])
TINY_PROMPT = [1, 4, 2, 5, 3]
TINY_TOKENS = 40


def attrs(span) -> dict:
    """Attributes of an OTLP proto span (or event) as plain Python values."""
    out = {}
    for kv in span.attributes:
        v = kv.value
        kind = v.WhichOneof("value")
        if kind == "array_value":
            out[kv.key] = [getattr(x, x.WhichOneof("value")) for x in v.array_value.values]
        else:
            out[kv.key] = getattr(v, kind)
    return out


def check_decode_steps(events: list[dict], generated: int, drafted: int, accepted: int) -> None:
    """decode_step events (attribute dicts) against the request's totals."""
    assert events, "no decode_step events"
    assert sum(e["tidal.tokens_committed"] for e in events) == generated
    assert sum(e["tidal.drafts_offered"] for e in events) == drafted
    assert sum(e["tidal.drafts_accepted"] for e in events) == accepted
    for e in events:
        abp = list(e.get("tidal.acceptance_by_position", []))  # an empty list attribute may be dropped
        assert len(abp) == e["tidal.drafts_offered"]
        assert sum(abp) == e["tidal.drafts_accepted"]
        assert abp == sorted(abp, reverse=True), "acceptance stops at the first rejected draft"
        assert e["tidal.batch_size"] >= 1 and 1 <= e["tidal.tokens_committed"] <= e["tidal.drafts_accepted"] + 1


# ---- 1. the engine replica in process, no Ray --------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory) -> str:
    """A 2-layer ZAYA over 8 tokens, saved by transformers, with the mask token named in config.json."""
    from transformers import ZayaConfig, ZayaForCausalLM

    torch.manual_seed(0)
    model = ZayaForCausalLM(ZayaConfig(
        vocab_size=V, hidden_size=64, num_attention_heads=4, num_key_value_heads=2, head_dim=32,
        num_hidden_layers=2, moe_intermediate_size=32, num_experts=3, router_hidden_size=16,
        max_position_embeddings=256, initializer_range=1.0, eos_token_id=None, bos_token_id=None,
        pad_token_id=0)).eval()
    g = torch.Generator().manual_seed(1000)
    with torch.no_grad():  # off the constant initialisations (uniform attention, identity norms)
        for name, p in model.named_parameters():
            if name.endswith("qk_norm.temp"):
                p.copy_(torch.empty(p.shape).uniform_(1.0, 2.5, generator=g))
            elif p.ndim == 1 and bool(torch.all(p == 1)):
                p.add_(torch.randn(p.shape, generator=g) * 0.2)
    path = tmp_path_factory.mktemp("telemetry") / "zaya8"
    model.save_pretrained(path)
    cfg = json.loads((path / "config.json").read_text())
    cfg["mask_token_id"] = MASK_ID
    (path / "config.json").write_text(json.dumps(cfg))
    return str(path)


@pytest.fixture(scope="module")
def replica(tiny_model):
    os.environ.pop("OTEL_TRACES_EXPORTER", None)  # this process traces only through PROVIDER
    r = EngineReplica(EngineConfig(model=tiny_model, mode="tidar", block_size=4, kv_cache_bytes=1 << 20,
                                   tidar=TIDAR).model_dump(mode="json"), max_queued=8)
    yield r
    r.async_engine.shutdown()


def run(replica: EngineReplica, request: EngineRequest) -> list[StreamEvent]:
    async def go():
        return [ev async for ev in replica.generate(request)]

    return asyncio.run(go())


def tiny_request(carrier: dict | None, stream: bool = True) -> EngineRequest:
    return EngineRequest(TINY_PROMPT, SamplingParams(max_tokens=TINY_TOKENS, ignore_eos=True), stream=stream,
                         trace=carrier or {})


def test_replica_without_tracing(replica, monkeypatch):
    if isinstance(trace.get_tracer_provider(), TracerProvider):
        pytest.skip("a tracer provider is already installed in this process")
    ray_before = ray.is_initialized()
    built = []
    monkeypatch.setattr(replica, "_trace", lambda *a: built.append(a))
    # a caller's traceparent arrives, but nothing records it: the engine span is a NonRecordingSpan
    remote_parent = {"traceparent": "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"}
    for carrier in (remote_parent, None):
        events = run(replica, tiny_request(carrier))
        assert sum(len(e.token_ids) for e in events) == TINY_TOKENS
        assert events[-1].finished and events[-1].finish_reason == "length"
        assert all(e.steps for e in events)
    assert built == [], "span data was built with tracing off"
    assert not telemetry.tracer().start_span("x").is_recording()
    assert EXPORTER.get_finished_spans() == ()
    # the stats reporter needs Ray; a replica used without it must not start a Ray cluster on its own
    assert ray.is_initialized() == ray_before
    if not ray_before:
        assert replica._background is None


def test_coalesced_stream_sends_first_and_last_at_once_and_keeps_every_step(tiny_model):
    """stream_interval_ms longer than the request: one message with the first step's tokens, one with all the
    rest; every decode step's statistics still arrive, and the tokens are the uncoalesced stream's."""
    config = EngineConfig(model=tiny_model, mode="tidar", block_size=4, kv_cache_bytes=1 << 20,
                          tidar=TIDAR).model_dump(mode="json")
    streams = {}
    for interval in (0.0, 60_000.0):
        r = EngineReplica(config, max_queued=8, stream_interval_ms=interval)
        try:
            streams[interval] = run(r, tiny_request(None))
        finally:
            r.async_engine.shutdown()
    each, coalesced = streams[0.0], streams[60_000.0]
    assert len(each) > 2 and len(coalesced) == 2
    assert coalesced[0].token_ids == each[0].token_ids  # the first tokens are not held back
    assert [t for e in coalesced for t in e.token_ids] == [t for e in each for t in e.token_ids]
    assert [s for e in coalesced for s in e.steps] == [s for e in each for s in e.steps]
    assert coalesced[-1].finished and coalesced[-1].stats == each[-1].stats

    # the request's totals travel once, on the last event; every decode step is a typed record
    assert all(e.stats is None for e in each[:-1] + coalesced[:-1])
    assert all(isinstance(s, StepRecord) for e in coalesced for s in e.steps)
    assert sum(len(e.steps) for e in coalesced) == each[-1].stats.forwards


def test_a_replica_with_many_streams_coalesces_each_one_more(tiny_model):
    """The replica caps its streams' total message rate (stream_messages_per_s): with one stream and a cap of
    one message per hour, that stream's interval is an hour however short stream_interval_ms is, so it sends
    its first and its last message only; every token and step still arrive."""
    config = EngineConfig(model=tiny_model, mode="tidar", block_size=4, kv_cache_bytes=1 << 20,
                          tidar=TIDAR).model_dump(mode="json")
    streams = {}
    for rate in (math.inf, 1 / 3600):
        r = EngineReplica(config, max_queued=8, stream_interval_ms=0.0, stream_messages_per_s=rate)
        try:
            streams[rate] = run(r, tiny_request(None))
            assert r.streams == 0  # the finished stream no longer counts
        finally:
            r.async_engine.shutdown()
    each, capped = streams[math.inf], streams[1 / 3600]
    assert len(each) > 2 and len(capped) == 2
    assert [t for e in capped for t in e.token_ids] == [t for e in each for t in e.token_ids]
    assert [s for e in capped for s in e.steps] == [s for e in each for s in e.steps]


def test_a_request_that_does_not_stream_gets_its_first_tokens_then_the_rest(tiny_model):
    """A non-streaming client (unary gRPC, an OpenAI call without stream) reads only the answer: at any stream
    interval its request crosses the Ray hop as two messages, the first step's tokens (errors and time to
    first token show at once) and everything else with the totals, every step's statistics kept."""
    config = EngineConfig(model=tiny_model, mode="tidar", block_size=4, kv_cache_bytes=1 << 20,
                          tidar=TIDAR).model_dump(mode="json")
    r = EngineReplica(config, max_queued=8, stream_interval_ms=0.0)
    try:
        each, unary = run(r, tiny_request(None)), run(r, tiny_request(None, stream=False))
    finally:
        r.async_engine.shutdown()
    assert len(each) > 2 and len(unary) == 2
    assert unary[0].token_ids == each[0].token_ids
    assert [t for e in unary for t in e.token_ids] == [t for e in each for t in e.token_ids]
    assert [s for e in unary for s in e.steps] == [s for e in each for s in e.steps]


def test_replica_span_tree(replica):
    trace.set_tracer_provider(PROVIDER)
    assert trace.get_tracer_provider() is PROVIDER, "another tracer provider was installed first"
    EXPORTER.clear()
    with PROVIDER.get_tracer("test").start_as_current_span("client") as parent:
        carrier = telemetry.inject_from(parent)
        assert carrier["traceparent"].startswith("00-")
        events = run(replica, tiny_request(carrier))
    stats = events[-1].stats
    generated = sum(len(e.token_ids) for e in events)
    assert generated == stats.generated_tokens == TINY_TOKENS
    assert stats.drafted > 0 and stats.accepted > 0, f"no draft was accepted; the test proves little: {stats}"

    spans = {s.name: s for s in EXPORTER.get_finished_spans()}
    assert set(spans) == {"client", "engine", "queue", "prefill"}, list(spans)
    client, engine, queue, prefill = (spans[n] for n in ("client", "engine", "queue", "prefill"))
    tid = client.context.trace_id
    assert all(s.context.trace_id == tid for s in spans.values())
    assert engine.parent is not None and engine.parent.span_id == client.context.span_id
    assert engine.parent.is_remote  # it came through the carrier, not the in-process context
    assert queue.parent.span_id == engine.context.span_id and prefill.parent.span_id == engine.context.span_id
    slack = 1000  # ns: the engine's timestamps are float seconds
    assert client.start_time <= engine.start_time <= queue.start_time + slack
    assert queue.start_time <= queue.end_time == prefill.start_time <= prefill.end_time
    assert prefill.end_time <= engine.end_time <= client.end_time

    assert engine.attributes["tidal.finish_reason"] == "length"
    assert engine.attributes["tidal.generated_tokens"] == TINY_TOKENS
    assert engine.attributes["tidal.accepted"] == stats.accepted
    steps = [e for e in engine.events if e.name == "decode_step"]
    assert len(steps) == len(engine.events) == len(events) == stats.forwards  # one per engine step
    step_attrs = [dict(e.attributes) for e in steps]
    check_decode_steps(step_attrs, generated, stats.drafted, stats.accepted)
    assert [a["tidal.tokens_committed"] for a in step_attrs] == [len(e.token_ids) for e in events]
    assert all(a["tidal.batch_size"] == 1 for a in step_attrs)
    assert {a["tidal.proposal_level"] for a in step_attrs} <= set(TIDAR["levels"]) | {-1}
    assert all(steps[i].timestamp <= steps[i + 1].timestamp for i in range(len(steps) - 1))
    assert prefill.end_time <= steps[0].timestamp + slack


# ---- OTLP receivers ------------------------------------------------------------------------------------


class Collector:
    """Spans received over OTLP, from any number of Export calls (gRPC or HTTP)."""

    def __init__(self):
        self.requests: list[tsv.ExportTraceServiceRequest] = []
        self.lock = threading.Lock()

    def add(self, request: tsv.ExportTraceServiceRequest) -> None:
        with self.lock:
            self.requests.append(request)

    def spans(self, trace_id: bytes) -> list[tuple[dict, trace_pb2.Span]]:
        """(resource attributes, span) of every span received in this trace."""
        with self.lock:
            reqs = list(self.requests)
        return [(attrs(rs.resource), s) for r in reqs for rs in r.resource_spans for ss in rs.scope_spans
                for s in ss.spans if s.trace_id == trace_id]

    def wait_for(self, trace_id: bytes, names: set[str], timeout_s: float = 20.0) -> dict[str, tuple]:
        """{span name: (resource attributes, span)} once every name in `names` has arrived."""
        deadline = time.monotonic() + timeout_s
        while True:
            got = self.spans(trace_id)
            by_name = {s.name: s for _, s in got}
            if names <= set(by_name):
                return {s.name: (res, s) for res, s in got}
            assert time.monotonic() < deadline, f"spans {names - set(by_name)} never arrived (got {sorted(by_name)})"
            time.sleep(0.2)


class GrpcCollector(Collector, tsv_grpc.TraceServiceServicer):
    def Export(self, request, context):
        self.add(request)
        return tsv.ExportTraceServiceResponse()


@pytest.fixture(scope="module")
def otlp_grpc():
    collector = GrpcCollector()
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
    tsv_grpc.add_TraceServiceServicer_to_server(collector, server)
    collector.port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    yield collector
    server.stop(0)


@pytest.fixture
def otlp_http():
    collector = Collector()
    paths = []

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self):
            body = self.rfile.read(int(self.headers.get("content-length", 0)))
            paths.append((self.path, self.headers.get("content-type")))
            if self.path != "/v1/traces":
                self.send_response(404)
                self.end_headers()
                return
            req = tsv.ExportTraceServiceRequest()
            req.ParseFromString(body)
            collector.add(req)
            reply = tsv.ExportTraceServiceResponse().SerializeToString()
            self.send_response(200)
            self.send_header("content-type", "application/x-protobuf")
            self.send_header("content-length", str(len(reply)))
            self.end_headers()
            self.wfile.write(reply)

        def log_message(self, *args):
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    collector.port, collector.paths = server.server_address[1], paths
    yield collector
    server.shutdown()
    server.server_close()


# ---- 2 and 3. `tidal serve --mode tidar` exporting over OTLP/gRPC ---------------------------------------


def gen_request(prompt, max_tokens: int) -> pb.GenerateRequest:
    req = pb.GenerateRequest(sampling=pb.SamplingParams(max_tokens=max_tokens, ignore_eos=True))
    if isinstance(prompt, str):
        req.text = prompt
    else:
        req.token_ids.ids.extend(prompt)
    return req


class Served:
    def __init__(self, proc, log_path: Path, grpc_port: int, http_port: int):
        self.proc, self.log_path = proc, log_path
        self.channel = insecure_channel(f"127.0.0.1:{grpc_port}")
        self.gen = pbg.GenerationStub(self.channel)
        self.base = f"http://127.0.0.1:{http_port}"

    def log(self) -> str:
        return self.log_path.read_text()[-3000:]


@pytest.fixture(scope="module")
def served(tmp_path_factory, otlp_grpc):
    from bench.random_model import make_zaya

    tmp = tmp_path_factory.mktemp("telemetry_serve")
    model = make_zaya(tmp / "zaya", hidden=64, layers=2, head_dim=16)  # byte tokenizer + mask token
    grpc_port, http_port = free_port(), free_port()
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS" and not k.startswith("OTEL_")}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))
    env.update(OTEL_TRACES_EXPORTER="otlp", OTEL_EXPORTER_OTLP_PROTOCOL="grpc",
               OTEL_EXPORTER_OTLP_ENDPOINT=f"http://127.0.0.1:{otlp_grpc.port}", OTEL_BSP_SCHEDULE_DELAY="200")
    config = tmp / "serve.json"  # the static draft schedule: flags cannot set it
    config.write_text(json.dumps({"engine": {"tidar": TIDAR}, "stream_interval_ms": 0,  # a message per step
                                       "stream_messages_per_s": 1e9}))
    log_path = tmp / "serve.log"
    log = log_path.open("w")
    proc = subprocess.Popen([sys.executable, "-m", "tidal", "serve", "--config", str(config), "--model", str(model),
                             "--mode", "tidar", "--grpc-port", str(grpc_port), "--http-port", str(http_port)],
                            cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)
    srv = Served(proc, log_path, grpc_port, http_port)
    try:
        wait_ready(srv.gen, MD, timeout_s=180, alive=lambda: proc.poll() is None)
        yield srv
        srv.channel.close()
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=60) == 0, srv.log()
    finally:
        srv.channel.close()
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        log.close()


def test_otlp_grpc_export(served, otlp_grpc):
    trace_hex, parent_hex = "4bf92f3577b34da6a3ce929d0e0e4736", "00f067aa0ba902b7"
    n = 12
    msgs = list(served.gen.GenerateStream(gen_request(PROMPT, n),
                                          metadata=MD + [("traceparent", f"00-{trace_hex}-{parent_hex}-01")],
                                          timeout=60))
    assert sum(len(m.token_ids) for m in msgs) == n and msgs[-1].finish_reason == "length"

    got = otlp_grpc.wait_for(bytes.fromhex(trace_hex), {"text_completion tidal", "engine", "queue", "prefill"})
    assert set(got) == {"text_completion tidal", "engine", "queue", "prefill"}, sorted(got)
    assert all(res.get("service.name") == "tidal" for res, _ in got.values())
    ingress, engine, queue, prefill = (got[k][1] for k in ("text_completion tidal", "engine", "queue", "prefill"))

    assert ingress.kind == trace_pb2.Span.SPAN_KIND_SERVER
    assert ingress.parent_span_id == bytes.fromhex(parent_hex)
    a = attrs(ingress)
    assert a["gen_ai.operation.name"] == "text_completion" and a["gen_ai.request.model"] == "tidal"
    assert a["gen_ai.system"] == "tidal" and a["gen_ai.request.max_tokens"] == n
    assert a["gen_ai.usage.output_tokens"] == n and a["gen_ai.usage.input_tokens"] == len(PROMPT)
    assert a["gen_ai.response.finish_reasons"] == ["length"] and a["gen_ai.response.id"] == msgs[0].request_id
    assert ingress.status.code != trace_pb2.Status.STATUS_CODE_ERROR

    assert engine.parent_span_id == ingress.span_id and engine.kind == trace_pb2.Span.SPAN_KIND_INTERNAL
    assert queue.parent_span_id == engine.span_id and prefill.parent_span_id == engine.span_id
    assert ingress.start_time_unix_nano <= engine.start_time_unix_nano
    assert queue.end_time_unix_nano == prefill.start_time_unix_nano <= prefill.end_time_unix_nano
    assert engine.end_time_unix_nano <= ingress.end_time_unix_nano
    assert attrs(engine)["tidal.finish_reason"] == "length"

    steps = [attrs(e) for e in engine.events if e.name == "decode_step"]
    streamed = [s for m in msgs for s in m.steps]  # a message may carry several steps, each listed
    assert len(steps) == len(streamed)  # one trace event per engine step
    usage = msgs[-1].usage.speculative
    check_decode_steps(steps, n, usage.drafted, usage.accepted)
    assert usage.drafted > 0, "tidar mode offered no drafts"
    assert [s["tidal.drafts_offered"] for s in steps] == [s.drafted for s in streamed]
    ends = list(itertools.accumulate(len(m.steps) for m in msgs))  # each message's tokens: its steps' commits
    committed = [s["tidal.tokens_committed"] for s in steps]
    per_message = [sum(committed[e - len(m.steps):e]) for m, e in zip(msgs, ends, strict=True)]
    assert per_message == [len(m.token_ids) for m in msgs]


def scrape(base: str) -> tuple[dict, dict]:
    """({(sample name, sorted label items): value}, {family name: type}) of /metrics."""
    with urllib.request.urlopen(f"{base}/metrics", timeout=30) as r:
        assert r.status == 200
        text = r.read().decode()
    samples, types = {}, {}
    for fam in text_string_to_metric_families(text):
        types[fam.name] = fam.type
        for s in fam.samples:
            samples[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return samples, types


def value(samples: dict, name: str, **labels) -> float:
    return samples.get((name, tuple(sorted({"model_name": "tidal", **labels}.items()))), 0.0)


def test_metrics_move(served):
    before, types = scrape(served.base)
    assert types["vllm:request_success"] == "counter" and types["vllm:time_to_first_token_seconds"] == "histogram"
    assert types["vllm:num_requests_running"] == "gauge" and types["vllm:num_requests_waiting"] == "gauge"
    assert ("vllm:num_requests_running", (("model_name", "tidal"),)) in before
    deadline = time.monotonic() + 15  # replicas post their load every 0.5 s once serving; allow a slow start
    while value(before, "tidal:engine_replicas") != 1 and time.monotonic() < deadline:
        time.sleep(0.25)
        before, types = scrape(served.base)
    assert value(before, "tidal:engine_replicas") == 1
    time.sleep(1.5)  # every ingress has posted its counters of the earlier tests' requests
    before, _ = scrape(served.base)

    n = 10
    msgs = list(served.gen.GenerateStream(gen_request([5, 17, 200, 33], n), metadata=MD, timeout=60))
    assert sum(len(m.token_ids) for m in msgs) == n
    with pytest.raises(grpc.RpcError) as e:
        served.gen.Generate(gen_request("", 4), metadata=MD, timeout=30)
    assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT

    def delta(name, **labels):
        return value(after, name, **labels) - value(before, name, **labels)

    deadline = time.monotonic() + 10
    while True:  # the success counter moves when the ingress's stream closes, just after the last message
        after, _ = scrape(served.base)
        if delta("vllm:request_success_total", finished_reason="length") >= 1 or time.monotonic() > deadline:
            break
        time.sleep(0.2)
    time.sleep(1.0)  # and every ingress has posted its counters since (the 400 may have been another's)
    after, _ = scrape(served.base)
    steps = [s for m in msgs for s in m.steps]  # the metrics see every step, however the stream coalesced them
    drafted, accepted = sum(s.drafted for s in steps), sum(s.accepted for s in steps)
    assert drafted > 0 and drafted == sum(m.step.drafted for m in msgs)
    assert delta("vllm:request_success_total", finished_reason="length") == 1
    assert delta("tidal:requests_rejected_total", status="400") == 1
    assert delta("vllm:spec_decode_num_draft_tokens_total") == drafted
    assert delta("vllm:spec_decode_num_accepted_tokens_total") == accepted
    assert delta("vllm:spec_decode_num_drafts_total") == sum(1 for s in steps if s.drafted)
    assert delta("vllm:time_to_first_token_seconds_count") == 1
    assert delta("tidal:tokens_per_forward_count") == len(steps)  # every step commits a token at least
    assert delta("tidal:tokens_per_forward_sum") == n
    assert delta("vllm:inter_token_latency_seconds_count") == len(msgs) - 1


# ---- OTLP over http/protobuf: the replica's exporter path, in a short subprocess --------------------------

HTTP_SCRIPT = textwrap.dedent("""
    import asyncio, json, sys
    from opentelemetry import trace
    from router import telemetry
    from router.engine_replica import EngineReplica
    from router.events import EngineRequest
    from workers.config import EngineConfig, SamplingParams

    r = EngineReplica(EngineConfig(model=sys.argv[1], mode="tidar", block_size=4, kv_cache_bytes=1 << 20,
                                   tidar=json.loads(sys.argv[3])).model_dump(mode="json"), max_queued=8)
    provider = trace.get_tracer_provider()
    assert type(provider).__module__.startswith("opentelemetry.sdk"), provider
    async def go():
        request = EngineRequest([1, 4, 2, 5, 3], SamplingParams(max_tokens=8, ignore_eos=True),
                                trace={"traceparent": sys.argv[2]})
        return [ev async for ev in r.generate(request)]
    events = asyncio.run(go())
    print(sum(len(e.token_ids) for e in events), len(events))
    provider.shutdown()  # flushes the batch processor
    r.async_engine.shutdown()
""")


def test_otlp_http_export_from_replica(tiny_model, otlp_http):
    trace_hex, parent_hex = "a1b2c3d4e5f60718293a4b5c6d7e8f90", "1122334455667788"
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS" and not k.startswith("OTEL_")}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))
    env.update(OTEL_TRACES_EXPORTER="otlp", OTEL_EXPORTER_OTLP_PROTOCOL="http/protobuf",
               OTEL_EXPORTER_OTLP_ENDPOINT=f"http://127.0.0.1:{otlp_http.port}", OTEL_SERVICE_NAME="tidal-replica")
    out = subprocess.run([sys.executable, "-c", HTTP_SCRIPT, tiny_model, f"00-{trace_hex}-{parent_hex}-01",
                          json.dumps(TIDAR)],
                         cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-3000:]
    tokens, steps = map(int, out.stdout.split())
    assert tokens == 8
    assert ("/v1/traces", "application/x-protobuf") in otlp_http.paths
    got = otlp_http.wait_for(bytes.fromhex(trace_hex), {"engine", "queue", "prefill"}, timeout_s=5)
    res, engine = got["engine"]
    assert res["service.name"] == "tidal-replica"
    assert engine.parent_span_id == bytes.fromhex(parent_hex)
    assert got["queue"][1].parent_span_id == engine.span_id == got["prefill"][1].parent_span_id
    events = [attrs(e) for e in engine.events if e.name == "decode_step"]
    assert len(events) == steps and sum(e["tidal.tokens_committed"] for e in events) == tokens
