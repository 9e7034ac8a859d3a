"""Regenerate proto/tidal_pb2.py and proto/tidal_pb2_grpc.py from proto/tidal.proto.

    python -m proto.generate [--out DIR]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def generate(out_dir: Path) -> None:
    from grpc_tools import protoc

    args = ["grpc_tools.protoc", f"-I{ROOT}", f"--python_out={out_dir}", f"--grpc_python_out={out_dir}",
            str(ROOT / "proto" / "tidal.proto")]
    if protoc.main(args) != 0:
        sys.exit("protoc failed")


if __name__ == "__main__":
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=str(ROOT))
    generate(Path(ap.parse_args().out))
