"""Generated gRPC/protobuf stubs for proto/geomesh/v1 (see scripts/gen_proto.py)."""
