"""The gRPC endpoint (tidal.v1), served by the ingress replica itself with grpc.aio.

Why not Serve's gRPC proxy: when a client cancels a stream while the proxy is writing a message, the
proxy drops its handle to the ingress call without cancelling it (Ray 2.60), so the request runs to
max_tokens with its KV blocks held. Our own server sees every RPC end (`add_done_callback`) and aborts
the request at once. HTTP still goes through Serve's proxy, which cancels on disconnect.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncGenerator

import grpc

from proto import tidal_pb2_grpc as pbg

# Ports are shared with SO_REUSEPORT, so a replacement ingress can bind while the old one drains.
SERVER_OPTIONS = [("grpc.so_reuseport", 1), ("grpc.max_receive_message_length", 64 << 20),
                  ("grpc.max_send_message_length", 64 << 20)]


async def start(servicer, host: str, port: int) -> grpc.aio.Server:
    """Serve the Generation and Control services of `servicer` on host:port (in the running loop)."""
    server = grpc.aio.server(options=SERVER_OPTIONS)
    pbg.add_GenerationServicer_to_server(servicer, server)
    pbg.add_ControlServicer_to_server(servicer, server)
    if server.add_insecure_port(f"{host}:{port}") == 0:
        raise RuntimeError(f"cannot listen for gRPC on {host}:{port}")
    await server.start()
    return server


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
