"""Generated gRPC stubs for pictor.v1 (make proto). Do not edit."""
