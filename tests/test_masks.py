"""The TiDAR token layout and attention mask (workers.masks), checked against the rules written out
in docs (shared/notes/algorithm.md, "One decode step" and "CCA under speculation"), not against the
code's own formulas.

Every test restates the rule as a per-slot predicate ("may slot i see slot j?", "which position does
slot i sit at?", "which token is one back on slot i's branch?") and compares it with the layout for
every small case: 1-3 known tokens (a decode anchor, or the tail of a prefill chunk), 0-4 drafts, and
every level set that contains 0.
"""

from __future__ import annotations

import itertools

import pytest
import torch

from workers.layout import build_inputs
from workers.masks import step_layout, training_layout

MASK = 99


def level_sets(k: int):
    """Every subset of 0..k that contains 0, plus no proposals at all."""
    yield ()
    rest = list(range(1, k + 1))
    for r in range(len(rest) + 1):
        for extra in itertools.combinations(rest, r):
            yield (0, *extra)


def cases():
    for n_known in (1, 2, 3):
        for k in range(0, 5):
            for levels in level_sets(k):
                for block_len in sorted({k + 1, 2}):
                    yield n_known, k, levels, block_len


def describe_slots(n_known: int, k: int, levels: tuple[int, ...], block_len: int, start: int):
    """The layout from the definition: for every slot, (kind, block j, index in its segment, position)."""
    anchor = n_known - 1
    slots = [("verify", None, i, start + i) for i in range(n_known + k)]
    for j, p in enumerate(levels):
        slots += [("proposal", j, s, start + anchor + p + 1 + s) for s in range(block_len)]
    return slots


def may_see(slots, anchor: int, levels, a: int, b: int) -> bool:
    ka, ja, ia, _ = slots[a]
    kb, jb, ib, _ = slots[b]
    if ka == "verify":
        return kb == "verify" and ib <= ia  # causal, never a proposal
    if kb == "verify":
        return ib <= anchor + levels[ja]  # the verify slots up to anchor + p_j
    return ja == jb  # its own block, bidirectionally; never another block


def branch_parent(slots, anchor: int, levels, a: int) -> int:
    """Local index of the token one back on slot a's branch (-1: the last committed token)."""
    kind, j, i, _ = slots[a]
    if kind == "verify":
        return i - 1
    if i == 0:
        return anchor + levels[j]  # proposal slot 0 continues verify slot anchor + p_j
    return a - 1  # then the block's own previous slot


@pytest.mark.parametrize("start", [0, 7])
def test_step_layout_matches_the_definition(start):
    n = 0
    for n_known, k, levels, block_len in cases():
        known = [10 + i for i in range(n_known)]
        drafts = [20 + i for i in range(k)]
        lay = step_layout(known, drafts, start, levels, block_len, MASK)
        anchor = n_known - 1
        slots = describe_slots(n_known, k, levels, block_len, start)
        q = len(slots)
        where = f"known={n_known} k={k} levels={levels} block_len={block_len} start={start}"

        assert lay.token_ids == known + drafts + [MASK] * (block_len * len(levels)), where
        assert lay.positions == [s[3] for s in slots], where
        assert lay.parent == [branch_parent(slots, anchor, levels, a) for a in range(q)], where
        assert lay.num_write == n_known + k, where  # verify slots only: proposals are scratch
        # rows: the anchor's and every draft's (k + 1 AR rows), then every proposal slot in block order
        assert lay.logit_rows == list(range(anchor, n_known + k)) + list(range(n_known + k, q)), where
        expect = torch.tensor([[may_see(slots, anchor, levels, a, b) for b in range(q)] for a in range(q)])
        assert lay.mask is not None and lay.mask.dtype == torch.bool and lay.mask.shape == (q, q), where
        assert torch.equal(lay.mask, expect), where
        n += 1
    assert n > 100


def test_verify_rows_are_causal_and_never_see_proposals():
    lay = step_layout([5, 6], [7, 8, 9], 4, (0, 1, 3), 4, MASK)
    v = 5
    verify = lay.mask[:v]
    assert torch.equal(verify[:, :v], torch.ones(v, v, dtype=torch.bool).tril())
    assert not verify[:, v:].any()


