"""Errors the servers map to status codes: gRPC code and HTTP status side by side."""

from __future__ import annotations

import grpc

from workers.backends import EngineStartError
from workers.config import InvalidRequest
from workers.loader import ModelLoadError


class Overloaded(RuntimeError):
    """Admission refused: the queue is full."""


class Draining(RuntimeError):
    """The server is shutting down and takes no new requests."""


class Unauthenticated(RuntimeError):
    """Missing or wrong API key."""


class EngineFailure(RuntimeError):
    """The request failed inside the engine (e.g. its worker group died)."""


def status_of(err: BaseException) -> tuple[grpc.StatusCode, int]:
    """(gRPC code, HTTP status) for an error raised anywhere below the ingress."""
    cause = getattr(err, "cause", None) or err  # Ray wraps replica exceptions in RayTaskError
    for kind, codes in (
        (InvalidRequest, (grpc.StatusCode.INVALID_ARGUMENT, 400)),
        (ModelLoadError, (grpc.StatusCode.INVALID_ARGUMENT, 400)),
        (Overloaded, (grpc.StatusCode.RESOURCE_EXHAUSTED, 429)),
        (Draining, (grpc.StatusCode.UNAVAILABLE, 503)),
        (Unauthenticated, (grpc.StatusCode.UNAUTHENTICATED, 401)),
        (EngineFailure, (grpc.StatusCode.UNAVAILABLE, 503)),
        (EngineStartError, (grpc.StatusCode.UNAVAILABLE, 503)),
    ):
        if isinstance(cause, kind) or isinstance(err, kind):
            return codes
    try:
        from ray.exceptions import ActorUnavailableError, RayActorError
        from ray.serve.exceptions import BackPressureError

        if isinstance(err, BackPressureError):
            return grpc.StatusCode.RESOURCE_EXHAUSTED, 429
        if isinstance(err, (RayActorError, ActorUnavailableError)):  # the engine replica died or is restarting
            return grpc.StatusCode.UNAVAILABLE, 503
    except ImportError:
        pass
    return grpc.StatusCode.INTERNAL, 500


def message_of(err: BaseException) -> str:
    cause = getattr(err, "cause", None) or err
    return str(cause).strip().splitlines()[-1] if str(cause).strip() else type(cause).__name__

