"""Server reflection that serves the proto's comments.

The descriptors compiled into *_pb2.py carry no comments, so stock reflection gives grpcurl
`describe` bare field lists. `make proto` also writes a descriptor set with source info; this
servicer answers with those richer file descriptors where it has them. It is registered under both
reflection service names: `v1alpha` (grpcurl up to 1.8) and `v1` (newer clients); the two are the
same on the wire.
"""

from __future__ import annotations

from collections.abc import AsyncIterable, AsyncIterator
from importlib import resources
from typing import Any, cast

import grpc
from google.protobuf import descriptor_pb2
from grpc_reflection.v1alpha import reflection
from grpc_reflection.v1alpha import reflection_pb2 as rpb

V1_SERVICE_NAME = "grpc.reflection.v1.ServerReflection"


def _documented_files() -> dict[str, bytes]:
    data = (resources.files("transactions") / "descriptor_set.binpb").read_bytes()
    files = descriptor_pb2.FileDescriptorSet.FromString(data).file
    return {f.name: f.SerializeToString() for f in files}


class DocumentedReflectionServicer(reflection.aio.ReflectionServicer):
    def __init__(self, service_names: list[str]) -> None:
        super().__init__(service_names)
        self._documented = _documented_files()

    # types-grpcio-reflection declares the base method a coroutine returning an iterable; it is an
    # async generator, as this one.
    async def ServerReflectionInfo(  # type: ignore[override]
        self, request_iterator: AsyncIterable[rpb.ServerReflectionRequest], context: object
    ) -> AsyncIterator[rpb.ServerReflectionResponse]:
        responses = cast(
            "AsyncIterator[rpb.ServerReflectionResponse]",
            super().ServerReflectionInfo(request_iterator, context),
        )
        async for response in responses:
            if response.HasField("file_descriptor_response"):
                protos = response.file_descriptor_response.file_descriptor_proto
                for i, serialized in enumerate(protos):
                    name = descriptor_pb2.FileDescriptorProto.FromString(serialized).name
                    if name in self._documented:
                        protos[i] = self._documented[name]
            yield response


def reflection_handlers(
    service_names: list[str],
) -> dict[str, dict[str, grpc.RpcMethodHandler[Any, Any]]]:
    """The reflection service's handlers, under both names, by service name (served through
    `api/gateway.py`)."""
    names = [*service_names, reflection.SERVICE_NAME, V1_SERVICE_NAME]
    servicer = DocumentedReflectionServicer(names)
    handler = grpc.stream_stream_rpc_method_handler(
        servicer.ServerReflectionInfo,
        request_deserializer=rpb.ServerReflectionRequest.FromString,
        response_serializer=rpb.ServerReflectionResponse.SerializeToString,
    )
    return {
        service: {"ServerReflectionInfo": handler}
        for service in (reflection.SERVICE_NAME, V1_SERVICE_NAME)
    }
