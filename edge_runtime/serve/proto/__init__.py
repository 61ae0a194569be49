"""The Open Inference Protocol v2's gRPC service: the .proto and the modules generated from
it by scripts/gen_grpc.sh (committed, so a device needs no protoc)."""
