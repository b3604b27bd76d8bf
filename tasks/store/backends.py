"""Object-storage backends behind the artifact store.

Three: a local directory (`file://`, the embedded default), S3 and any
S3-compatible endpoint (`s3://`, in s3.py), and any other fsspec URL (best
effort: no atomic create, so concurrent writers are only protected by claims).
"""
from __future__ import annotations

import hashlib
import os
import tempfile
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlparse

CHUNK = 8 << 20
Progress = Callable[[int], None]


class PreconditionFailed(Exception):
    """A conditional write lost: the object exists (or changed)."""


@dataclass(frozen=True)
class ObjectInfo:
    key: str
    size: int
    mtime: float  # seconds since the epoch


def _noop(_: int) -> None:
    pass


def hash_file(path: Path, progress: Progress = _noop) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(CHUNK):
            h.update(chunk)
            progress(len(chunk))
    return h.hexdigest()


class LocalBackend:
    """A directory on a local (or mounted) filesystem."""

    def __init__(self, root: str | Path):
        self.root = Path(root).expanduser().resolve()
        self.url = self.root.as_uri()

    def path(self, key: str) -> Path:
        return self.root / key

    def put_bytes(self, key: str, data: bytes, *, if_absent: bool = False) -> None:
        dest = self.path(key)
        dest.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=dest.parent, prefix=f".{dest.name}.", suffix=".tmp")
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
            if if_absent:
                # link() fails if the target exists: an atomic create-if-absent.
                try:
                    os.link(tmp, dest)
                except FileExistsError:
                    raise PreconditionFailed(key) from None
            else:
                os.replace(tmp, dest)
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)

    def get_bytes(self, key: str) -> bytes | None:
        try:
            return self.path(key).read_bytes()
        except (FileNotFoundError, NotADirectoryError):
            return None

    def get_range(self, key: str, start: int, count: int) -> bytes:
        with open(self.path(key), "rb") as f:
            f.seek(start)
            return f.read(count)

    def exists(self, key: str) -> bool:
        return self.path(key).is_file()

    def list(self, prefix: str) -> Iterator[ObjectInfo]:
        base = self.path(prefix)
        if not base.is_dir():
            return
        for dirpath, _, files in os.walk(base):
            for fn in files:
                p = Path(dirpath) / fn
                try:
                    st = p.stat()
                except FileNotFoundError:
                    continue
                yield ObjectInfo(p.relative_to(self.root).as_posix(), st.st_size, st.st_mtime)

    def delete(self, keys: list[str]) -> None:
        for key in keys:
            p = self.path(key)
            p.unlink(missing_ok=True)
            # Drop directories left empty, up to the store root.
            parent = p.parent
            while parent != self.root and parent.is_dir():
                try:
                    parent.rmdir()
                except OSError:
                    break
                parent = parent.parent

    def upload_file(self, src: Path, key: str, progress: Progress = _noop) -> str:
        # A staging file nobody else links to is hard-linked into the store, not copied:
        # a 42 GB checkpoint is not written twice (nor held twice on disk). A file with other
        # links (a kept download work copy) is copied, so editing it can never change a
        # committed artifact. Either way every byte is hashed for the manifest.
        dest = self.path(key)
        if os.stat(src).st_nlink == 1 and _link_into_place(Path(src), dest):
            return hash_file(dest, progress)
        return copy_hashing(src, dest, progress)

    def download_file(self, key: str, dest: Path, size: int, progress: Progress = _noop) -> str:
        return copy_hashing(self.path(key), dest, progress)


def _link_into_place(src: Path, dest: Path) -> bool:
    """Hard-link src to dest (replacing it) through a temp name; False where links do not work."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = dest.with_name(f".{dest.name}.{uuid.uuid4().hex}.tmp")
    try:
        os.link(src, tmp)
    except OSError:  # another filesystem (EXDEV), or one without hard links
        return False
    try:
        os.replace(tmp, dest)
    finally:
        tmp.unlink(missing_ok=True)
    return True


def copy_hashing(src: Path, dest: Path, progress: Progress = _noop) -> str:
    """Copy through a temp file renamed into place, hashing on the way."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = dest.with_name(f".{dest.name}.{uuid.uuid4().hex}.tmp")
    h = hashlib.sha256()
    try:
        with open(src, "rb") as fin, open(tmp, "wb") as fout:
            while chunk := fin.read(CHUNK):
                h.update(chunk)
                fout.write(chunk)
                progress(len(chunk))
        os.replace(tmp, dest)
    finally:
        tmp.unlink(missing_ok=True)
    return h.hexdigest()


