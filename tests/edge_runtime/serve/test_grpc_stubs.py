"""The committed gRPC modules are what scripts/gen_grpc.sh makes from the .proto, and they
speak tritonclient's wire format."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[3]
PROTO_DIR = REPO / "edge_runtime" / "serve" / "proto"
GENERATED = ["grpc_predict_v2_pb2.py", "grpc_predict_v2_pb2_grpc.py"]


def test_regenerating_gives_the_committed_modules(tmp_path):
    pytest.importorskip("grpc_tools", reason="grpcio-tools (the dev extra) generates the stubs")
    environment = {**os.environ, "PYTHON": sys.executable}

    subprocess.run(
        ["bash", str(REPO / "scripts" / "gen_grpc.sh"), str(tmp_path)],
        check=True,
        env=environment,
        capture_output=True,
    )

    for name in GENERATED:
        fresh = (tmp_path / "edge_runtime" / "serve" / "proto" / name).read_text()
        assert fresh == (PROTO_DIR / name).read_text(), (
            f"{name} is stale: run scripts/gen_grpc.sh and commit the result"
        )


def test_messages_match_tritonclients_field_for_field():
    """Same names and numbers as tritonclient's own copy of the service, for every message
    and call we declare: the wire format is the protocol's, not ours."""
    triton = pytest.importorskip("tritonclient.grpc.service_pb2")
    from edge_runtime.serve.proto import grpc_predict_v2_pb2 as ours

    ours_file, theirs_file = ours.DESCRIPTOR, triton.DESCRIPTOR

    def fields(message) -> dict:
        shape = {f.name: (f.number, f.type, f.is_repeated) for f in message.fields}
        for nested in message.nested_types:
            shape[nested.name] = fields(nested)
        return shape

    assert ours_file.package == theirs_file.package == "inference"
    for name, message in ours_file.message_types_by_name.items():
        assert fields(message) == fields(theirs_file.message_types_by_name[name]), name
    service = ours_file.services_by_name["GRPCInferenceService"]
    theirs = theirs_file.services_by_name["GRPCInferenceService"]
    for method in service.methods:
        counterpart = theirs.methods_by_name[method.name]
        assert method.input_type.full_name == counterpart.input_type.full_name
        assert method.output_type.full_name == counterpart.output_type.full_name
    assert {m.name for m in service.methods} == {
        "ServerLive",
        "ServerReady",
        "ModelReady",
        "ServerMetadata",
        "ModelMetadata",
        "ModelInfer",
    }
