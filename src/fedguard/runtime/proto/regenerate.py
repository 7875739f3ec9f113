"""Regenerate ``wire_pb2.py`` (with its type stub ``wire_pb2.pyi``) and ``wire_pb2_grpc.py`` from
``wire.proto``.

Run ``python src/fedguard/runtime/proto/regenerate.py`` after editing the .proto, with the
grpcio-tools version that matches the grpcio and protobuf ranges pinned in pyproject.toml.
"""

from __future__ import annotations

import sys
from pathlib import Path

from grpc_tools import protoc

HERE = Path(__file__).resolve().parent
SRC = HERE.parents[2]  # .../src, so the generated imports read ``fedguard.runtime.proto``


def main() -> int:
    proto = HERE / "wire.proto"
    # The include root is src/, so the generated modules import each other by package path.
    args = [
        "protoc",
        f"-I{SRC}",
        f"--python_out={SRC}",
        f"--pyi_out={SRC}",
        f"--grpc_python_out={SRC}",
        str(proto.relative_to(SRC)),
    ]
    return protoc.main(args)


if __name__ == "__main__":
    sys.exit(main())
