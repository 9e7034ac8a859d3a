"""Typed configuration, validated once at the edge (CLI, servers, engine constructor)."""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator


class InvalidRequest(ValueError):
    """A request the engine refuses; servers map it to INVALID_ARGUMENT / HTTP 400."""


def describe(err: ValidationError) -> str:
    """One readable line per problem, instead of pydantic's multi-line report."""
    parts = []
    for e in err.errors():
        where = ".".join(str(x) for x in e["loc"]) or "value"
        parts.append(f"{where}: {e['msg']}")
    return "; ".join(parts)


MAX_STOPS = 4  # stop strings per request, as OpenAI allows
MAX_STOP_CHARS = 1000  # per stop string: holding back a partial match costs its length squared
MAX_LOGPROBS = 20  # alternatives per token, as OpenAI's top_logprobs allows


class StructuredOutput(BaseModel):
    """The grammar a request's output must follow: exactly one of a JSON schema (as JSON text), a regular
    expression, or a Lark grammar (workers/grammar.py)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    json_schema: str | None = None
    regex: str | None = None
    grammar: str | None = None

    @model_validator(mode="after")
    def _exactly_one(self) -> StructuredOutput:
        if sum(x is not None for x in (self.json_schema, self.regex, self.grammar)) != 1:
            raise ValueError("give exactly one of json_schema, regex, grammar")
        return self


class SamplingParams(BaseModel):
    """How to pick tokens for one request. temperature 0 means greedy."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    max_tokens: int = Field(16, ge=1)
    temperature: float = Field(0.0, ge=0.0, le=100.0)
    top_k: int = Field(0, ge=0, description="0 disables top-k")
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    seed: int | None = Field(None, ge=-(1 << 63), lt=1 << 64, description="what torch.Generator.manual_seed accepts")
    stop_token_ids: tuple[int, ...] = ()
    stop: tuple[Annotated[str, Field(min_length=1, max_length=MAX_STOP_CHARS)], ...] = Field(
        (), max_length=MAX_STOPS, description="stop strings: the text ends where the first one begins")
    ignore_eos: bool = False
    logprobs: int | None = Field(None, ge=0, le=MAX_LOGPROBS,
                                 description="report each token's log-probability and this many alternatives")
    presence_penalty: float = Field(0.0, ge=-2.0, le=2.0, description="subtracted once from tokens of the output")
    frequency_penalty: float = Field(0.0, ge=-2.0, le=2.0, description="subtracted per occurrence in the output")
    repetition_penalty: float = Field(1.0, gt=0.0, le=10.0, description="> 1 discourages tokens of prompt and output")
    sampler: Literal["lossless", "mix"] | None = Field(None, description="TiDAR's verifier for this request")
    mix_weight: float | None = Field(None, gt=0.0, le=1.0, description="w of the mix sampler; implies it")
    structured: StructuredOutput | None = Field(None, description="a grammar the output must follow")

    @model_validator(mode="after")
    def _mix_weight_needs_mix(self) -> SamplingParams:
        if self.mix_weight is not None and self.sampler == "lossless":
            raise ValueError("mix_weight applies to sampler 'mix', not 'lossless'")
        return self

    @classmethod
    def make(cls, **kwargs) -> SamplingParams:
        """Build from untrusted input; raise InvalidRequest with a one-line message."""
        try:
            return cls(**{k: v for k, v in kwargs.items() if v is not None})
        except ValidationError as e:
            raise InvalidRequest(f"invalid sampling parameters: {describe(e)}") from None

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0

    @property
    def penalized(self) -> bool:
        return self.presence_penalty != 0.0 or self.frequency_penalty != 0.0 or self.repetition_penalty != 1.0


class DraftRule(BaseModel):
    """While at most `max_batch` requests decode together, draft `block_size` tokens with these levels."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    max_batch: int = Field(ge=1)
    block_size: int = Field(ge=1, le=64)
    levels: tuple[int, ...]

    @model_validator(mode="after")
    def _levels(self) -> DraftRule:
        if 0 not in self.levels:
            raise ValueError("levels must contain 0 (without it acceptance collapses)")
        if any(not 0 <= p <= self.block_size for p in self.levels) or len(set(self.levels)) != len(self.levels):
            raise ValueError(f"levels must be distinct values in [0, block_size={self.block_size}]")
        return self


class TidarConfig(BaseModel):
    """Block-diffusion decoding options (used when EngineConfig.mode is 'tidar')."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    block_size: int = Field(16, ge=1, le=64, description="K: drafts verified per step")
    levels: tuple[int, ...] = (0, 4, 8, 16)
    sampler: Literal["lossless", "mix"] = "lossless"
    mix_weight: float = Field(0.5, gt=0.0, le=1.0, description="w in w * z_AR + (1 - w) * z_D")
    draft_temperature: float = Field(0.0, ge=0.0, description="0: point-mass drafts (argmax); > 0: sampled with q")
    two_forward: bool = False
    mask_token_id: int | None = Field(None, ge=0, description="overrides the checkpoint's mask token")
    schedule: tuple[DraftRule, ...] | None = Field(
        None, description="static drafting by batch size; default: adaptive (measured acceptance and step cost)")

    @model_validator(mode="after")
    def _levels(self) -> TidarConfig:
        DraftRule(max_batch=1, block_size=self.block_size, levels=self.levels)
        return self


class EngineConfig(BaseModel):
    """Everything an engine replica needs to start."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    model: str
    backend: Literal["native", "vllm"] = Field(
        "native", description="engine: ours, or vLLM with the tidal plugin (workers/vllm_backend.py; needs an extra)")
    dtype: Literal["float32", "bfloat16"] = "float32"
    device: str = "cpu"
    mode: Literal["ar", "tidar"] = "ar"
    block_size: int = Field(16, ge=1, description="tokens per paged KV block")
    kv_cache_bytes: int = Field(256 << 20, ge=1 << 16, description="memory budget of the KV pool")
    max_num_seqs: int = Field(64, ge=1, description="most requests running at once")
    max_num_batched_tokens: int = Field(512, ge=16, description="token budget of one step")
    max_model_len: int | None = Field(None, ge=2, description="defaults to the model's context")
    tidar: TidarConfig = TidarConfig()
    prefix_caching: bool = Field(True, description="share the KV (and ZAYA's CCA state) of repeated prompt prefixes")
    ep_size: int = Field(1, ge=1, description="expert-parallel worker actors (1 = in-process)")
    worker_timeout_s: float = Field(60.0, gt=0, description="a step or collective slower than this fails the group")

    @classmethod
    def make(cls, **kwargs) -> EngineConfig:
        try:
            return cls(**{k: v for k, v in kwargs.items() if v is not None})
        except ValidationError as e:
            raise InvalidRequest(f"invalid engine configuration: {describe(e)}") from None
