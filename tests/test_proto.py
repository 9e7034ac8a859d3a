"""The committed generated code is what `python -m proto.generate` makes from proto/tidal.proto."""

from pathlib import Path

import grpc_tools  # noqa: F401  (the test extra provides it)
import pytest

from proto.generate import ROOT, generate  # noqa: E402


@pytest.mark.parametrize("name", ["tidal_pb2.py", "tidal_pb2_grpc.py"])
def test_generated_code_is_up_to_date(tmp_path: Path, name: str):
    generate(tmp_path)
    fresh = (tmp_path / "proto" / name).read_bytes()
    committed = (ROOT / "proto" / name).read_bytes()
    assert fresh == committed, f"proto/{name} is stale: run `python -m proto.generate` and commit the result"


def test_generated_code_matches_the_proto():
    """Spot check that the committed module describes the .proto we read (the fields tests rely on)."""
    from proto import tidal_pb2 as pb

    assert pb.DESCRIPTOR.package == "tidal.v1"
    assert set(pb.DESCRIPTOR.services_by_name) == {"Generation", "Control"}
    fields = pb.AcceptStats.DESCRIPTOR.fields_by_name
    assert fields["batch_size"].number == 7 and fields["level"].number == 6