class FsspecBackend:
    """Any other fsspec filesystem. No atomic create: claims guard commits."""

    def __init__(self, url: str, storage_options: dict | None = None):
        import fsspec

        self.fs, root = fsspec.core.url_to_fs(url, **(storage_options or {}))
        self.root = root.rstrip("/")
        self.url = url.rstrip("/")

    def _k(self, key: str) -> str:
        return f"{self.root}/{key}"

    def put_bytes(self, key: str, data: bytes, *, if_absent: bool = False) -> None:
        if if_absent and self.fs.exists(self._k(key)):
            raise PreconditionFailed(key)
        self.fs.pipe_file(self._k(key), data)

    def get_bytes(self, key: str) -> bytes | None:
        try:
            return self.fs.cat_file(self._k(key))
        except FileNotFoundError:
            return None

    def get_range(self, key: str, start: int, count: int) -> bytes:
        return self.fs.cat_file(self._k(key), start=start, end=start + count)

    def exists(self, key: str) -> bool:
        return self.fs.isfile(self._k(key))

    def list(self, prefix: str) -> Iterator[ObjectInfo]:
        try:
            found = self.fs.find(self._k(prefix), detail=True)
        except FileNotFoundError:
            return
        for path, info in found.items():
            mtime = info.get("mtime") or info.get("LastModified") or 0
            mtime = mtime.timestamp() if hasattr(mtime, "timestamp") else float(mtime)
            yield ObjectInfo(path[len(self.root) + 1:], int(info.get("size") or 0), mtime)

    def delete(self, keys: list[str]) -> None:
        if keys:
            self.fs.rm([self._k(k) for k in keys])

    def upload_file(self, src: Path, key: str, progress: Progress = _noop) -> str:
        h = hashlib.sha256()
        with open(src, "rb") as fin, self.fs.open(self._k(key), "wb") as fout:
            while chunk := fin.read(CHUNK):
                h.update(chunk)
                fout.write(chunk)
                progress(len(chunk))
        return h.hexdigest()

    def download_file(self, key: str, dest: Path, size: int, progress: Progress = _noop) -> str:
        h = hashlib.sha256()
        with self.fs.open(self._k(key), "rb") as fin, open(dest, "wb") as fout:
            while chunk := fin.read(CHUNK):
                h.update(chunk)
                fout.write(chunk)
                progress(len(chunk))
        return h.hexdigest()


def backend_for_url(url: str, *, s3_endpoint_url: str | None = None, s3_credentials: dict | None = None,
                    storage_options: dict | None = None):
    parsed = urlparse(url)
    if parsed.scheme in ("", "file"):
        path = parsed.path if parsed.scheme == "file" else url
        if parsed.scheme == "file" and parsed.netloc not in ("", "localhost"):
            path = parsed.netloc + parsed.path  # file://relative/dir
        return LocalBackend(path)
    if parsed.scheme in ("s3", "s3a"):
        if not parsed.netloc:
            raise ValueError(f"store URL {url!r} names no bucket")
        return S3Backend(parsed.netloc, parsed.path, endpoint_url=s3_endpoint_url, credentials=s3_credentials)
    return FsspecBackend(url, storage_options)


# S3 lives in its own module; it builds on the helpers above.
from .s3 import S3Backend, StoreUnreachable  # noqa: E402

__all__ = ["CHUNK", "FsspecBackend", "LocalBackend", "ObjectInfo", "PreconditionFailed", "S3Backend",
           "StoreUnreachable", "backend_for_url", "copy_hashing", "hash_file"]
