"""The ingress deployment: gRPC (its own grpc.aio server) and OpenAI-style HTTP (Serve's proxy) in one place.

It authenticates, validates and tokenizes at the edge, then streams from an engine replica chosen by
Serve's load-aware router (power of two choices over replica queue lengths). A client that goes away
(cancel, deadline, disconnect) cancels the replica's generator, which aborts the request and frees its KV.

Several ingress replicas run side by side (`ingress_replicas`): Serve's proxy spreads HTTP requests over
them, and all of them listen on the gRPC port (SO_REUSEPORT: the kernel spreads connections, which are
recycled every `grpc_max_connection_age_s`, so one long-lived client channel moves between them too).
They share the drain state and their metrics through the coordinator (router/coordinator.py). Every
answer names the replica that served it (`x-tidal-ingress` header, `tidal-ingress` trailing metadata, and
on a stream initial metadata too).
"""

# no `from __future__ import annotations`: FastAPI must see the real `Request` type in route signatures
import asyncio
import dataclasses
import hmac
import json
import os
import socket
import time
from collections.abc import AsyncIterator

import ray
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from opentelemetry.trace import SpanKind, StatusCode
from prometheus_client import CONTENT_TYPE_LATEST
from ray import serve

from proto import tidal_pb2 as pb
from router import grpc_server, telemetry
from router import openai_api as oa
from router.config import ServeConfig
from router.coordinator import IngressReport
from router.errors import Draining, EngineFailure, Overloaded, Unauthenticated, message_of, status_of
from router.events import Caller, EngineRequest, ReplicaInfo, StreamEvent
from router.limits import BodyLimit, prompt_char_limit
from router.stats import StatsBoard
from workers.config import InvalidRequest, SamplingParams
from workers.detokenizer import Detokenizer
from workers.loader import load_tokenizer
from workers.request import RequestTotals, StepRecord

INGRESS_ID = f"{socket.gethostname()}:{os.getpid()}"  # one ingress replica per process

http_app = FastAPI(title="Tidal")


class IngressHeader:
    """Names the serving replica on every HTTP answer (pure ASGI: no buffering, disconnects still reach
    the route, which aborts the request)."""

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)

        async def tagged(message):
            if message["type"] == "http.response.start":
                message["headers"] = [*message.get("headers", []), (b"x-tidal-ingress", INGRESS_ID.encode())]
            await send(message)

        await self.app(scope, receive, tagged)


http_app.add_middleware(BodyLimit)
http_app.add_middleware(IngressHeader)


@http_app.exception_handler(RequestValidationError)
async def _bad_json(request: Request, exc: RequestValidationError):
    problems = "; ".join(f"{'.'.join(str(x) for x in e['loc'][1:]) or 'body'}: {e['msg']}" for e in exc.errors())
    return JSONResponse(oa.error_body(f"invalid request: {problems}", 400), status_code=400)


def _pb_logprobs(entries) -> list[pb.TokenLogprob]:
    return [pb.TokenLogprob(token_id=e.token_id, logprob=e.logprob,
                            top=[pb.TopLogprob(token_id=t, logprob=lp) for t, lp in e.top]) for e in entries]


