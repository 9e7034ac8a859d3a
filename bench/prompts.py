"""Benchmark prompts of real Python code, cut to a context length and ended mid-line.

- "stdlib": the trainer's held-out standard-library files (training/data.py): unseen files, seen style.
- "outside": files of packages outside the standard library that every Tidal install has (pydantic,
  PyYAML, prometheus_client, OpenTelemetry, protobuf, gRPC): code the shipped model never trained on.
Files are taken in sorted path order, so a source gives the same prompts on every machine with the same
package versions.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

from training.data import find_corpus, read_text, texts

OUTSIDE_PACKAGES = ("pydantic", "yaml", "prometheus_client", "opentelemetry", "google.protobuf", "grpc")
SOURCES = ("stdlib", "outside")


def outside_files() -> list[Path]:
    files = []
    for name in OUTSIDE_PACKAGES:
        spec = importlib.util.find_spec(name)
        for root in (spec.submodule_search_locations or []) if spec else []:
            files += sorted(p for p in Path(root).rglob("*.py") if "__pycache__" not in p.parts)
    return files


def source_texts(source: str):
    if source == "stdlib":
        corpus = find_corpus()
        yield from texts(corpus, corpus.heldout)
    elif source == "outside":
        for path in outside_files():
            yield read_text(path) or ""
    else:
        raise ValueError(f"unknown prompt source {source!r}; choose from {', '.join(SOURCES)}")


def code_prompts(tokenizer, n: int, context: int, source: str = "stdlib") -> list[list[int]]:
    """n prompts of at most `context` tokens from files at least `context + 32` tokens long."""
    out = []
    for text in source_texts(source):
        ids = tokenizer.encode(text).ids
        if len(ids) < context + 32:
            continue
        cut = ids[:context]
        while cut and "\n" in tokenizer.decode(cut[-1:]):  # end mid-line: the tokenizer splits code there
            cut = cut[:-1]
        out.append(cut)
        if len(out) == n:
            break
    return out
