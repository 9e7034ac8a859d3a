"""Runs one flat forward of per-request step layouts over the paged KV cache, and returns logits."""

from __future__ import annotations

import torch

from workers.attention import AttentionMetadata, KVCache
from workers.draft_chain import DraftChain
from workers.layout import StepLayout, build_inputs

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


class RunnerFailure(RuntimeError):
    """The runner lost its device state (e.g. a worker actor died): every running request's KV is gone."""


def head_dim_of(hf_cfg) -> int:
    return getattr(hf_cfg, "head_dim", None) or hf_cfg.hidden_size // hf_cfg.num_attention_heads


class ModelRunner:
    """Owns the model, its paged KV cache and recurrent state on one device."""

    def __init__(self, model_dir: str, *, dtype: torch.dtype, device, block_size: int, num_blocks: int,
                 num_state_slots: int, max_step_tokens: int, expert_shard: tuple[int, int] | None = None,
                 prefix_caching: bool = False):
        from workers.models import load_model
        from workers.models.layers import prepare_for_inference

        self.model, hf_cfg = load_model(model_dir, dtype, device)
        if expert_shard is not None:
            from workers.expert_parallel import shard_experts

            shard_experts(self.model, *expert_shard)
        self.device = torch.device(device)
        prepare_for_inference(self.model, input_major=self.device.type == "cpu")  # fused q/k/v, gate/up
        self.block_size = block_size
        scratch = KVCache.scratch_blocks_for(max_step_tokens, num_state_slots, block_size)
        self.kv = KVCache(hf_cfg.num_hidden_layers, num_blocks, block_size, hf_cfg.num_key_value_heads,
                          head_dim_of(hf_cfg), dtype, device, scratch_blocks=scratch)
        # with the prefix cache, the recurrent state after each cached block is kept by block id
        self.state = self.model.make_state(num_state_slots, dtype, device, num_blocks if prefix_caching else 0)
        self._meta: AttentionMetadata | None = None
        # long pasts read in place (PastView): on CPU in any dtype (the flash kernel accumulates in fp32, pieces
        # merge in fp32); elsewhere only fp32 caches (plain matmul scores round to the cache dtype)
        self.view_past = self.device.type == "cpu" or dtype == torch.float32
        head = self.model.markov_head
        self.draft_chain = DraftChain(head, self.model.dspark_block_len) if head is not None else None

    @torch.inference_mode()
    def forward(self, layouts: list[StepLayout], computed: list[int], block_tables: list[list[int]],
                state_slots: list[int], restore: list[tuple[int, int]] = ()) -> torch.Tensor:
        """Run one forward. Returns logits [sum(len(logit_rows)), V] in request order (fp32).

        `restore`: (state slot, block) pairs: requests resuming from a cached prefix first load the recurrent
        state kept for its last block.

        Interface: verify and prefill rows are the LM head's logits; proposal rows (each layout's last
        `num_draft_rows`) are the draft head's (`compute_draft_logits`: the draft output layer when the
        checkpoint has one), before the Markov chain, which the engine walks after verification."""
        meta, input_ids, positions, rows = build_inputs(layouts, computed, block_tables, state_slots,
                                                        self.block_size, self.device, self.kv.num_blocks,
                                                        view_past=self.view_past)
        if meta.scratch_blocks > self.kv.scratch_blocks:
            raise ValueError(f"a step of {len(input_ids)} tokens needs {meta.scratch_blocks} scratch KV blocks; "
                             f"the runner has {self.kv.scratch_blocks} (raise max_step_tokens)")
        if restore and self.state is not None:
            slots, blocks = (torch.tensor(x, dtype=torch.long, device=self.device) for x in zip(*restore, strict=True))
            self.state.restore(slots, blocks)
        hidden = self.model(input_ids, positions, meta, self.kv, self.state)  # [T, H]
        self._meta = meta
        if self.model.diffusion_output_layer is None or not any(l.num_draft_rows for l in layouts):
            return self.model.compute_logits(hidden[rows])
        heads: tuple[list[int], list[int]] = ([], [])  # (LM-head rows, draft-head rows), as indices into `rows`
        at = 0
        for l in layouts:
            verify = len(l.logit_rows) - l.num_draft_rows
            heads[0].extend(range(at, at + verify))
            heads[1].extend(range(at + verify, at + len(l.logit_rows)))
            at += len(l.logit_rows)
        lm, draft = (torch.tensor(h, dtype=torch.long, device=self.device) for h in heads)
        logits = torch.empty(len(rows), self.model.cfg.vocab_size, device=self.device)
        logits[lm] = self.model.compute_logits(hidden[rows[lm]])
        logits[draft] = self.model.compute_draft_logits(hidden[rows[draft]])
        return logits

    def commit(self, last_kept: list[int], snapshots: list[tuple[int, int, int]] = ()) -> None:
        """Keep the recurrent state after token `last_kept[b]` (local index) of each request of the last forward,
        and for the prefix cache the state after each (request b, local index i, block) that ends a full block."""
        if self.state is None:
            return
        meta = self._meta
        last = meta.starts + torch.tensor(last_kept, device=self.device)
        if snapshots:
            b, i, blocks = (torch.tensor(x, dtype=torch.long, device=self.device) for x in zip(*snapshots, strict=True))
            self.state.commit(meta, last, meta.starts[b] + i, blocks)
        else:
            self.state.commit(meta, last)
