"""The incremental detokenizer against the tokenizer's own full decode (tokenizers, not ours), and stop
strings against decoding every prefix of the output."""

from __future__ import annotations

import random
from pathlib import Path

from conftest import stop_by_prefixes
from hypothesis import given, settings
from hypothesis import strategies as st

from workers.detokenizer import Detokenizer
from workers.loader import load_tokenizer

MODELS = Path(__file__).resolve().parents[1] / "models"
CODE_TOKENIZER = load_tokenizer(MODELS / "zaya-code-tiny")  # BPE over bytes: multi-byte characters split
BYTE_TOKENIZER = load_tokenizer(MODELS / "zaya-tiny-random")  # one token per byte


def streamed(tokenizer, ids: list[int], chunks: list[int], stop: tuple[str, ...] = (),
             shown: list[str] | None = None) -> str:
    """Feed ids in chunks of the given sizes (the last chunk final), as the ingress does per message;
    `shown` receives what the stream has shown after each message."""
    text, pos, out = Detokenizer(tokenizer, stop), 0, []
    for size in chunks:
        part = ids[pos : pos + size]
        pos += len(part)
        out.append(text.add(part, final=pos >= len(ids)))
        if shown is not None:
            shown.append("".join(out))
        if pos >= len(ids):
            break
    return "".join(out)


def tokens_until_stop(tokenizer, ids: list[int], stop: tuple[str, ...]) -> int:
    watcher = Detokenizer(tokenizer, stop)
    for n, t in enumerate(ids, 1):
        if watcher.feed(t):
            return n
    return len(ids)


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


CODE = "def add(a, b):\n    return a + b\n\n\nclass Point:\n    x: int = 0  # 日本 ü\n\n\ndef main():\n"


def test_stop_strings_across_token_boundaries_end_the_text_where_decoding_every_prefix_does():
    ids = CODE_TOKENIZER.encode(CODE).ids
    pieces = [CODE_TOKENIZER.decode([t]) for t in ids]
    assert any(len(p) > 1 for p in pieces)  # multi-character tokens: some stops begin inside one
    stops = [("\n\n\n",), ("turn a",), ("Point:\n   ",), ("日",), ("本 ü",), ("b)", ":\n"), ("x: int", "(a,"),
             ("never there",)]
    for stop in stops:
        want_text, want_tokens = stop_by_prefixes(CODE_TOKENIZER, ids, stop)
        assert tokens_until_stop(CODE_TOKENIZER, ids, stop) == want_tokens, stop
        for chunks in ([1] * len(ids), [3] * len(ids), [len(ids)]):
            shown: list[str] = []
            kept = ids[:want_tokens]  # the engine sends no token after the one that completes the stop
            assert streamed(CODE_TOKENIZER, kept, chunks, stop, shown) == want_text, (stop, chunks)
            for seen in shown:  # a stream never shows what the stop string takes back
                assert want_text.startswith(seen), (stop, seen)
    assert stop_by_prefixes(CODE_TOKENIZER, ids, ("turn a",))[0] == "def add(a, b):\n    re"


def test_a_partial_match_is_held_back_and_released_when_it_is_not_a_stop():
    ids = CODE_TOKENIZER.encode(CODE).ids
    n = len(ids) // 2
    shown = CODE_TOKENIZER.decode(ids[:n])
    tail = shown[-3:]  # the stop begins with the text's last three characters but never completes
    text = Detokenizer(CODE_TOKENIZER, (tail + "\x00never",))
    assert text.add(ids[:n]) == shown[:-3]  # the tail may still become the stop
    assert text.add(ids[n:], final=True) == CODE_TOKENIZER.decode(ids)[len(shown) - 3:]
    assert text.stopped is None


@settings(max_examples=200, deadline=None)
@given(ids=st.lists(st.integers(0, 259), min_size=1, max_size=60), sizes=st.lists(st.integers(1, 5), min_size=60),
       stop=st.lists(st.text("ab\n\u00e9", min_size=1, max_size=3), min_size=1, max_size=4))
def test_stop_strings_in_any_bytes_and_chunking_match_decoding_every_prefix(ids, sizes, stop):
    stop = tuple(stop)
    want_text, want_tokens = stop_by_prefixes(BYTE_TOKENIZER, ids, stop)
    assert tokens_until_stop(BYTE_TOKENIZER, ids, stop) == want_tokens
    shown: list[str] = []
    assert streamed(BYTE_TOKENIZER, ids[:want_tokens], sizes, stop, shown) == want_text
    assert all(want_text.startswith(seen) for seen in shown)
