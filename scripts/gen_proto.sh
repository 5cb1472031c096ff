#!/bin/sh
# Regenerates the committed gRPC code api/proto/textgen_pb2.py, textgen_pb2.pyi and
# textgen_pb2_grpc.py from api/proto/textgen.proto. Run from the repository root with the
# project's python (grpcio-tools installed): sh scripts/gen_proto.sh
# The -I mapping gives the file its import path, so the stub imports textgen.api.proto.textgen_pb2.
set -eu
PYTHON="${PYTHON:-python}"
out="$(mktemp -d)"
trap 'rm -rf "$out"' EXIT
"$PYTHON" -m grpc_tools.protoc -Itextgen/api/proto=api/proto --python_out="$out" --pyi_out="$out" \
    --grpc_python_out="$out" textgen/api/proto/textgen.proto
cp "$out"/textgen/api/proto/textgen_pb2.py "$out"/textgen/api/proto/textgen_pb2.pyi \
    "$out"/textgen/api/proto/textgen_pb2_grpc.py api/proto/
