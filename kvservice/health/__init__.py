"""Generated code of the standard grpc.health.v1 API (see proto/kvservice/health)."""
