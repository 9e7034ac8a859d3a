"""The gRPC endpoint (tidal.v1), served by each ingress replica itself with grpc.aio, all on one port.

Why not Serve's gRPC proxy: when a client cancels a stream while the proxy is writing a message, the
proxy drops its handle to the ingress call without cancelling it (Ray 2.60), so the request runs to
max_tokens with its KV blocks held. Our own server sees every RPC end (`add_done_callback`) and aborts
the request at once. HTTP still goes through Serve's proxy, which cancels on disconnect.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncGenerator

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from proto import tidal_pb2 as pb
from router.config import ServeConfig

SERVICES = tuple(s.full_name for s in pb.DESCRIPTOR.services_by_name.values())  # tidal.v1.Generation, .Control

# The port is shared with SO_REUSEPORT: every ingress replica listens on it (the kernel spreads connections
# over them), and a replacement ingress can bind while the old one drains.
SERVER_OPTIONS = [("grpc.so_reuseport", 1), ("grpc.max_send_message_length", 64 << 20)]


async def start(servicer, config: ServeConfig) -> tuple[grpc.aio.Server, health.aio.HealthServicer]:
    """Serve the Generation and Control services of `servicer` on the configured port (in the running loop), with the
    standard grpc.health.v1 service (NOT_SERVING until `set_serving` says otherwise: what Kubernetes' gRPC
    probes and grpc-health-probe ask) and server reflection (grpcurl list / describe). A connection older
    than `grpc_connection_age_s` is told to go away (GOAWAY; its calls finish) and the client reconnects,
    maybe to another replica: without it, one channel would stay on one ingress for its whole life. None:
    connections live as long as their clients keep them. A message over `max_request_bytes` is refused by
    gRPC itself (RESOURCE_EXHAUSTED, before any handler runs)."""
    age_s = config.grpc_connection_age_s
    age = [] if age_s is None else [
        ("grpc.max_connection_age_ms", int(age_s * 1000)),
        ("grpc.max_connection_age_grace_ms", (1 << 31) - 1)]  # streams on an old connection run to their end
    limits = [("grpc.max_receive_message_length", config.max_request_bytes)]
    server = grpc.aio.server(options=SERVER_OPTIONS + age + limits)
    server.add_generic_rpc_handlers(tuple(_handlers(servicer, s) for s in pb.DESCRIPTOR.services_by_name.values()))
    health_servicer = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    reflection.enable_server_reflection((*SERVICES, health.SERVICE_NAME, reflection.SERVICE_NAME), server)
    await set_serving(health_servicer, False)
    host, port = config.grpc_host, config.grpc_port
    if server.add_insecure_port(f"{host}:{port}") == 0:
        raise RuntimeError(f"cannot listen for gRPC on {host}:{port}")
    await server.start()
    return server, health_servicer


class Undecodable:
    """A request whose bytes do not parse as its message (corrupt wire format, bad UTF-8 in a string field).
    gRPC would answer UNKNOWN from its deserializer, before any handler runs; this lets the handler answer
    INVALID_ARGUMENT instead."""

    def __init__(self, message_type: str, error: Exception):
        self.details = f"request is not a valid {message_type}: {error}"


def _decoder(message_class):
    def decode(data: bytes):
        try:
            return message_class.FromString(data)
        except Exception as e:  # protobuf's DecodeError, or any parse failure
            return Undecodable(message_class.DESCRIPTOR.full_name, e)
    return decode


def _handlers(servicer, service) -> grpc.GenericRpcHandler:
    """The service's methods as implemented by `servicer` (what the generated add_*Servicer_to_server
    does), with requests decoded by `_decoder`: one that does not parse is refused with INVALID_ARGUMENT."""
    handlers = {}
    for method in service.methods:
        assert not method.client_streaming, "tidal.v1 has no client-streaming methods"
        impl = getattr(servicer, method.name)
        request_class, response_class = getattr(pb, method.input_type.name), getattr(pb, method.output_type.name)
        if method.server_streaming:
            async def behaviour(request, context, impl=impl):
                if isinstance(request, Undecodable):
                    await context.abort(grpc.StatusCode.INVALID_ARGUMENT, request.details)
                async for response in impl(request, context):
                    yield response
            make = grpc.unary_stream_rpc_method_handler
        else:
            async def behaviour(request, context, impl=impl):
                if isinstance(request, Undecodable):
                    await context.abort(grpc.StatusCode.INVALID_ARGUMENT, request.details)
                return await impl(request, context)
            make = grpc.unary_unary_rpc_method_handler
        handlers[method.name] = make(behaviour, request_deserializer=_decoder(request_class),
                                     response_serializer=response_class.SerializeToString)
    return grpc.method_handlers_generic_handler(service.full_name, handlers)


async def set_serving(health_servicer: health.aio.HealthServicer, serving: bool) -> None:
    """The status of the whole server ("") and of each tidal.v1 service."""
    status = health_pb2.HealthCheckResponse.SERVING if serving else health_pb2.HealthCheckResponse.NOT_SERVING
    for name in ("", *SERVICES):
        await health_servicer.set(name, status)


def close_when_rpc_ends(grpc_context, events: AsyncGenerator) -> None:
    """Close `events` (aborting its request) as soon as the RPC ends for any reason.

    grpc.aio cancels a handler whose client went away, but a streaming handler caught at a `yield`
    is only closed when it is garbage-collected; this makes the abort immediate.
    """

    async def close():
        try:
            await events.aclose()
        except RuntimeError:  # "already running": the cancellation is unwinding it, which also aborts
            pass

    grpc_context.add_done_callback(lambda _: asyncio.ensure_future(close()))
