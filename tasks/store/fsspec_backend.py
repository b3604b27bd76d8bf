"""Any fsspec URL that is neither a directory nor S3 (best effort: no atomic create, so
concurrent writers are only protected by claims)."""
from __future__ import annotations

import hashlib
from collections.abc import Iterator
from pathlib import Path

from .base import CHUNK, ObjectInfo, PreconditionFailed, Progress, WithoutEtags, no_progress


class FsspecBackend(WithoutEtags):
    """Any other fsspec filesystem. No atomic create: claims guard commits."""

    def __init__(self, url: str, storage_options: dict | None = None):
        import fsspec

        self.fs, root = fsspec.core.url_to_fs(url, **(storage_options or {}))
        self.root = root.rstrip("/")
        self.url = url.rstrip("/")
        self.local_root = None

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

    def upload_file(self, src: Path, key: str, progress: Progress = no_progress) -> str:
        h = hashlib.sha256()
        with open(src, "rb") as fin, self.fs.open(self._k(key), "wb") as fout:
            while chunk := fin.read(CHUNK):
                h.update(chunk)
                fout.write(chunk)
                progress(len(chunk))
        return h.hexdigest()

    def download_file(self, key: str, dest: Path, size: int, progress: Progress = no_progress) -> str:
        h = hashlib.sha256()
        with self.fs.open(self._k(key), "rb") as fin, open(dest, "wb") as fout:
            while chunk := fin.read(CHUNK):
                h.update(chunk)
                fout.write(chunk)
                progress(len(chunk))
        return h.hexdigest()
