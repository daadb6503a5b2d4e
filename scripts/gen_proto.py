"""Generate the Python stubs in generated/ from proto/ with grpcio-tools.

Run through `make proto`. The tests call `generate()` into a temporary folder and compare the result
with the committed files, so stale stubs fail the build.
"""

from __future__ import annotations

import sys
from pathlib import Path

import grpc_tools
from grpc_tools import protoc

ROOT = Path(__file__).resolve().parent.parent
PROTO_DIR = ROOT / "proto"
DEFAULT_OUT = ROOT / "generated"
# A FileDescriptorSet with comments (source info), served by reflection so `grpcurl describe` shows
# the proto's documentation; the descriptors compiled into *_pb2.py carry no comments.
DESCRIPTOR_SET = Path("transactions") / "descriptor_set.binpb"


def proto_files() -> list[Path]:
    return sorted(PROTO_DIR.rglob("*.proto"))


def generate(out_dir: Path) -> list[Path]:
    """Write *_pb2.py, *_pb2.pyi and *_pb2_grpc.py for every proto file; return what was written."""
    (out_dir / DESCRIPTOR_SET).parent.mkdir(parents=True, exist_ok=True)
    well_known = Path(grpc_tools.__file__).parent / "_proto"
    files = [str(p.relative_to(PROTO_DIR)) for p in proto_files()]
    args = [
        "grpc_tools.protoc",
        f"-I{PROTO_DIR}",
        f"-I{well_known}",
        f"--python_out={out_dir}",
        f"--pyi_out={out_dir}",
        f"--grpc_python_out={out_dir}",
        "--include_source_info",
        "--include_imports",
        f"--descriptor_set_out={out_dir / DESCRIPTOR_SET}",
        *files,
    ]
    if protoc.main(args) != 0:
        raise SystemExit("protoc failed")
    written = [out_dir / DESCRIPTOR_SET]
    for rel in files:
        package_dir = out_dir / Path(rel).parent
        # Make every level below out_dir a regular package so setuptools finds it.
        level = package_dir
        while level != out_dir:
            (level / "__init__.py").touch()
            level = level.parent
        stem = Path(rel).stem
        written += [package_dir / f"{stem}_pb2{ext}" for ext in (".py", ".pyi")]
        written.append(package_dir / f"{stem}_pb2_grpc.py")
    return written


if __name__ == "__main__":
    out = Path(sys.argv[1]) if len(sys.argv) > 1 else DEFAULT_OUT
    for path in generate(out):
        print(path.relative_to(out.parent) if path.is_relative_to(out.parent) else path)
