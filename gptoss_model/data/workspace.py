"""Where the pretraining build keeps its parts and writes its shards.

The build talks to a `Workspace`: a few object-store-shaped calls (whole small objects,
files handed over once written, byte ranges read back). `LocalDir` serves them from a
directory, for the one-machine build; the preprocess task supplies one over the artifact
store, so that Dask workers on many machines read and write the same parts and shards.
A file is written under a local scratch name first and handed over complete, so a
reader never sees half of one, whichever workspace holds it.
"""
from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from pathlib import Path
from typing import ContextManager, Protocol

READ_BLOCK = 16 << 20


class Workspace(Protocol):
    def get_bytes(self, rel: str) -> bytes | None:
        """A whole (small) object; None when absent."""

    def put_bytes(self, rel: str, data: bytes) -> None:
        """Write a whole object atomically."""

    def put_file(self, local: Path, rel: str) -> str | None:
        """Hand over a finished local file (from `scratch()`) as `rel`; `local` is gone afterwards.

        Returns its sha256 where handing over reads the bytes anyway (an upload), else None."""

    def read_range(self, rel: str, start: int, count: int) -> Iterator[bytes]:
        """`count` bytes of `rel` from `start`, in blocks."""

    def scratch(self) -> ContextManager[Path]:
        """A local directory for files being written before `put_file`."""

    def where(self, rel: str) -> str:
        """The location of `rel`, for messages."""


class LocalDir:
    """A workspace in a local (or shared, mounted) directory: handing over is a rename."""

    def __init__(self, root: str | os.PathLike):
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)

    def __repr__(self) -> str:
        return f"LocalDir({str(self.root)!r})"

    def where(self, rel: str) -> str:
        return str(self.root / rel)

    def get_bytes(self, rel: str) -> bytes | None:
        try:
            return (self.root / rel).read_bytes()
        except FileNotFoundError:
            return None

    def put_bytes(self, rel: str, data: bytes) -> None:
        tmp = self.root / f"{rel}.tmp"
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, self.root / rel)

    def put_file(self, local: Path, rel: str) -> None:
        os.replace(local, self.root / rel)  # a rename reads nothing: no digest

    def read_range(self, rel: str, start: int, count: int) -> Iterator[bytes]:
        with open(self.root / rel, "rb") as f:
            f.seek(start)
            while count > 0:
                block = f.read(min(count, READ_BLOCK))
                if not block:
                    raise EOFError(f"{self.where(rel)}: truncated (wanted {count} more bytes)")
                count -= len(block)
                yield block

    def scratch(self) -> ContextManager[Path]:
        # Same directory: put_file is then a rename, never a copy.
        return contextlib.nullcontext(self.root)


def as_workspace(place: Workspace | str | os.PathLike) -> Workspace:
    return LocalDir(place) if isinstance(place, (str, os.PathLike)) else place


__all__ = ["Workspace", "LocalDir", "as_workspace"]
