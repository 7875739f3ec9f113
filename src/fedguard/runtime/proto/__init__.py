"""Generated protobuf modules of the deployment wire (see wire.proto and regenerate.py)."""
