"""The native engine (workers.backends.Engine): add_request / step / abort, and a blocking generate.

A step reads schedule -> run -> postprocess, as in nano-vllm.
"""

from __future__ import annotations

import itertools
import json
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

import torch

from workers import tidar
from workers.attention import KVCache
from workers.backends import EngineInfo, EngineLoad, EngineStartError
from workers.block_manager import BlockManager
from workers.config import EngineConfig, InvalidRequest, SamplingParams
from workers.draft_chain import DraftInput
from workers.draft_policy import make_policy
from workers.grammar import GrammarCompiler, RequestGrammar
from workers.layout import StepLayout
from workers.loader import load_hf_config, load_tokenizer
from workers.model_runner import DTYPES, ModelRunner, RunnerFailure, head_dim_of
from workers.models import state_snapshot_bytes
from workers.request import (
    Request,
    RequestOutput,
    RequestTimes,
    StepRecord,
    TokenLogprob,
    generate_all,
    prompt_token_ids,
    stop_watcher,
)
from workers.sampler import make_generator
from workers.scheduler import Scheduled, Scheduler


def eos_token_ids(model_dir: str, hf_cfg) -> set[int]:
    ids: set[int] = set()
    sources = [getattr(hf_cfg, "eos_token_id", None)]
    gen = Path(model_dir) / "generation_config.json"
    if gen.is_file():
        sources.append(json.loads(gen.read_text()).get("eos_token_id"))
    for s in sources:
        if isinstance(s, int):
            ids.add(s)
        elif isinstance(s, list):
            ids.update(int(x) for x in s)
    return ids


@dataclass
class StepSize:
    """What one step fed the model, for the drafting policy's cost fit."""

    slots: int = 0  # token slots over the step's forwards
    logit_rows: int = 0  # of them, rows that returned logits


