"""The protoc plugin that `buf generate` (buf.gen.yaml) runs to make the Python code of proto/.

`make proto` runs `buf generate`: buf parses proto/ and hands this script the descriptors (with
their comments) on stdin, as protoc hands any plugin a CodeGeneratorRequest. The script runs
grpcio-tools' protoc on those descriptors with mypy-protobuf's two plugins and answers with:

- `transactions/v1/transactions_pb2.py` and `transactions_pb2_grpc.py`: messages and service
  stubs (grpcio-tools, the same version as the server's grpcio);
- `.pyi` files for both (mypy-protobuf): typed messages, and typed stubs for `grpc` and
  `grpc.aio` channels, with the proto's comments as docstrings;
- `__init__.py` at every level and `py.typed`.

(`make proto` then has `buf build` write `transactions/descriptor_set.binpb`, every descriptor
with its comments, which the server's reflection serves so that `grpcurl describe` shows the
documentation; a plugin can only answer with text files.)

Everything lands in `client/src/`, inside the client distribution, which ships the `transactions`
package; the server depends on the client distribution and uses the same files. The tests run
`buf generate` into a temporary folder and compare the result with the committed files.
"""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path

from google.protobuf import descriptor_pb2
from google.protobuf.compiler import plugin_pb2
from grpc_tools import protoc


def _plugin(name: str) -> str:
    """A plugin executable installed beside this interpreter (mypy-protobuf's, in .venv/bin)."""
    path = Path(sys.executable).parent / name
    if not path.exists():
        raise SystemExit(f"{path} is missing: install the dev dependencies (make proto does)")
    return f"--plugin={name}={path}"


def generate(request: plugin_pb2.CodeGeneratorRequest) -> plugin_pb2.CodeGeneratorResponse:
    response = plugin_pb2.CodeGeneratorResponse(
        supported_features=plugin_pb2.CodeGeneratorResponse.FEATURE_PROTO3_OPTIONAL
    )
    descriptors = descriptor_pb2.FileDescriptorSet(file=request.proto_file)
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "out"
        out.mkdir()
        descriptor_set = Path(tmp) / "in.binpb"
        descriptor_set.write_bytes(descriptors.SerializeToString(deterministic=True))
        args = [
            "grpc_tools.protoc",
            f"--descriptor_set_in={descriptor_set}",
            _plugin("protoc-gen-mypy"),
            _plugin("protoc-gen-mypy_grpc"),
            f"--python_out={out}",
            f"--grpc_python_out={out}",
            f"--mypy_out=quiet:{out}",
            f"--mypy_grpc_out=quiet:{out}",
            *request.file_to_generate,
        ]
        if protoc.main(args) != 0:
            response.error = "grpc_tools.protoc failed (see above)"
            return response
        files = {
            p.relative_to(out).as_posix(): p.read_bytes() for p in out.rglob("*") if p.is_file()
        }
    # Every folder below the output a regular package, so that setuptools and mypy find it.
    for name in list(files):
        parent = Path(name).parent
        while parent != Path("."):
            files.setdefault((parent / "__init__.py").as_posix(), b"")
            parent = parent.parent
    for package in {Path(name).parts[0] for name in request.file_to_generate}:
        files[f"{package}/py.typed"] = b""
    for name in sorted(files):
        response.file.add(name=name, content=files[name].decode())
    return response


def main() -> None:
    request = plugin_pb2.CodeGeneratorRequest.FromString(sys.stdin.buffer.read())
    sys.stdout.buffer.write(generate(request).SerializeToString())


if __name__ == "__main__":
    main()
