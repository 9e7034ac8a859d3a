"""Turns per-request step layouts into one flat forward over the paged KV cache, and returns logits."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from workers.attention import AttentionMetadata, KVCache
from workers.draft_chain import DraftChain

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


class RunnerFailure(RuntimeError):
    """The runner lost its device state (e.g. a worker actor died): every running request's KV is gone."""


def head_dim_of(hf_cfg) -> int:
    return getattr(hf_cfg, "head_dim", None) or hf_cfg.hidden_size // hf_cfg.num_attention_heads


@dataclass
class StepLayout:
    """What one request feeds into a forward.

    Tokens sit at `positions`; the first `num_write` of them enter the KV cache (the rest are scratch,
    e.g. TiDAR proposals). `parent[i]` is the local index of the token one back on token i's branch
    (-1 = the last committed token): it drives ZAYA's convolution and delayed value. `mask[i, j]` says
    whether new token i may see new token j (None = causal). Every new token sees the whole cached prefix.
    The last `num_draft_rows` of `logit_rows` are proposal (mask) slots: their logits come from the draft
    head, not the LM head (see ModelRunner.forward).
    """

    token_ids: list[int]
    positions: list[int]
    parent: list[int]
    num_write: int
    logit_rows: list[int]  # local indices whose logits are returned
    mask: torch.Tensor | None = None  # [q, q] bool
    num_draft_rows: int = 0

    @staticmethod
    def causal(token_ids: list[int], start: int, want_logits: bool) -> "StepLayout":
        q = len(token_ids)
        return StepLayout(token_ids, list(range(start, start + q)), list(range(-1, q - 1)), q,
                          [q - 1] if want_logits else [])


class ModelRunner:
    """Owns the model, its paged KV cache and recurrent state on one device."""

    def __init__(self, model_dir: str, *, dtype: torch.dtype, device, block_size: int, num_blocks: int,
                 num_state_slots: int, expert_shard: tuple[int, int] | None = None):
        from workers.models import load_model

        self.model, hf_cfg = load_model(model_dir, dtype, device)
        if expert_shard is not None:
            from workers.expert_parallel import shard_experts

            shard_experts(self.model, *expert_shard)
        self.device = torch.device(device)
        self.block_size = block_size
        self.kv = KVCache(hf_cfg.num_hidden_layers, num_blocks, block_size, hf_cfg.num_key_value_heads,
                          head_dim_of(hf_cfg), dtype, device)
        self.state = self.model.make_state(num_state_slots, dtype, device)
        self._meta: AttentionMetadata | None = None
        head = self.model.markov_head
        self.draft_chain = DraftChain(head, self.model.dspark_block_len) if head is not None else None

    @torch.inference_mode()
    def forward(self, layouts: list[StepLayout], computed: list[int], block_tables: list[list[int]],
                state_slots: list[int]) -> torch.Tensor:
        """Run one forward. Returns logits [sum(len(logit_rows)), V] in request order (fp32).

        Interface: verify and prefill rows are the LM head's logits; proposal rows (each layout's last
        `num_draft_rows`) are the draft head's (`compute_draft_logits`: the draft output layer when the
        checkpoint has one), before the Markov chain, which the engine walks after verification."""
        meta, input_ids, positions, rows = build_inputs(layouts, computed, block_tables, state_slots,
                                                        self.block_size, self.device)
        hidden = self.model(input_ids, positions, meta, self.kv, self.state)[rows]
        self._meta = meta
        if self.model.diffusion_output_layer is None or not any(l.num_draft_rows for l in layouts):
            return self.model.compute_logits(hidden)
        is_draft = torch.tensor([i >= len(l.logit_rows) - l.num_draft_rows for l in layouts
                                 for i in range(len(l.logit_rows))], device=self.device)
        logits = torch.empty(len(hidden), self.model.cfg.vocab_size, device=self.device)
        logits[~is_draft] = self.model.compute_logits(hidden[~is_draft])
        logits[is_draft] = self.model.compute_draft_logits(hidden[is_draft])
        return logits

    def commit(self, last_kept: list[int]) -> None:
        """Keep the recurrent state after token `last_kept[b]` (local index) of each request of the last forward."""
        if self.state is None:
            return
        meta = self._meta
        offsets = meta.query_index[:, 0]
        self.state.commit(meta, offsets + torch.tensor(last_kept, device=self.device))


