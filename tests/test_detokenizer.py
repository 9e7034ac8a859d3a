"""The ingress's incremental detokenizer against the tokenizer's own full decode (tokenizers, not ours)."""

from __future__ import annotations

import random
from pathlib import Path

from hypothesis import given, settings
from hypothesis import strategies as st

from router.ingress import Detokenizer
from workers.loader import load_tokenizer

MODELS = Path(__file__).resolve().parents[1] / "models"
CODE_TOKENIZER = load_tokenizer(MODELS / "zaya-code-tiny")  # BPE over bytes: multi-byte characters split
BYTE_TOKENIZER = load_tokenizer(MODELS / "zaya-tiny-random")  # one token per byte


def streamed(tokenizer, ids: list[int], chunks: list[int]) -> str:
    """Feed ids in chunks of the given sizes (the last chunk final), as the ingress does per message."""
    text, pos, out = Detokenizer(tokenizer), 0, []
    for size in chunks:
        part = ids[pos : pos + size]
        pos += len(part)
        out.append(text.add(part, final=pos >= len(ids)))
        if pos >= len(ids):
            break
    return "".join(out)


def test_a_long_output_with_multibyte_characters_equals_the_full_decode():
    text = "def héllo():\n    return '日本語 ü ß — 🐍'  # ✓\n" * 200
    rng = random.Random(0)
    for tokenizer in (CODE_TOKENIZER, BYTE_TOKENIZER):
        ids = tokenizer.encode(text).ids
        assert len(ids) > 3000
        chunks = [rng.randint(1, 7) for _ in range(len(ids))]
        assert streamed(tokenizer, ids, chunks) == tokenizer.decode(ids)


@settings(max_examples=200, deadline=None)
@given(ids=st.lists(st.integers(0, 259), min_size=1, max_size=60), sizes=st.lists(st.integers(1, 5), min_size=60))
def test_any_byte_sequence_in_any_chunking_equals_the_full_decode(ids, sizes):
    """Arbitrary bytes (invalid UTF-8 included) and special tokens: what a stream shows in total equals
    decoding every id at once, and nothing after an incomplete sequence is lost at the end."""
    assert streamed(BYTE_TOKENIZER, ids, sizes) == BYTE_TOKENIZER.decode(ids)