def test_each_proposal_sees_its_prefix_and_only_its_own_block():
    # anchor at local 0 (position 10), K = 4 drafts, levels 0, 2, 4, blocks of K + 1 = 5
    lay = step_layout([3], [1, 2, 3, 4], 10, (0, 2, 4), 5, MASK)
    v = 5
    for j, p in enumerate((0, 2, 4)):
        lo = v + 5 * j
        rows = lay.mask[lo : lo + 5]
        assert rows[:, : p + 1].all() and not rows[:, p + 1 : v].any(), p  # verify slots 0..p only
        assert rows[:, lo : lo + 5].all()  # bidirectional inside the block
        others = torch.ones(lay.mask.shape[1], dtype=torch.bool)
        others[: v] = False
        others[lo : lo + 5] = False
        assert not rows[:, others].any()  # no other block
        # slot 0 sits right after the last verify slot it sees: position b + p + 1, then contiguous
        assert lay.positions[lo : lo + 5] == list(range(10 + p + 1, 10 + p + 6))
        # CCA branch: slot 0 continues verify slot p, slot s continues slot s - 1
        assert lay.parent[lo : lo + 5] == [p, lo, lo + 1, lo + 2, lo + 3]
    assert lay.parent[:v] == [-1, 0, 1, 2, 3]


def test_no_drafts_no_levels_is_plain_causal_and_write_false_writes_nothing():
    lay = step_layout([1, 2, 3], [], 0, (), 0, MASK)
    assert torch.equal(lay.mask, torch.ones(3, 3, dtype=torch.bool).tril())
    assert lay.logit_rows == [2] and lay.num_write == 3 and lay.parent == [-1, 0, 1]
    draft_pass = step_layout([4], [], 9, (0,), 5, MASK, write=False)
    assert draft_pass.num_write == 0
    assert draft_pass.positions == [9, 10, 11, 12, 13, 14]
    assert draft_pass.logit_rows == [0, 1, 2, 3, 4, 5]


def test_cca_conv_windows_follow_each_branch():
    """build_inputs turns parents into ZAYA conv windows (two back, one back, itself) over the table
    [zero, (older, newer) committed state per request, new tokens]: proposal slot 0 at level p holds
    verify slots p-1 and p (the committed 'newer' state when p = 0), slot 1 holds verify slot p and
    mask slot 0, then masks only. A cold request (nothing cached) sees zeros instead of state."""
    k, levels, bl = 3, (0, 1, 3), 4
    lay = step_layout([7], [1, 2, 3], 5, levels, bl, MASK)
    cold = step_layout([1, 2], [], 0, (0,), 2, MASK)
    meta, *_ = build_inputs([lay, cold], [5, 0], [[0, 1, 2], [3]], [2, 0], 4, "cpu")
    b = 2
    zero, older, newer = 0, 1, 2  # request 0's state rows
    base = 1 + 2 * b
    x = lambda i: base + i  # request 0's new token i
    conv = meta.conv_index.tolist()
    assert conv[0] == [older, newer, x(0)]  # the anchor continues the committed state
    assert conv[1] == [newer, x(0), x(1)]
    assert conv[2] == [x(0), x(1), x(2)]
    v = k + 1
    for j, p in enumerate(levels):
        lo = v + j * bl
        two_back = newer if p == 0 else x(p - 1)
        assert conv[lo] == [two_back, x(p), x(lo)], p
        assert conv[lo + 1] == [x(p), x(lo), x(lo + 1)], p
        assert conv[lo + 2] == [x(lo), x(lo + 1), x(lo + 2)], p
    off = len(lay.token_ids)
    y = lambda i: base + off + i
    assert conv[off] == [zero, zero, y(0)]  # cold start: zeros, not another request's state
    assert conv[off + 1] == [zero, y(0), y(1)]
    assert conv[off + 2] == [y(0), y(1), y(2)]  # its level-0 proposal continues token 1
    assert conv[off + 3] == [y(1), y(2), y(3)]
    # proposals are attended to but never written; verify slots are
    assert meta.write_index.tolist() == [0, 1, 2, 3, off, off + 1]


# ---- training layout -------------------------------------------------------------------------------


