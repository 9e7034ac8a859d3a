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
from proto import tidal_pb2_grpc as pbg

SERVICES = tuple(s.full_name for s in pb.DESCRIPTOR.services_by_name.values())  # tidal.v1.Generation, .Control

# The port is shared with SO_REUSEPORT: every ingress replica listens on it (the kernel spreads connections
# over them), and a replacement ingress can bind while the old one drains.
SERVER_OPTIONS = [("grpc.so_reuseport", 1), ("grpc.max_receive_message_length", 64 << 20),
                  ("grpc.max_send_message_length", 64 << 20)]


async def start(servicer, host: str, port: int, max_connection_age_s: float | None
                ) -> tuple[grpc.aio.Server, health.aio.HealthServicer]:
    """Serve the Generation and Control services of `servicer` on host:port (in the running loop), with the
    standard grpc.health.v1 service (NOT_SERVING until `set_serving` says otherwise: what Kubernetes' gRPC
    probes and grpc-health-probe ask) and server reflection (grpcurl list / describe). A connection older
    than `max_connection_age_s` is told to go away (GOAWAY; its calls finish) and the client reconnects,
    maybe to another replica: without it, one channel would stay on one ingress for its whole life. None:
    connections live as long as their clients keep them."""
    age = [] if max_connection_age_s is None else [
        ("grpc.max_connection_age_ms", int(max_connection_age_s * 1000)),
        ("grpc.max_connection_age_grace_ms", (1 << 31) - 1)]  # streams on an old connection run to their end
    server = grpc.aio.server(options=SERVER_OPTIONS + age)
    pbg.add_GenerationServicer_to_server(servicer, server)
    pbg.add_ControlServicer_to_server(servicer, server)
    health_servicer = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    reflection.enable_server_reflection((*SERVICES, health.SERVICE_NAME, reflection.SERVICE_NAME), server)
    await set_serving(health_servicer, False)
    if server.add_insecure_port(f"{host}:{port}") == 0:
        raise RuntimeError(f"cannot listen for gRPC on {host}:{port}")
    await server.start()
    return server, health_servicer


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
