"""What the artifact store needs from the object storage under it: the `Backend` protocol
and the types every backend shares. The backends (local.py, s3.py, fsspec_backend.py)
build on this module and never on each other; backends.py picks one by URL.
"""
from __future__ import annotations

import hashlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

CHUNK = 8 << 20
Progress = Callable[[int], None]


class PreconditionFailed(Exception):
    """A conditional write lost: the object exists (or changed)."""


@dataclass(frozen=True)
class ObjectInfo:
    key: str
    size: int
    mtime: float  # seconds since the epoch


def no_progress(_: int) -> None:
    pass


def hash_file(path: Path, progress: Progress = no_progress) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(CHUNK):
            h.update(chunk)
            progress(len(chunk))
    return h.hexdigest()


class Backend(Protocol):
    """Object storage as the store, its claims and `gptoss artifacts gc` use it. Keys are
    `/`-separated paths under the store root."""

    url: str
    local_root: Path | None
    """The store's directory where it is one on this machine (file://), else None. Such a store
    is read in place, commits hard-link staging files into it, and claims are OS file locks."""

    # -- whole objects and byte ranges -----------------------------------
    def put_bytes(self, key: str, data: bytes, *, if_absent: bool = False) -> None:
        """Write a whole object; with `if_absent`, raise PreconditionFailed if it exists."""

    def get_bytes(self, key: str) -> bytes | None:
        """A whole object; None when absent."""

    def get_range(self, key: str, start: int, count: int) -> bytes:
        """`count` bytes from `start` (fewer at the object's end)."""

    def exists(self, key: str) -> bool: ...

    def list(self, prefix: str) -> Iterator[ObjectInfo]:
        """Every object under `prefix`, recursively."""

    def delete(self, keys: list[str]) -> None:
        """Remove these objects; absent ones are no error."""

    # -- files -------------------------------------------------------------
    def upload_file(self, src: Path, key: str, progress: Progress = no_progress) -> str:
        """Store a local file as `key`; returns the sha256 of what was stored."""

    def download_file(self, key: str, dest: Path, size: int, progress: Progress = no_progress) -> str:
        """Write object `key` (of `size` bytes) to `dest`; returns the sha256 of what was written."""

    def recorded_sha256(self, key: str, size: int) -> str | None:
        """The sha256 recorded with an uploaded object of this size, so a commit retry can keep
        it; None where absent, of another size, or where this backend records none."""

    # -- claims ------------------------------------------------------------
    def get_with_etag(self, key: str) -> tuple[bytes, str | None] | None:
        """A whole object and its etag (None on a backend without etags); None when absent."""

    def replace(self, key: str, data: bytes, *, if_match: str | None) -> str | None:
        """Overwrite `key`. Given an etag from get_with_etag, only while the object still has it
        (else PreconditionFailed), so that one of several writers wins; with None, unconditionally.
        Returns the new etag (None on a backend without etags)."""

    # -- housekeeping --------------------------------------------------------
    def multipart_uploads(self, prefix: str = "") -> Iterator[tuple[str, str, float]]:
        """Unfinished multipart uploads under `prefix`: (key, upload id, initiated at)."""

    def abort_upload(self, key: str, upload_id: str) -> None: ...


class WithoutEtags:
    """The claim and housekeeping members of `Backend` for a backend that has no etags,
    records no checksums and makes no multipart uploads (a killed upload there leaves an
    ordinary object, removed with its incomplete version)."""

    def recorded_sha256(self, key: str, size: int) -> None:
        return None

    def get_with_etag(self, key: str) -> tuple[bytes, None] | None:
        data = self.get_bytes(key)
        return None if data is None else (data, None)

    def replace(self, key: str, data: bytes, *, if_match: str | None) -> None:
        if if_match is not None:
            raise ValueError(f"{self.url} has no etags to match ({key})")
        self.put_bytes(key, data)

    def multipart_uploads(self, prefix: str = "") -> Iterator[tuple[str, str, float]]:
        return iter(())

    def abort_upload(self, key: str, upload_id: str) -> None:
        raise LookupError(f"{self.url} has no multipart uploads (asked to abort {upload_id} of {key})")
