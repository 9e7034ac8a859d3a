"""The client channel README recommends retries a call the server refused with UNAVAILABLE before answering
(what a call caught by a recycled connection gets), and does not retry other refusals."""

from __future__ import annotations

from concurrent import futures

import grpc
import pytest

from proto import tidal_pb2 as pb
from proto.channel import insecure_channel


def serve_refusing_first(code: grpc.StatusCode) -> tuple[grpc.Server, int, list[int]]:
    """A tidal.v1.Generation server whose Generate refuses its first call with `code`, then answers."""
    calls: list[int] = []

    def generate(request, context):
        calls.append(1)
        if len(calls) == 1:
            context.abort(code, "refused once")
        return pb.GenerateResponse(token_ids=[7])

    handler = grpc.method_handlers_generic_handler("tidal.v1.Generation", {
        "Generate": grpc.unary_unary_rpc_method_handler(
            generate, request_deserializer=pb.GenerateRequest.FromString,
            response_serializer=pb.GenerateResponse.SerializeToString)})
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2), handlers=[handler])
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    return server, port, calls


def call(port: int) -> pb.GenerateResponse:
    from proto import tidal_pb2_grpc as pbg

    with insecure_channel(f"127.0.0.1:{port}") as channel:
        return pbg.GenerationStub(channel).Generate(pb.GenerateRequest(), timeout=30)


def test_unavailable_is_retried():
    server, port, calls = serve_refusing_first(grpc.StatusCode.UNAVAILABLE)
    try:
        assert list(call(port).token_ids) == [7]
        assert len(calls) == 2
    finally:
        server.stop(None)


def test_other_refusals_are_not_retried():
    server, port, calls = serve_refusing_first(grpc.StatusCode.RESOURCE_EXHAUSTED)
    try:
        with pytest.raises(grpc.RpcError) as e:
            call(port)
        assert e.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED and len(calls) == 1
    finally:
        server.stop(None)
