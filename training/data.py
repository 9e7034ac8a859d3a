"""The corpus: the Python standard library's own .py files, split by file into train / held-out.

Files come from `sysconfig.get_paths()["stdlib"]`, site-packages excluded, the stdlib's test packages
included (they are ordinary Python and double the data). A file is held out when the first 8 bytes of
sha256(relative path) read as an integer are < 5% of 2**64, so the split depends only on the path.
"""

from __future__ import annotations

import hashlib
import sysconfig
from dataclasses import dataclass
from pathlib import Path

HELDOUT_FRACTION = 0.05
EXCLUDED_DIRS = {"site-packages", "dist-packages", "__pycache__"}


@dataclass
class Corpus:
    root: Path
    train: list[str]  # relative paths, sorted
    heldout: list[str]
    skipped: list[str]  # not valid UTF-8 (a few deliberately broken test files)


def stdlib_root() -> Path:
    return Path(sysconfig.get_paths()["stdlib"])


def is_heldout(rel: str, fraction: float = HELDOUT_FRACTION) -> bool:
    h = int.from_bytes(hashlib.sha256(rel.encode()).digest()[:8], "big")
    return h < fraction * 2**64


def read_text(path: Path) -> str | None:
    try:
        return path.read_bytes().decode("utf-8")
    except UnicodeDecodeError:
        return None


def find_corpus(root: Path | None = None, fraction: float = HELDOUT_FRACTION) -> Corpus:
    root = root or stdlib_root()
    train, heldout, skipped = [], [], []
    for path in sorted(root.rglob("*.py")):
        rel = path.relative_to(root).as_posix()
        if EXCLUDED_DIRS & set(path.relative_to(root).parts) or not path.is_file():
            continue
        if read_text(path) is None:
            skipped.append(rel)
        elif is_heldout(rel, fraction):
            heldout.append(rel)
        else:
            train.append(rel)
    return Corpus(root, train, heldout, skipped)


def write_lists(corpus: Corpus, run_dir: Path) -> None:
    """train_files.txt, heldout_files.txt, skipped_files.txt (one relative path a line) + the root."""
    (run_dir / "data_root.txt").write_text(str(corpus.root) + "\n")
    for name, files in (("train", corpus.train), ("heldout", corpus.heldout), ("skipped", corpus.skipped)):
        (run_dir / f"{name}_files.txt").write_text("".join(f + "\n" for f in files))


def read_lists(run_dir: Path) -> Corpus:
    def lines(name: str) -> list[str]:
        return (run_dir / f"{name}_files.txt").read_text().splitlines()

    return Corpus(Path((run_dir / "data_root.txt").read_text().strip()), lines("train"), lines("heldout"),
                  lines("skipped"))


def texts(corpus: Corpus, files: list[str]) -> list[str]:
    return [read_text(corpus.root / f) or "" for f in files]
