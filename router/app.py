"""The Ray Serve application: Ingress (several) -> EngineReplica (autoscaled), the Coordinator the ingress
replicas share, and how `tidal serve` runs it.

`build_app` is a Serve application builder, so the same typed config runs from the CLI, from
`serve run router.app:build_app`, and from a KubeRay RayService's serveConfigV2.
"""

from __future__ import annotations

import time

from ray import serve
from ray.serve.config import HTTPOptions

from router.config import ServeConfig
from router.coordinator import Coordinator
from router.engine_replica import EngineReplica
from router.ingress import Ingress
from router.telemetry import otel_env

APP_NAME = "tidal"
# The ingress replicas serve gRPC themselves (router/grpc_server.py), so they live where clients can find the
# port: on the head node, which every Ray cluster has (locally: this machine; on Kubernetes: the head pod's
# Service).
ON_HEAD_NODE = {"node:__internal_head__": 0.001}


def build_app(args: dict) -> serve.Application:
    cfg = args if isinstance(args, ServeConfig) else ServeConfig(**args)
    runtime_env = {"env_vars": otel_env()}  # tracing settings reach every replica process
    engine = serve.deployment(
        EngineReplica,
        name="EngineReplica",
        autoscaling_config=cfg.autoscaling.serve_dict(),
        max_ongoing_requests=cfg.max_ongoing_per_replica,
        max_queued_requests=cfg.max_queued_per_replica,
        graceful_shutdown_timeout_s=cfg.autoscaling.drain_timeout_s,  # scale-down lets streams finish
        request_router_config={"request_router_class": "router.prefix_router.PrefixAffinityRouter",
                               "request_router_kwargs": {"prefix_tokens": 64, "max_imbalance": 4}},
        ray_actor_options={"num_cpus": 1, "num_gpus": 0 if cfg.engine.device == "cpu" or cfg.engine.ep_size > 1 else 1,
                           "runtime_env": runtime_env},
    ).bind(cfg.engine.model_dump(mode="json"), cfg.max_queued_per_replica, cfg.stream_interval_ms,
            cfg.stream_messages_per_s)
    coordinator = serve.deployment(Coordinator, name="Coordinator", num_replicas=1, max_ongoing_requests=10_000,
                                   ray_actor_options={"num_cpus": 0}).bind()  # long polls: one per ingress
    ingress = serve.deployment(Ingress, name="Ingress", num_replicas=cfg.ingress_replicas,
                               max_ongoing_requests=10_000,
                               ray_actor_options={"num_cpus": 0, "resources": ON_HEAD_NODE,
                                                  "runtime_env": runtime_env})
    return ingress.bind(engine, coordinator, cfg.model_dump(mode="json"))


def start(cfg: ServeConfig) -> None:
    """Start Serve's HTTP proxy and deploy the app on the connected Ray cluster; returns when it answers."""
    serve.start(http_options=HTTPOptions(host=cfg.http_host, port=cfg.http_port))
    serve.run(build_app(cfg), name=APP_NAME, route_prefix="/", blocking=False)


def drain_and_stop(timeout_s: float = 60.0) -> None:
    """Graceful shutdown: refuse new requests, let in-flight ones finish (bounded), then stop Serve."""
    try:
        handle = serve.get_app_handle(APP_NAME)
        handle.begin_drain.remote().result(timeout_s=10)
        deadline = time.monotonic() + timeout_s
        while handle.in_flight_count.remote().result(timeout_s=10) and time.monotonic() < deadline:
            time.sleep(0.1)
    finally:
        serve.shutdown()