def block_starts(s_len: int, block_len: int, offset: int) -> list[int]:
    """Mask blocks start at positions offset, offset + B, ...; the positions before offset form a
    (shorter) first block."""
    first = offset % block_len
    return sorted({0} | set(range(first if first else block_len, s_len, block_len)))


@pytest.mark.parametrize("s_len,block_len,offset", [(1, 3, 0), (7, 3, 0), (9, 3, 0), (8, 4, 1), (10, 5, 3),
                                                     (6, 17, 0), (12, 4, 6)])
def test_training_layout_matches_inference_view(s_len, block_len, offset):
    tokens = list(range(100, 100 + s_len))
    lay = training_layout(tokens, block_len, MASK, offset)
    q = 2 * s_len
    assert lay.token_ids == tokens + [MASK] * s_len
    assert lay.positions == list(range(s_len)) * 2
    assert lay.logit_rows == list(range(q)) and lay.num_write == 0
    starts = block_starts(s_len, block_len, offset)
    block_of = {}
    for a, b in zip(starts, starts[1:] + [s_len], strict=True):
        for t in range(a, b):
            block_of[t] = a
    expect = torch.zeros(q, q, dtype=torch.bool)
    parents = []
    for i in range(q):
        if i < s_len:  # clean half: causal, blind to the masked copy
            expect[i, : i + 1] = True
            parents.append(i - 1)
        else:
            t = i - s_len
            s = block_of[t]
            expect[i, :s] = True  # clean tokens before the block's first position
            for u in range(s_len):
                if block_of[u] == s:
                    expect[i, s_len + u] = True  # its own block, both ways
            parents.append(s - 1 if t == s else i - 1)  # slot 0 continues clean token s - 1
    assert torch.equal(lay.mask, expect)
    assert lay.parent == parents


def test_training_block_sees_what_a_proposal_sees_at_inference():
    """A proposal at level p after anchor a (positions 0..a+p visible, block at a+p+1..) and the
    training block that starts at the same position see the same positions, sit at the same positions
    and continue the same branch token."""
    tokens = [50 + i for i in range(12)]
    k = 4
    for a in range(0, 4):
        for p in range(0, k + 1):
            inf = step_layout(tokens[: a + 1], tokens[a + 1 : a + 1 + k], 0, (p,), k + 1, MASK)
            v = a + 1 + k
            s = a + p + 1
            tr = training_layout(tokens, k + 1, MASK, offset=s)
            n = len(tokens)
            for slot in range(k + 1):
                pos = s + slot
                if pos >= n:
                    break
                inf_row = inf.mask[v + slot]
                seen_inf = {inf.positions[j] for j in range(v) if inf_row[j]}
                tr_row = tr.mask[n + pos]
                seen_tr = {tr.positions[j] for j in range(n) if tr_row[j]}
                assert seen_inf == seen_tr == set(range(s)), (a, p, slot)
                assert inf.positions[v + slot] == tr.positions[n + pos] == pos
                # the inputs there are identical, so the training target (tokens[pos]) is what the
                # proposal slot predicts at inference
                assert inf.token_ids[v + slot] == tr.token_ids[n + pos] == MASK
            # branch: inference slot 0's parent is verify slot a + p (token at position s - 1), training's
            # is clean token s - 1
            assert inf.parent[v] == a + p and inf.positions[a + p] == s - 1
            assert tr.parent[n + s] == s - 1


def test_attention_groups_keep_decode_rows_off_a_prefill_chunks_padding():
    """plan_groups: a step of decodes is one padded batch; a long prefill chunk among them is attended on its
    own, so 31 one-token queries are not padded to its 256 rows; every request is in exactly one group, in
    step order; a 2-request step of equal shapes never splits."""
    from workers.attention import plan_groups

    decode = [1] * 31
    assert plan_groups(decode, [320] * 31) == [list(range(31))]
    q_lens = decode[:10] + [256] + decode[10:]
    groups = plan_groups(q_lens, [320] * 10 + [256] + [320] * 21)
    assert [10] in groups and sorted(r for g in groups for r in g) == list(range(32))
    assert all(g == sorted(g) for g in groups)
    assert plan_groups([17, 17], [64, 64]) == [[0, 1]]