def build_inputs(layouts: list[StepLayout], computed: list[int], block_tables: list[list[int]], state_slots: list[int],
                 block_size: int, device) -> tuple[AttentionMetadata, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Flatten per-request layouts into (metadata, input_ids [T], positions [T], logit row indices [N]).

    The trainer calls this too (no cached prefix, empty block tables), so training and inference
    share one definition of masks, positions and CCA branches.
    """
    dev, bs = torch.device(device), block_size
    b = len(layouts)
    q_lens = [len(l.token_ids) for l in layouts]
    q_max, p_max = max(q_lens), max(max(computed), 1)
    offsets = [0]
    for q in q_lens:
        offsets.append(offsets[-1] + q)
    total = offsets[-1]

    input_ids = torch.tensor([t for l in layouts for t in l.token_ids], device=dev)
    positions = torch.tensor([p for l in layouts for p in l.positions], device=dev)
    ar = torch.arange(q_max, device=dev)
    q_len_t = torch.tensor(q_lens, device=dev)
    query_valid = ar[None, :] < q_len_t[:, None]
    query_index = torch.where(query_valid, torch.tensor(offsets[:-1], device=dev)[:, None] + ar, 0)

    n_blocks = max(len(t) for t in block_tables)
    table = torch.zeros(b, max(n_blocks, 1), dtype=torch.long, device=dev)
    for i, t in enumerate(block_tables):
        table[i, : len(t)] = torch.tensor(t, dtype=torch.long, device=dev)

    def slots_of(pos: torch.Tensor, req: torch.Tensor) -> torch.Tensor:
        return table[req, pos // bs] * bs + pos % bs

    past_pos = torch.arange(p_max, device=dev)
    computed_t = torch.tensor(computed, device=dev)
    past_valid = past_pos[None, :] < computed_t[:, None]  # [B, Pmax]
    req_ids = torch.arange(b, device=dev)[:, None]
    past_slots = torch.where(past_valid, slots_of(past_pos[None, :].expand(b, -1), req_ids), 0)

    new_mask = torch.zeros(b, q_max, q_max, dtype=torch.bool, device=dev)
    for i, l in enumerate(layouts):
        q = q_lens[i]
        new_mask[i, :q, :q] = l.mask if l.mask is not None else torch.ones(q, q, dtype=torch.bool, device=dev).tril()
        new_mask[i, q:, q:] = torch.eye(q_max - q, dtype=torch.bool, device=dev)  # padding rows see themselves
    mask = torch.cat([past_valid[:, None, :].expand(-1, q_max, -1) & query_valid[:, :, None], new_mask], dim=2)

    write_index, write_req = [], []
    for i, l in enumerate(layouts):
        write_index.extend(range(offsets[i], offsets[i] + l.num_write))
        write_req.extend([i] * l.num_write)
    write_index_t = torch.tensor(write_index, dtype=torch.long, device=dev)
    write_slots = slots_of(positions[write_index_t], torch.tensor(write_req, dtype=torch.long, device=dev))

    # ZAYA conv windows: ext table = [zero, (older, newer) state of each request, new tokens]
    base = 1 + 2 * b
    conv = []
    for i, l in enumerate(layouts):
        cold = computed[i] == 0
        newer, older = (0, 0) if cold else (1 + 2 * i + 1, 1 + 2 * i)

        def ext(j: int) -> int:
            return base + offsets[i] + j if j >= 0 else newer

        for j, p in enumerate(l.parent):
            grand = l.parent[p] if p >= 0 else None
            conv.append((ext(grand) if grand is not None else older, ext(p), base + offsets[i] + j))
    conv_index = torch.tensor(conv, dtype=torch.long, device=dev).view(total, 3)

    rows = torch.tensor([offsets[i] + r for i, l in enumerate(layouts) for r in l.logit_rows],
                        dtype=torch.long, device=dev)
    meta = AttentionMetadata(
        write_index=write_index_t,
        write_slots=write_slots,
        query_index=query_index,
        query_valid=query_valid,
        past_slots=past_slots,
        mask=mask[:, None],
        conv_index=conv_index,
        state_slots=torch.tensor(state_slots, dtype=torch.long, device=dev),
    )
    return meta, input_ids, positions, rows