class LLMEngine:
    def __init__(self, config: EngineConfig):
        self.config = config
        dtype = DTYPES[config.dtype]
        self.hf_config = load_hf_config(config.model)
        self.tokenizer = load_tokenizer(config.model)
        self.eos_token_ids = eos_token_ids(config.model, self.hf_config)
        self.grammars: GrammarCompiler | None = None  # built at the first request with structured output
        self.vocab_size = self.hf_config.vocab_size

        c = self.hf_config
        per_block = KVCache.bytes_per_block(c.num_hidden_layers, config.block_size, c.num_key_value_heads,
                                            head_dim_of(c), dtype)
        # ZAYA with the prefix cache: each cached block keeps the CCA state after its last token
        snapshot_bytes = state_snapshot_bytes(c, dtype) if config.prefix_caching else 0
        self.keeps_state_snapshots = snapshot_bytes > 0
        per_block += snapshot_bytes
        num_blocks = config.kv_cache_bytes // per_block
        if num_blocks < 2:
            raise EngineStartError(f"kv_cache_bytes {config.kv_cache_bytes} holds fewer than 2 KV blocks "
                                 f"of {per_block} bytes")
        model_len = getattr(c, "max_position_embeddings", 1 << 30)
        # one request alone must always fit in the pool, or preemption could never make progress
        self.max_model_len = min(config.max_model_len or model_len, model_len, num_blocks * config.block_size)

        self.mask_token_id = tidar.resolve_mask_token(c, config.tidar.mask_token_id)
        if config.mode == "tidar" and self.mask_token_id is None:
            raise EngineStartError(
                f"tidar mode needs a mask token, and {config.model}/config.json names none "
                f"(looked for {', '.join(tidar.MASK_TOKEN_ATTRS)}); add one there or pass --mask-token-id")
        if self.mask_token_id is not None and not 0 <= self.mask_token_id < c.vocab_size:
            raise EngineStartError(f"mask token id {self.mask_token_id} is outside the vocabulary "
                                   f"(size {c.vocab_size})")
        self.policy = make_policy(config) if config.mode == "tidar" else None
        self.blocks = BlockManager(num_blocks, config.block_size, config.max_num_seqs, config.prefix_caching)
        self.scheduler = Scheduler(self.blocks, config.max_num_seqs, config.max_num_batched_tokens,
                                   self.max_model_len, self.policy, config.tidar.two_forward)
        # a two-forward draft pass may exceed the step budget: [anchor, K + 1 masks] per request, K <= 64
        max_step_tokens = max(config.max_num_batched_tokens, config.max_num_seqs * (64 + 2))
        runner_args = dict(dtype=dtype, device=config.device, block_size=config.block_size, num_blocks=num_blocks,
                           num_state_slots=config.max_num_seqs, max_step_tokens=max_step_tokens,
                           prefix_caching=config.prefix_caching)
        if config.ep_size > 1:
            from workers.worker_group import WorkerGroup

            self.runner = WorkerGroup(config.model, config.ep_size, runner_args, config.worker_timeout_s)
        else:
            self.runner = ModelRunner(config.model, **runner_args)
        self.requests: dict[str, Request] = {}
        self._arrivals = itertools.count()
        self.num_steps = 0
        self.info = EngineInfo(c.architectures[0], c.vocab_size, self.max_model_len, tuple(sorted(self.eos_token_ids)))

    # ---- requests -------------------------------------------------------------------------------

    def decode(self, token_ids: list[int]) -> str:
        return self.tokenizer.decode(token_ids) if self.tokenizer is not None else ""

    def add_request(self, prompt: str | list[int], params: SamplingParams | None = None,
                    request_id: str | None = None) -> str:
        """Validate and queue a request; raises InvalidRequest without touching other requests."""
        params = params or SamplingParams()
        ids = prompt_token_ids(prompt, self.tokenizer, self.vocab_size, self.max_model_len)
        request_id = request_id or uuid.uuid4().hex
        if request_id in self.requests:
            raise InvalidRequest(f"request id {request_id!r} is already in use")
        req = Request(request_id, ids, params, next(self._arrivals),
                      generator=make_generator(params, self.config.device),
                      stop_strings=stop_watcher(params, self.tokenizer), grammar=self._grammar(params))
        self.requests[request_id] = req
        self.scheduler.add(req)
        return request_id

    def _grammar(self, params: SamplingParams) -> RequestGrammar | None:
        if params.structured is None:
            return None
        if self.tokenizer is None:
            raise InvalidRequest("structured output needs the model's tokenizer.json")
        if self.grammars is None:
            self.grammars = GrammarCompiler(self.tokenizer, self.hf_config.vocab_size, self.eos_token_ids)
        return self.grammars.compile(params.structured)

    def abort(self, request_id: str) -> None:
        req = self.requests.pop(request_id, None)
        if req is not None and not req.finished:
            self.scheduler.finish(req, "abort")

    def has_unfinished(self) -> bool:
        return self.scheduler.has_work()

    # ---- the step ---------------------------------------------------------------------------------

    def step(self) -> list[RequestOutput]:
        """schedule -> one forward -> accept/sample -> commit KV and state (-> draft pass, two-forward mode)."""
        start = time.perf_counter()
        batch = self.scheduler.schedule()
        if not batch:
            return []
        self.num_steps += 1
        try:
            outputs, size = self._run(batch)
            if self.policy is not None:  # the whole step's cost: drafting adds work outside the forward too
                verifies = [(o.step.drafted, o.step.accepted) for o in outputs if o.step]
                self.policy.observe(size.slots, time.perf_counter() - start, verifies, size.logit_rows)
            return outputs
        except RunnerFailure as e:
            failed = list(self.scheduler.running)
            for req in failed:
                self.scheduler.finish(req, "error")
                self.requests.pop(req.request_id, None)
            return [RequestOutput(r.request_id, [], True, "error", r.prompt_token_ids, list(r.output_token_ids),
                                  r.stats.totals(), error=str(e)) for r in failed]

    def _run(self, batch: list[Scheduled]) -> tuple[list[RequestOutput], StepSize]:
        size = StepSize()
        layouts = [tidar.layout(s, self.mask_token_id) if s.samples else
                   StepLayout.causal(self._known(s), s.request.num_computed_tokens, False) for s in batch]
        logits = self._forward(batch, layouts, size)
        best = self._greedy_argmax(batch, layouts, logits)
        outcomes, row = [], 0
        for s, lay in zip(batch, layouts, strict=True):
            n = len(lay.logit_rows)
            outcomes.append(tidar.accept(s, logits[row : row + n], self.config.tidar, best.get(s.request.request_id))
                            if s.samples else None)
            row += n
        last_kept = [o.last_kept if o else s.num_tokens - 1 for s, o in zip(batch, outcomes, strict=True)]
        self.runner.commit(last_kept, self._snapshots(batch, last_kept))

        outputs, redraft, proposals = [], [], []
        for s, o, kept in zip(batch, outcomes, last_kept, strict=True):
            req = s.request
            req.num_computed_tokens += kept + 1
            if o is None:
                self.blocks.cache_committed(req)
                continue
            self.blocks.trim(req, req.num_computed_tokens)  # KV rollback of the rejected drafts
            self.blocks.cache_committed(req)  # only now: verified tokens alone are named
            out = self._append(req, o.tokens, o.logprobs)
            out.step = StepRecord(o.drafted, o.accepted, o.level, len(out.new_token_ids), len(batch))
            outputs.append(out)
            if req.finished:
                continue
            if o.proposal is not None:
                proposals.append((s, o.proposal))
            if self.config.tidar.two_forward and s.num_drafts:
                redraft.append(s)
        tidar.set_drafts(proposals, self.runner.draft_chain, self.config.tidar)
        if redraft:
            self._draft_pass(redraft, size)
        return outputs, size

    def _snapshots(self, batch: list[Scheduled], last_kept: list[int]) -> list[tuple[int, int, int]]:
        """(request index, local index, block) for each token of the step that is kept and ends a full block:
        the prefix cache keeps the recurrent state after it (ZAYA's CCA; none for attention-only models)."""
        if not self.keeps_state_snapshots:
            return []
        bs, out = self.config.block_size, []
        for b, (s, kept) in enumerate(zip(batch, last_kept, strict=True)):
            req = s.request
            before, after = req.num_computed_tokens, req.num_computed_tokens + kept + 1
            for i in range(before // bs, after // bs):
                out.append((b, (i + 1) * bs - 1 - before, req.block_table[i]))
        return out

    @staticmethod
    def _greedy_argmax(batch: list[Scheduled], layouts: list[StepLayout], logits: torch.Tensor) -> dict[str, list[int]]:
        """Greedy verification needs only the argmax of each verify row: one call for the whole batch.
        Returns request id -> argmax of its verify rows (greedy requests only)."""
        rows, spans, row = [], {}, 0
        for s, lay in zip(batch, layouts, strict=True):
            verify = len(lay.logit_rows) - lay.num_draft_rows
            p = s.request.params
            if s.samples and p.greedy and not p.penalized and p.structured is None:  # those move the argmax
                spans[s.request.request_id] = (len(rows), len(rows) + verify)
                rows.extend(range(row, row + verify))
            row += len(lay.logit_rows)
        if not rows:
            return {}
        best = logits[torch.tensor(rows, device=logits.device)].argmax(dim=-1).tolist()
        return {rid: best[a:b] for rid, (a, b) in spans.items()}

    def _known(self, s: Scheduled) -> list[int]:
        start = s.request.num_computed_tokens
        return s.request.all_token_ids[start : start + s.num_tokens]

    def _forward(self, batch: list[Scheduled], layouts: list[StepLayout], size: StepSize) -> torch.Tensor:
        reqs = [s.request for s in batch]
        restore = [(r.state_slot, r.restore_state_from) for r in reqs if r.restore_state_from is not None]
        logits = self.runner.forward(layouts, [r.num_computed_tokens for r in reqs], [r.block_table for r in reqs],
                                     [r.state_slot for r in reqs], restore)
        for r in reqs:
            r.restore_state_from = None
        size.slots += sum(len(lay.token_ids) for lay in layouts)
        size.logit_rows += sum(len(lay.logit_rows) for lay in layouts)
        return logits

    def _draft_pass(self, batch: list[Scheduled], size: StepSize) -> None:
        """Two-forward mode: draft K tokens after each new anchor from the committed state."""
        layouts = [tidar.draft_pass_layout(s, self.mask_token_id) for s in batch]
        logits = self._forward(batch, layouts, size)
        row, proposals = 0, []
        for s, lay in zip(batch, layouts, strict=True):
            req = s.request
            # [new anchor at position num_computed_tokens, its K + 1 mask slots]: drafts from slot 0
            rows = logits[row + 1 : row + len(lay.logit_rows)][: s.block_len - 1]
            proposals.append((s, DraftInput(rows, req.output_token_ids[-1], req.num_computed_tokens + 1,
                                            req.generator)))
            row += len(lay.logit_rows)
            req.stats.forwards += 1
        tidar.set_drafts(proposals, self.runner.draft_chain, self.config.tidar)

    def _append(self, req: Request, tokens: list[int], logprobs: list[TokenLogprob] | None = None) -> RequestOutput:
        """Add tokens (and their logprobs) up to the first stop condition; finish the request there."""
        p = req.params
        kept, reason = [], None
        for t in tokens:
            kept.append(t)
            if (t in p.stop_token_ids or (not p.ignore_eos and t in self.eos_token_ids)
                    or (req.stop_strings is not None and req.stop_strings.feed(t))
                    or (req.grammar is not None and req.grammar.complete_after(t))):
                reason = "stop"
            elif (len(req.output_token_ids) + len(kept) >= p.max_tokens
                  or req.num_tokens + len(kept) >= self.max_model_len):
                reason = "length"
            if reason:
                break
        req.output_token_ids.extend(kept)
        if req.first_token_time is None:
            req.first_token_time = time.time()
        req.stats.forwards += 1
        req.stats.generated_tokens += len(kept)
        if reason:
            self.scheduler.finish(req, reason)
            self.requests.pop(req.request_id, None)
        out = self.output_of(req, kept)
        out.logprobs = logprobs[: len(kept)] if logprobs is not None else None
        return out

    def output_of(self, req: Request, new_tokens: list[int]) -> RequestOutput:
        times = RequestTimes(req.arrival_time, req.first_scheduled_time, req.first_token_time)
        return RequestOutput(req.request_id, new_tokens, req.finished, req.finish_reason, req.prompt_token_ids,
                             list(req.output_token_ids), req.stats.totals() if req.finished else None, times=times)

    # ---- convenience -------------------------------------------------------------------------------

    def generate(self, prompts: list[str | list[int]], params: SamplingParams | list[SamplingParams] | None = None
                 ) -> list[RequestOutput]:
        """Run prompts to completion together; results in prompt order (all or nothing on an invalid one)."""
        return generate_all(self, prompts, params)

    def load(self) -> EngineLoad:
        return EngineLoad(len(self.scheduler.waiting), len(self.scheduler.running), self.blocks.usage(), self.num_steps,
                          self.blocks.cached_free_usage())

    def shutdown(self) -> None:
        if hasattr(self.runner, "shutdown"):  # an expert-parallel worker group: its actors
            self.runner.shutdown()
