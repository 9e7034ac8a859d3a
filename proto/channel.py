"""The channel a Python client should open to Tidal's gRPC port: one whose calls retry UNAVAILABLE.

With more than one ingress the server recycles connections (`grpc_max_connection_age_s`) so that a long-lived
channel moves between ingress processes. A call that starts just as its connection goes away can end
UNAVAILABLE ("GOAWAY received") before any ingress saw it, a race gRPC implementations share; gRPC retries
such a call only when the channel's service config says so. Any gRPC client can use the same config.
"""

from __future__ import annotations

import json

import grpc

RETRY_SERVICE_CONFIG = json.dumps({"methodConfig": [{
    "name": [{"service": "tidal.v1.Generation"}, {"service": "tidal.v1.Control"}],
    "retryPolicy": {"maxAttempts": 4, "initialBackoff": "0.05s", "maxBackoff": "1s", "backoffMultiplier": 2,
                    "retryableStatusCodes": ["UNAVAILABLE"]},
}]})


def insecure_channel(target: str, options: list[tuple[str, object]] | None = None) -> grpc.Channel:
    """grpc.insecure_channel with the retry policy above (a call is retried only before its first answer)."""
    return grpc.insecure_channel(target, options=[("grpc.enable_retries", 1),
                                                  ("grpc.service_config", RETRY_SERVICE_CONFIG), *(options or [])])
