"""Generate the Python code for `proto/mlchat/v1/*.proto` into `mlchat/v1/` (run `make proto`).

The generated modules are committed; `tests/unit/test_protoc.py` fails when they are not current.
"""

from __future__ import annotations

import shutil
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PROTO_DIR = ROOT / "proto"
PROTO_FILES = sorted((PROTO_DIR / "mlchat" / "v1").glob("*.proto"))


def generate(out_dir: Path) -> None:
    """Write the *_pb2.py, *_pb2_grpc.py and .pyi stubs for every proto file under `out_dir`."""
    from grpc_tools import protoc  # a dev dependency: only needed to regenerate

    bin_dir = Path(sys.executable).parent
    args = [
        "grpc_tools.protoc",
        f"--proto_path={PROTO_DIR}",
        f"--plugin=protoc-gen-mypy={shutil.which('protoc-gen-mypy', path=str(bin_dir))}",
        f"--plugin=protoc-gen-mypy_grpc={shutil.which('protoc-gen-mypy_grpc', path=str(bin_dir))}",
        f"--python_out={out_dir}",
        f"--grpc_python_out={out_dir}",
        f"--mypy_out={out_dir}",
        f"--mypy_grpc_out={out_dir}",
        *[str(p.relative_to(PROTO_DIR)) for p in PROTO_FILES],
    ]
    if protoc.main(args) != 0:
        raise RuntimeError(f"protoc failed: {' '.join(args)}")


if __name__ == "__main__":
    generate(ROOT)
    print(f"generated {len(PROTO_FILES)} proto files into {ROOT / 'mlchat' / 'v1'}")
