"""The engine interface both backends implement, and the one place a backend is chosen.

`native` is workers.engine.LLMEngine (ours, CPU and GPU); `vllm` is workers.vllm_backend.VllmEngine (vLLM
running our models through the plugin). The router and the CLI see an engine only through `Engine`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

from workers.config import EngineConfig, SamplingParams
from workers.request import RequestOutput


class EngineStartError(RuntimeError):
    """The engine could not start with this configuration (a server problem, never a client's 400)."""


@dataclass(frozen=True)
class EngineInfo:
    """What an engine serves, fixed once it has started."""

    architecture: str  # the checkpoint's architecture, e.g. ZayaForCausalLM
    vocab_size: int
    max_model_len: int  # longest prompt + output a request may have
    eos_token_ids: tuple[int, ...]  # sorted


@dataclass(frozen=True)
class EngineLoad:
    """What the router reads to admit, route and autoscale."""

    waiting: int  # admitted requests not yet in the running batch
    running: int  # requests in the running batch
    kv_usage: float  # share of KV blocks in use, 0..1
    steps: int  # engine steps so far
    prefix_cache_usage: float = 0.0  # share of KV blocks nobody holds that keep a cached prefix (evictable)


class Engine(Protocol):
    info: EngineInfo

    def add_request(self, prompt: str | list[int], params: SamplingParams | None = None,
                    request_id: str | None = None) -> str:
        """Validate and queue; raises InvalidRequest (nothing else changes) for bad input."""

    def step(self) -> list[RequestOutput]:
        """One engine step: the new tokens of every request that got any."""

    def abort(self, request_id: str) -> None:
        """Stop a request and free its KV now (unknown ids are ignored)."""

    def has_unfinished(self) -> bool: ...

    def load(self) -> EngineLoad: ...

    def generate(self, prompts: list[str | list[int]], params: SamplingParams | list[SamplingParams] | None = None
                 ) -> list[RequestOutput]:
        """Run prompts to completion together; results in prompt order."""

    def shutdown(self) -> None:
        """Release what the engine holds outside this process (vLLM's engine core, expert-parallel actors)."""


def create_engine(config: EngineConfig) -> Engine:
    """The engine `config.backend` names; EngineStartError when it cannot start."""
    if config.backend == "vllm":
        from workers.vllm_backend import VllmEngine

        return VllmEngine(config)
    from workers.engine import LLMEngine

    return LLMEngine(config)
