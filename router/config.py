"""The serving configuration: one typed object from CLI flags or a YAML/JSON file, validated once."""

from __future__ import annotations

from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from workers.config import EngineConfig, InvalidRequest, describe


class AutoscalingConfig(BaseModel):
    """Serve's autoscaling of engine replicas (each replica = one engine = one worker group)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    min_replicas: int = Field(1, ge=0)
    max_replicas: int = Field(1, ge=1)
    initial_replicas: int | None = Field(None, ge=0)
    target_ongoing_requests: float = Field(8.0, gt=0)
    upscale_delay_s: float = Field(5.0, ge=0)
    downscale_delay_s: float = Field(30.0, ge=0)

    def serve_dict(self) -> dict:
        return self.model_dump(exclude_none=True)


class ServeConfig(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    engine: EngineConfig
    model_name: str = Field("tidal", description="the name clients use (OpenAI 'model', gRPC 'model')")
    grpc_port: int = Field(9000, ge=0, le=65535)
    http_port: int = Field(8000, ge=0, le=65535)
    http_host: str = "127.0.0.1"
    autoscaling: AutoscalingConfig = AutoscalingConfig()
    max_queued_per_replica: int = Field(64, ge=1, description="admitted but not running; beyond it: overloaded")
    max_ongoing_per_replica: int = Field(256, ge=1)
    api_key: str | None = Field(None, description="when set, clients must send 'authorization: Bearer <key>'")

    @classmethod
    def load(cls, path: str | None = None, **overrides) -> "ServeConfig":
        """A YAML or JSON file, then flags on top (engine.* keys nest)."""
        data: dict = {}
        if path:
            import yaml

            data = yaml.safe_load(Path(path).read_text()) or {}
        engine = dict(data.pop("engine", {}) or {})
        engine.update({k[len("engine."):]: v for k, v in overrides.items() if k.startswith("engine.") and v is not None})
        data.update({k: v for k, v in overrides.items() if not k.startswith("engine.") and v is not None})
        try:
            return cls(engine=engine, **data)
        except ValidationError as e:
            raise InvalidRequest(f"invalid serve configuration: {describe(e)}") from None
