"""The store in a directory on a local (or mounted) filesystem: `file://`, the embedded default."""
from __future__ import annotations

import hashlib
import os
import tempfile
import uuid
from collections.abc import Iterator
from pathlib import Path

from .base import CHUNK, ObjectInfo, PreconditionFailed, Progress, WithoutEtags, hash_file, no_progress


class LocalBackend(WithoutEtags):
    """A directory on a local (or mounted) filesystem."""

    def __init__(self, root: str | Path):
        self.local_root = Path(root).expanduser().resolve()
        self.url = self.local_root.as_uri()

    def path(self, key: str) -> Path:
        return self.local_root / key

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
                yield ObjectInfo(p.relative_to(self.local_root).as_posix(), st.st_size, st.st_mtime)

    def delete(self, keys: list[str]) -> None:
        for key in keys:
            p = self.path(key)
            p.unlink(missing_ok=True)
            # Drop directories left empty, up to the store root.
            parent = p.parent
            while parent != self.local_root and parent.is_dir():
                try:
                    parent.rmdir()
                except OSError:
                    break
                parent = parent.parent

    def upload_file(self, src: Path, key: str, progress: Progress = no_progress) -> str:
        # A staging file nobody else links to is hard-linked into the store, not copied:
        # a 42 GB checkpoint is not written twice (nor held twice on disk). A file with other
        # links (a kept download work copy) is copied, so editing it can never change a
        # committed artifact. Either way every byte is hashed for the manifest.
        dest = self.path(key)
        if os.stat(src).st_nlink == 1 and _link_into_place(Path(src), dest):
            return hash_file(dest, progress)
        return copy_hashing(src, dest, progress)

    def download_file(self, key: str, dest: Path, size: int, progress: Progress = no_progress) -> str:
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


def copy_hashing(src: Path, dest: Path, progress: Progress = no_progress) -> str:
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
