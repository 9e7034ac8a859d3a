"""The serving configuration: one typed object from CLI flags or a YAML/JSON file, validated once."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from workers.config import EngineConfig, InvalidRequest, describe

ENGINE_LOAD_POLICY = "router.autoscaling:EngineLoadPolicy"
# Defaults chosen by bench.e2e (docs/benchmarks.md, "Serving at engine speed"): 50 ms coalescing was 1.11x /
# 1.39x / 1.22x the streamed-chat tokens/s of 20 ms at c = 1 / 8 / 32 (20 ms: 1.34x of none at c = 64); one
# ingress process was 1.04-1.18x two on 2 cores (a bigger head node sets ingress_replicas, as
# deploy/examples/tidal.yaml does).
STREAM_INTERVAL_MS = 50.0
# 320 messages a second per engine replica (c = 32 streams: 100 ms each), measured with the engine inbox
# (docs/benchmarks.md): streamed chat at c = 32 713 vs 457 tok/s without the cap, c = 8 unchanged (50 ms)
STREAM_MESSAGES_PER_S = 320.0
DEFAULT_CONNECTION_AGE_S = 30.0  # with several ingress replicas: a channel moves between them


class AutoscalingConfig(BaseModel):
    """Serve's autoscaling of engine replicas (each replica = one engine = one worker group).

    policy "engine_load" (router/autoscaling.py) sizes the deployment by the most demanding of: ongoing
    requests / target_ongoing_requests, engine waiting queue / target_queue_depth, and summed KV usage /
    target_kv_usage; "ongoing_requests" is Serve's built-in request-count policy alone.
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    min_replicas: int = Field(1, ge=0)
    max_replicas: int = Field(1, ge=1)
    initial_replicas: int | None = Field(None, ge=0)
    target_ongoing_requests: float = Field(8.0, gt=0)
    upscale_delay_s: float = Field(5.0, ge=0)
    downscale_delay_s: float = Field(30.0, ge=0)
    policy: Literal["engine_load", "ongoing_requests"] = "engine_load"
    target_queue_depth: float = Field(2.0, gt=0, description="engine-waiting requests per replica to scale at")
    target_kv_usage: float = Field(0.8, gt=0, le=1, description="mean KV-pool usage to scale at")
    look_back_period_s: float = Field(15.0, gt=0, description="window Serve averages the load signals over")
    metrics_interval_s: float | None = Field(
        None, gt=0, description="how often replicas push load to Serve (default 10 s; Ray 2.60 reads only this, "
                                "not the RAY_SERVE_*_PUSH_INTERVAL_S variables); keep it under look_back_period_s")
    drain_timeout_s: float = Field(60.0, ge=0, description="a replica scaled down may finish its streams this long")

    def serve_dict(self) -> dict:
        """Serve's `autoscaling_config` (ray.serve.config.AutoscalingConfig fields)."""
        out = self.model_dump(exclude_none=True, exclude={"policy", "target_queue_depth", "target_kv_usage",
                                                          "drain_timeout_s"})
        if self.policy == "engine_load":
            out["policy"] = {"policy_function": ENGINE_LOAD_POLICY,
                             "policy_kwargs": {"target_queue_depth": self.target_queue_depth,
                                               "target_kv_usage": self.target_kv_usage}}
        return out


class ServeConfig(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    engine: EngineConfig
    model_name: str = Field("tidal", description="the name clients use (OpenAI 'model', gRPC 'model')")
    grpc_port: int = Field(9000, ge=1, le=65535)
    grpc_host: str = Field("0.0.0.0", description="where the ingress replicas' gRPC servers listen")
    grpc_max_connection_age_s: float | None = Field(
        None, gt=0, description="gRPC connections are recycled this often (in-flight calls finish), so a "
        "long-lived client channel moves between ingress replicas; by default 30 s with more than one ingress "
        "replica and never with one (a recycled connection can turn a call's deadline into UNAVAILABLE)")
    ingress_replicas: int = Field(1, ge=1, description="ingress processes on the head node (HTTP, gRPC, tokenizing)")
    http_port: int = Field(8000, ge=0, le=65535)
    http_host: str = "127.0.0.1"
    autoscaling: AutoscalingConfig = AutoscalingConfig()
    max_queued_per_replica: int = Field(64, ge=1, description="admitted but not running; beyond it: overloaded")
    max_ongoing_per_replica: int = Field(
        256, ge=1, description="requests Serve sends one engine replica at once; keep it above engine.max_num_seqs "
        "+ max_queued_per_replica, so the replica's own count refuses (exact) rather than Serve's per-ingress "
        "queue (which undercounts under contention: a request a full replica bounced is not counted while it retries)")
    stream_interval_ms: float = Field(
        STREAM_INTERVAL_MS, ge=0, le=10_000, description="a stream sends a request's new tokens at most this often "
        "(first and last at once); 0 sends every decode step")
    stream_messages_per_s: float = Field(
        STREAM_MESSAGES_PER_S, gt=0, description="an engine replica's streams together send about this many "
        "messages a second at most: with more streams than this times the interval, each stream's interval grows")
    api_key: str | None = Field(None, description="when set, clients must send 'authorization: Bearer <key>'")
    max_request_bytes: int = Field(4 << 20, ge=1 << 10, description="largest HTTP body (413 beyond) or gRPC "
                                   "message (RESOURCE_EXHAUSTED beyond) accepted")
    max_tokens_limit: int | None = Field(None, ge=1, description="largest max_tokens a request may ask for "
                                         "(400 / INVALID_ARGUMENT beyond); default: only the context bounds it")
    grpc_max_streams_per_connection: int = Field(256, ge=1, description="generation calls one gRPC connection "
                                                 "may have open at once (RESOURCE_EXHAUSTED beyond)")

    @property
    def grpc_connection_age_s(self) -> float | None:
        """How often the gRPC servers recycle a connection; None: never."""
        if self.grpc_max_connection_age_s is not None:
            return self.grpc_max_connection_age_s
        return DEFAULT_CONNECTION_AGE_S if self.ingress_replicas > 1 else None

    @classmethod
    def load(cls, path: str | None = None, **overrides) -> ServeConfig:
        """A YAML or JSON file, then flags on top (engine.* keys nest)."""
        data: dict = {}
        if path:
            import yaml

            data = yaml.safe_load(Path(path).read_text()) or {}
        engine = dict(data.pop("engine", {}) or {})
        engine.update({k[len("engine."):]: v for k, v in overrides.items()
                       if k.startswith("engine.") and v is not None})
        data.update({k: v for k, v in overrides.items() if not k.startswith("engine.") and v is not None})
        try:
            return cls(engine=engine, **data)
        except ValidationError as e:
            raise InvalidRequest(f"invalid serve configuration: {describe(e)}") from None
