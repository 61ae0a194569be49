#!/usr/bin/env bash
# Regenerate the gRPC Python modules of edge-runtime serve from
# edge_runtime/serve/proto/grpc_predict_v2.proto (the Open Inference Protocol v2).
# Needs grpcio-tools (the dev extra). The generated modules are committed, so a device
# never needs protoc; tests/edge_runtime/serve/test_grpc_stubs.py checks they are current.
# The generated code checks at import that grpcio and protobuf are at least the versions
# that generated it: the serve extra in pyproject.toml pins those minimums, so raise them
# there when regenerating with a newer grpcio-tools.
# Usage: scripts/gen_grpc.sh [OUTPUT_ROOT]   (default: the repository; the test passes a tmp dir)
set -euo pipefail
REPO="$(cd "$(dirname "$0")/.." && pwd)"
PYTHON="${PYTHON:-$REPO/.venv/bin/python}"
[ -x "$PYTHON" ] || PYTHON=python3
OUT="${1:-$REPO}"
cd "$REPO"
# -I. keeps the package path in the proto's name, so the generated *_pb2_grpc.py imports
# `from edge_runtime.serve.proto import grpc_predict_v2_pb2` (a plain `import x_pb2`
# would fail inside the package).
"$PYTHON" -m grpc_tools.protoc -I. --python_out="$OUT" --grpc_python_out="$OUT" \
  edge_runtime/serve/proto/grpc_predict_v2.proto
# The protocol's message names (inference.ModelInferRequest, ...) are also those of every
# client library's copy (tritonclient, kserve): in protobuf's default pool two files that
# define them cannot both load in one process. Ours goes into a pool of its own, so the
# server runs beside those clients (tests, benchmarks, an application embedding both).
"$PYTHON" - "$OUT/edge_runtime/serve/proto/grpc_predict_v2_pb2.py" <<'PY'
import sys
from pathlib import Path

path = Path(sys.argv[1])
text = path.read_text()
default = "_descriptor_pool.Default().AddSerializedFile("
if text.count(default) != 1:
    sys.exit(f"{path}: expected one {default!r}; protoc's output changed, update gen_grpc.sh")
path.write_text(text.replace(default, "_descriptor_pool.DescriptorPool().AddSerializedFile("))
PY