@serve.ingress(http_app)
class Ingress:
    async def __init__(self, engine, coordinator, config: dict):
        self.config = ServeConfig(**config)
        self.engine = engine
        self.coordinator = coordinator
        self.tokenizer = load_tokenizer(self.config.engine.model)
        self.draining = False
        self.in_flight = 0
        self._streams_by_peer: dict[str, int] = {}  # open generation calls per gRPC connection (its peer)
        context = ray.get_runtime_context()  # this ingress is a Serve replica: a Ray actor
        self.caller = Caller(context.get_actor_id(), context.current_actor)
        self._info: ReplicaInfo | None = None
        telemetry.setup_tracing()
        self.metrics = telemetry.Metrics(self.config.model_name)
        BodyLimit.max_bytes = self.config.max_request_bytes
        self.max_prompt_chars = prompt_char_limit(self.tokenizer, self.config)
        self.grpc, self.health = await grpc_server.start(self, self.config)
        loop = asyncio.get_running_loop()
        # held so the loop keeps them: health status, reports to the coordinator, the drain long poll
        self._tasks = [loop.create_task(self._health_loop()), loop.create_task(self._report_loop()),
                       loop.create_task(self._watch_drain())]

    def __del__(self):
        """Serve's graceful shutdown awaits what this returns: open RPCs get a few seconds, then the port closes.

        Not `async def`: Python calls `__del__` again at garbage collection, where a coroutine would be dropped.
        """
        server, self.grpc = getattr(self, "grpc", None), None
        return None if server is None else server.stop(grace=10)

    # ---- shared edge logic --------------------------------------------------------------------------

    def _authorize(self, headers: dict[str, str]) -> None:
        key = self.config.api_key
        if key is None:
            return
        bearer = headers.get("authorization", "").encode()
        given = headers.get("x-api-key", "").encode()
        # constant time: how long a wrong key takes to refuse says nothing about the right one
        if not (hmac.compare_digest(bearer, f"Bearer {key}".encode()) or hmac.compare_digest(given, key.encode())):
            raise Unauthenticated("missing or wrong API key (send 'authorization: Bearer <key>')")

    def _request(self, prompt: str | list[int], sampling: dict, model: str | None, request_id: str | None,
                 stream: bool) -> EngineRequest:
        if self.draining:
            raise Draining("server is draining; no new requests")
        if model and model != self.config.model_name:
            raise InvalidRequest(f"unknown model {model!r}; this server serves {self.config.model_name!r}")
        if isinstance(prompt, str):
            if self.tokenizer is None:
                raise InvalidRequest("this model has no tokenizer; send prompt token ids")
            if self.max_prompt_chars is not None and len(prompt) > self.max_prompt_chars:
                raise InvalidRequest(f"prompt has {len(prompt)} characters; no more than {self.max_prompt_chars} "
                                     "can fit in the context (its length times the longest token, twice over)")
            prompt = self.tokenizer.encode(prompt).ids
        if not prompt:
            raise InvalidRequest("prompt is empty")
        params = SamplingParams.make(**sampling)
        limit = self.config.max_tokens_limit
        if limit is not None and params.max_tokens > limit:
            raise InvalidRequest(f"max_tokens {params.max_tokens} is over this server's limit of {limit} "
                                 "(max_tokens_limit)")
        return EngineRequest(list(prompt), params, request_id or None, stream, caller=self.caller)

    async def _events(self, request: EngineRequest, carrier: dict[str, str], operation: str
                      ) -> AsyncIterator[StreamEvent]:
        """Stream one request from a replica inside its trace span, feeding the metrics as steps arrive."""
        span = telemetry.tracer().start_span(f"{operation} {self.config.model_name}", kind=SpanKind.SERVER,
                                             context=telemetry.extract(carrier))
        if span.is_recording():
            span.set_attributes(self._request_attributes(request, operation))
        request.trace = telemetry.inject_from(span)
        self.in_flight += 1
        start = last = time.monotonic()
        outcome = "cancelled"
        upstream = self.engine.options(stream=True).generate.remote(request)
        try:
            async for event in upstream:
                if event.error:
                    raise EngineFailure(event.error)
                now = time.monotonic()
                if event.token_ids and last == start:
                    self.metrics.ttft.labels(self.config.model_name).observe(now - start)
                for step in event.steps:
                    self.metrics.step(step)
                if event.token_ids and last != start:
                    self.metrics.itl.labels(self.config.model_name).observe((now - last) / len(event.token_ids))
                last = now
                if event.finished:
                    outcome = event.finish_reason
                    self.metrics.finished(event.prompt_tokens, event.stats)
                    if span.is_recording():
                        span.set_attributes({"gen_ai.response.id": event.request_id,
                                             "gen_ai.response.finish_reasons": [outcome],
                                             "gen_ai.usage.input_tokens": event.prompt_tokens,
                                             "gen_ai.usage.output_tokens": event.stats.generated_tokens,
                                             "tidal.cached_tokens": event.stats.cached_tokens})
                yield event
            if outcome == "cancelled":  # no last event: Ray ended the stream because its replica died
                raise EngineFailure("the engine replica serving this request went away; retry")
        except Exception as e:
            outcome = "error" if status_of(e)[1] >= 500 else None  # refusals are counted by _rejected
            span.set_status(StatusCode.ERROR, message_of(e))
            raise
        finally:
            if outcome == "cancelled":  # the client went away: stop the replica's stream (its KV is freed),
                upstream.cancel()
                StatsBoard.get().cancel.remote(request.ticket)  # and through the board, should Ray lose the cancel
            self.in_flight -= 1
            if outcome is not None:
                self.metrics.requests.labels(self.config.model_name, outcome).inc()
            span.end()

    def _request_attributes(self, request: EngineRequest, operation: str) -> dict:
        s = {k: v for k, v in request.sampling.model_dump(exclude_unset=True).items()  # what the client set
             if v is not None and k in ("max_tokens", "temperature", "top_p", "top_k", "seed")}
        return {"gen_ai.operation.name": operation, "gen_ai.request.model": self.config.model_name,
                "gen_ai.system": "tidal", **{f"gen_ai.request.{k}": v for k, v in s.items()}}

    def _rejected(self, err: BaseException) -> None:
        _, status = status_of(err)
        self.metrics.rejected.labels(self.config.model_name, str(status)).inc()

    async def _model_info(self) -> ReplicaInfo:
        if self._info is None:
            self._info = await self.engine.model_info.remote()
        return self._info

    # ---- gRPC (tidal.v1) -----------------------------------------------------------------------------

    def _grpc_request(self, request: pb.GenerateRequest, grpc_context, stream: bool) -> EngineRequest:
        grpc_context.set_trailing_metadata((("tidal-ingress", INGRESS_ID),))
        self._authorize(dict(grpc_context.invocation_metadata()))
        self._hold_stream(grpc_context)
        s = request.sampling
        sampling = {name: getattr(s, name) for name in ("max_tokens", "temperature", "top_k", "top_p", "seed",
                                                        "logprobs", "presence_penalty", "frequency_penalty",
                                                        "repetition_penalty", "mix_weight") if s.HasField(name)}
        sampling["sampler"] = s.sampler or None
        if s.HasField("structured"):
            kind = s.structured.WhichOneof("kind")
            sampling["structured"] = {kind: getattr(s.structured, kind)} if kind else {}
        sampling.update(stop_token_ids=tuple(s.stop_token_ids), stop=tuple(s.stop), ignore_eos=s.ignore_eos)
        prompt = request.text if request.WhichOneof("prompt") == "text" else list(request.token_ids.ids)
        return self._request(prompt, sampling, request.model or None, request.request_id, stream)

    def _hold_stream(self, grpc_context) -> None:
        """Count the call against its connection's grpc_max_streams_per_connection until it ends. Enforced
        here, not as HTTP/2's SETTINGS_MAX_CONCURRENT_STREAMS: a client that opens streams before it reads
        the server's settings gets those refused as UNAVAILABLE ("Stream removed"), not a clear refusal."""
        peer, limit = grpc_context.peer(), self.config.grpc_max_streams_per_connection
        if self._streams_by_peer.get(peer, 0) >= limit:
            raise Overloaded(f"this connection already has {limit} generation calls open "
                             "(grpc_max_streams_per_connection)")
        self._streams_by_peer[peer] = self._streams_by_peer.get(peer, 0) + 1

        def release(_):
            left = self._streams_by_peer.pop(peer) - 1
            if left:
                self._streams_by_peer[peer] = left

        grpc_context.add_done_callback(release)

    def _grpc_events(self, req: EngineRequest, grpc_context) -> AsyncIterator[StreamEvent]:
        events = self._events(req, dict(grpc_context.invocation_metadata()), "text_completion")
        grpc_server.close_when_rpc_ends(grpc_context, events)
        return events

    def _fail(self, grpc_context, err: BaseException) -> None:
        self._rejected(err)
        code, _ = status_of(err)
        grpc_context.set_code(code)
        grpc_context.set_details(message_of(err))

    @staticmethod
    def _step_stats(steps: list[StepRecord]) -> pb.AcceptStats:
        """Decode steps as one AcceptStats: drafts summed, the last step's level and batch size (one step:
        exactly that step)."""
        out = pb.AcceptStats(drafted=sum(s.drafted for s in steps), accepted=sum(s.accepted for s in steps),
                             batch_size=steps[-1].batch_size)
        if steps[-1].level is not None:
            out.level = steps[-1].level
        return out

    @staticmethod
    def _accept_stats(stats: RequestTotals) -> pb.AcceptStats:
        """The request's totals."""
        return pb.AcceptStats(forwards=stats.forwards, drafted=stats.drafted, accepted=stats.accepted,
                              mean_acceptance_length=stats.mean_acceptance_length,
                              acceptance_by_position=stats.acceptance_by_position)

    def _usage(self, event: StreamEvent) -> pb.Usage:
        return pb.Usage(prompt_tokens=event.prompt_tokens, completion_tokens=event.stats.generated_tokens,
                        cached_tokens=event.stats.cached_tokens,
                        speculative=self._accept_stats(event.stats))

    async def Generate(self, request: pb.GenerateRequest, grpc_context) -> pb.GenerateResponse:
        try:
            req = self._grpc_request(request, grpc_context, stream=False)
            text = Detokenizer(self.tokenizer if request.return_text else None, req.sampling.stop)
            ids, parts, logprobs, last = [], [], [], None
            async for event in self._grpc_events(req, grpc_context):
                ids += event.token_ids
                parts.append(text.add(event.token_ids, event.finished))
                logprobs += event.logprobs or ()
                last = event
            return pb.GenerateResponse(request_id=last.request_id, token_ids=ids, text="".join(parts),
                                       finish_reason=last.finish_reason, usage=self._usage(last),
                                       logprobs=_pb_logprobs(logprobs))
        except Exception as e:
            self._fail(grpc_context, e)
            return pb.GenerateResponse()

    async def GenerateStream(self, request: pb.GenerateRequest, grpc_context
                             ) -> AsyncIterator[pb.GenerateStreamResponse]:
        try:
            req = self._grpc_request(request, grpc_context, stream=True)
            await grpc_context.send_initial_metadata((("tidal-ingress", INGRESS_ID),))  # known from the first message
            text = Detokenizer(self.tokenizer if request.return_text else None, req.sampling.stop)
            async for event in self._grpc_events(req, grpc_context):
                msg = pb.GenerateStreamResponse(request_id=event.request_id, token_ids=event.token_ids,
                                                text=text.add(event.token_ids, event.finished),
                                                logprobs=_pb_logprobs(event.logprobs or ()))
                if event.steps:
                    msg.step.CopyFrom(self._step_stats(event.steps))
                    msg.steps.extend(self._step_stats([s]) for s in event.steps)
                if event.finished:
                    msg.finish_reason = event.finish_reason
                    msg.usage.CopyFrom(self._usage(event))
                yield msg
        except Exception as e:
            self._fail(grpc_context, e)

    async def _serving(self) -> bool:
        return not self.draining and (await StatsBoard.get().summary.remote()).replicas > 0

    async def _health_loop(self) -> None:
        """Keep grpc.health.v1 current: SERVING while not draining and some engine replica reports load."""
        while True:
            await grpc_server.set_serving(self.health, await self._serving())
            await asyncio.sleep(1.0)

    async def Health(self, request: pb.HealthRequest, grpc_context) -> pb.HealthResponse:
        ok = await self._serving()
        return pb.HealthResponse(status=pb.HealthResponse.SERVING if ok else pb.HealthResponse.NOT_SERVING)

    def _grpc_authorized(self, grpc_context) -> bool:
        try:
            self._authorize(dict(grpc_context.invocation_metadata()))
            return True
        except Unauthenticated as e:
            self._fail(grpc_context, e)
            return False

    async def GetModelInfo(self, request: pb.ModelInfoRequest, grpc_context) -> pb.ModelInfo:
        if not self._grpc_authorized(grpc_context):
            return pb.ModelInfo()
        return pb.ModelInfo(model=self.config.model_name, **dataclasses.asdict(await self._model_info()))

    async def GetStats(self, request: pb.StatsRequest, grpc_context) -> pb.Stats:
        if not self._grpc_authorized(grpc_context):
            return pb.Stats()
        s = await StatsBoard.get().summary.remote()
        return pb.Stats(replicas=s.replicas, queue_depth=s.queue_depth, running=s.running, kv_usage=s.kv_usage,
                        prefix_cache_usage=s.prefix_cache_usage,
                        drafted=s.drafted, accepted=s.accepted, mean_acceptance_length=s.mean_acceptance_length,
                        finished_requests=s.finished, forwards=s.steps)

    async def Drain(self, request: pb.DrainRequest, grpc_context) -> pb.DrainResponse:
        if not self._grpc_authorized(grpc_context):
            return pb.DrainResponse()
        return pb.DrainResponse(in_flight=await self.begin_drain())

    # ---- what the ingress replicas share (router/coordinator.py) ---------------------------------------

    async def begin_drain(self) -> int:
        """Refuse new work here at once and on every other ingress before returning; in-flight requests
        finish. Returns how many are in flight across the ingresses."""
        await self._stop_taking_work()
        return await self.coordinator.drain.remote()

    async def _stop_taking_work(self) -> None:
        self.draining = True
        await grpc_server.set_serving(self.health, False)
        await self.coordinator.ack_drain.remote(self._report())

    async def _watch_drain(self) -> None:
        while True:
            try:
                await self.coordinator.wait_drain.remote()  # a long poll: returns when any ingress begins a drain
                break
            except Exception:  # the coordinator is restarting: poll again (its reports also carry the state)
                await asyncio.sleep(1.0)
        await self._stop_taking_work()

    def _report(self) -> IngressReport:
        return IngressReport(INGRESS_ID, self.in_flight, telemetry.additive_samples(self.metrics.registry))

    async def _report_loop(self) -> None:
        while True:
            try:
                if await self.coordinator.report.remote(self._report()) and not self.draining:
                    await self._stop_taking_work()  # missed the long poll (e.g. the coordinator restarted)
            except Exception:  # the coordinator is restarting; the next report goes to the new one
                pass
            await asyncio.sleep(0.5)

    async def in_flight_count(self) -> int:
        """Requests in flight on every ingress."""
        await self.coordinator.report.remote(self._report())
        return await self.coordinator.in_flight.remote()

    # ---- HTTP (OpenAI-compatible) -------------------------------------------------------------------

    def _http_error(self, err: BaseException) -> JSONResponse:
        self._rejected(err)
        _, status = status_of(err)
        return JSONResponse(oa.error_body(message_of(err), status), status_code=status)

    @http_app.get("/health")
    async def health(self):
        if self.draining:
            return JSONResponse({"status": "draining"}, status_code=503)
        return {"status": "ok"}

    @http_app.get("/metrics")
    async def metrics_text(self):
        """The whole server: load from the stats board, counters and histograms summed over every ingress."""
        self.metrics.load(await StatsBoard.get().summary.remote())
        everyone = await self.coordinator.samples.remote(self._report())
        return Response(telemetry.merged_exposition(self.metrics.registry, everyone), media_type=CONTENT_TYPE_LATEST)

    @http_app.get("/v1/models")
    async def models(self, raw: Request):
        try:
            self._authorize({k.lower(): v for k, v in raw.headers.items()})
        except Unauthenticated as e:
            return self._http_error(e)
        return {"object": "list", "data": [{"id": self.config.model_name, "object": "model", "created": 0,
                                            "owned_by": "tidal"}]}

    @http_app.post("/v1/completions")
    async def completions(self, body: oa.CompletionRequest, raw: Request):
        return await self._openai(body, raw, body.prompt, oa.completion_id("cmpl"), chat=False)

    @http_app.post("/v1/chat/completions")
    async def chat_completions(self, body: oa.ChatRequest, raw: Request):
        return await self._openai(body, raw, body.prompt(), oa.completion_id("chatcmpl"), chat=True)

    async def _openai(self, body, raw: Request, prompt, rid: str, chat: bool):
        try:
            headers = {k.lower(): v for k, v in raw.headers.items()}
            self._authorize(headers)
            req = self._request(prompt, body.sampling(), body.model, None, stream=bool(body.stream))
            events = self._events(req, headers, "chat" if chat else "text_completion")
            first = await anext(events)  # errors (bad input, overload) surface before any byte is sent
        except Exception as e:
            return self._http_error(e)
        model = self.config.model_name
        if body.stream:
            return StreamingResponse(self._sse(events, first, rid, model, chat, req), media_type="text/event-stream")
        text = Detokenizer(self.tokenizer, req.sampling.stop)
        parts, logprobs, last = [text.add(first.token_ids, first.finished)], list(first.logprobs or ()), first
        try:
            async for event in events:
                parts.append(text.add(event.token_ids, event.finished))
                logprobs += event.logprobs or ()
                last = event
        except Exception as e:
            return self._http_error(e)
        make = oa.chat_body if chat else oa.completion_body
        return make(rid, model, "".join(parts), last.finish_reason, last.prompt_tokens,
                    last.stats.generated_tokens, last.stats, self._logprobs_body(req, logprobs, chat, 0))

    def _token_text(self, token_id: int) -> str:
        """One token's own text, for logprobs (vLLM's `token_id:N` form where there is no tokenizer)."""
        return self.tokenizer.decode([token_id]) if self.tokenizer is not None else f"token_id:{token_id}"

    def _logprobs_body(self, req: EngineRequest, entries: list, chat: bool, offset: int) -> dict | None:
        if req.sampling.logprobs is None:
            return None
        if chat:
            return oa.chat_logprobs(entries, self._token_text)
        return oa.completion_logprobs(entries, self._token_text, offset)

    async def _sse(self, events, first: StreamEvent, rid: str, model: str, chat: bool, req: EngineRequest
                   ) -> AsyncIterator[str]:
        text = Detokenizer(self.tokenizer, req.sampling.stop)
        event, opening, offset = first, True, 0
        try:
            while True:
                delta = text.add(event.token_ids, event.finished)
                finish = event.finish_reason if event.finished else None
                logprobs = self._logprobs_body(req, event.logprobs or [], chat, offset)
                if logprobs is not None and not chat and logprobs["tokens"]:
                    offset = logprobs["text_offset"][-1] + len(logprobs["tokens"][-1])
                chunk = (oa.chat_chunk(rid, model, delta, finish, opening, logprobs) if chat
                         else oa.completion_chunk(rid, model, delta, finish, logprobs))
                if event.finished:
                    stats = event.stats
                    chunk["usage"] = oa.usage(event.prompt_tokens, stats.generated_tokens, stats.cached_tokens)
                    chunk["tidal"] = oa.speculative(event.stats)
                opening = False
                yield f"data: {json.dumps(chunk)}\n\n"
                if event.finished:
                    break
                event = await anext(events)
        except Exception as e:
            _, status = status_of(e)
            yield f"data: {json.dumps(oa.error_body(message_of(e), status))}\n\n"
        finally:  # `events` waits after its last event: close it now, not when the GC finds it (in-flight count)
            await events.aclose()
        yield "data: [DONE]\n\n"
