"""Where a watch or a cache keeps its position across process restarts.

A checkpoint holds a revision (everything up to it is done) and, for a cache, the set of handler
calls made (`"handler:transaction_id"` keys: each handler fires once per transaction). The
protocol is two coroutines, so that a consumer can keep it wherever it keeps its own state;
`FileCheckpoint` keeps it in a file, `MemoryCheckpoint` in memory (tests, or a cache whose
handlers need only be exactly-once within one process).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
from collections.abc import Collection
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Protocol

from transaction_client.errors import ClientSetupError

try:  # a second process on the same checkpoint file is refused where flock exists
    import fcntl
except ImportError:  # pragma: no cover - Windows
    fcntl = None  # type: ignore[assignment]


@dataclass(frozen=True)
class Saved:
    """What a checkpoint holds: the revision everything up to which is done, and the keys of
    the handler calls made."""

    revision: int
    fired: frozenset[str] = field(default_factory=frozenset)


class Checkpoint(Protocol):
    """Keeps a consumer's position. `save` must be durable when it returns."""

    async def load(self) -> Saved | None:
        """What was saved, or None the first time."""
        ...

    async def save(self, revision: int, fired: Collection[str] = ()) -> None:
        """Everything up to `revision` is done, and the handler calls `fired` were made (on top
        of those saved before). Revisions saved only grow."""
        ...


class MemoryCheckpoint:
    """A checkpoint in memory: survives reconnects and resyncs, not the process."""

    def __init__(self) -> None:
        self.saved: Saved | None = None

    async def load(self) -> Saved | None:
        return self.saved

    async def save(self, revision: int, fired: Collection[str] = ()) -> None:
        before = self.saved.fired if self.saved else frozenset()
        self.saved = Saved(revision, before | frozenset(fired))


class FileCheckpoint:
    """A checkpoint in a file of JSON lines, appended to and fsynced by each save:
    `{"revision": R}` or `{"revision": R, "fired": [keys]}`. The last revision and every key
    count. When the file has grown to twice its last compacted size (and at least
    `compact_bytes`), it is rewritten as one line, atomically (a new file renamed over it). A line
    cut short by a crash is ignored. One process at a time: a second one gets ClientSetupError.

    A cache's handler keys make the file grow with the number of transactions its handlers
    fired for (some 60 bytes each); a consumer with millions of them may prefer a Checkpoint of
    its own in a database."""

    def __init__(self, path: str | os.PathLike[str], *, compact_bytes: int = 1 << 20) -> None:
        self.path = Path(path)
        self._compact_bytes = compact_bytes
        self._compacted_size = 0
        self._revision = 0
        self._fired: set[str] = set()
        self._file: IO[bytes] | None = None
        self._lock_file: IO[bytes] | None = None
        self._mutex = asyncio.Lock()

    async def load(self) -> Saved | None:
        async with self._mutex:
            return await asyncio.to_thread(self._load)

    async def save(self, revision: int, fired: Collection[str] = ()) -> None:
        async with self._mutex:
            await asyncio.to_thread(self._save, revision, list(fired))

    def close(self) -> None:
        """Release the file (and its lock)."""
        for handle in (self._file, self._lock_file):
            if handle is not None:
                handle.close()
        self._file = self._lock_file = None

    def _lock(self) -> None:
        if self._lock_file is not None:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._lock_file = open(self.path.with_name(self.path.name + ".lock"), "ab")  # noqa: SIM115
        if fcntl is not None:
            try:
                fcntl.flock(self._lock_file.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                self.close()
                raise ClientSetupError(
                    f"checkpoint {self.path} is in use by another process"
                ) from None

    def _load(self) -> Saved | None:
        self._lock()
        try:
            data = self.path.read_bytes()
        except FileNotFoundError:
            return None
        found, good = False, 0
        for line in data.splitlines(keepends=True):
            try:
                entry = json.loads(line)
            except ValueError:
                break  # cut short by a crash: what follows was never acknowledged
            if not line.endswith(b"\n"):
                break
            found, good = True, good + len(line)
            self._revision = max(self._revision, int(entry.get("revision", 0)))
            self._fired.update(entry.get("fired", ()))
        if good < len(data):
            with open(self.path, "r+b") as handle:
                handle.truncate(good)
        self._compacted_size = good
        return Saved(self._revision, frozenset(self._fired)) if found else None

    def _save(self, revision: int, fired: list[str]) -> None:
        self._lock()
        self._revision = max(self._revision, revision)
        self._fired.update(fired)
        entry: dict[str, object] = {"revision": self._revision}
        if fired:
            entry["fired"] = sorted(fired)
        if self._file is None:
            self._file = open(self.path, "ab")  # noqa: SIM115
        self._file.write(json.dumps(entry).encode() + b"\n")
        self._file.flush()
        os.fsync(self._file.fileno())
        size = self._file.tell()
        if size >= max(self._compact_bytes, 2 * self._compacted_size):
            self._compact()

    def _compact(self) -> None:
        whole = {"revision": self._revision, "fired": sorted(self._fired)}
        data = json.dumps(whole).encode() + b"\n"
        temporary = self.path.with_name(self.path.name + ".tmp")
        with open(temporary, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(temporary, self.path)
        with contextlib.suppress(OSError):  # the rename is durable once the folder is synced
            folder = os.open(self.path.parent, os.O_RDONLY)
            try:
                os.fsync(folder)
            finally:
                os.close(folder)
        if self._file is not None:
            self._file.close()
        self._file = open(self.path, "ab")  # noqa: SIM115
        self._compacted_size = len(data)
