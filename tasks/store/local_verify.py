"""Checking a file:// version in place against its manifest's sha256, without rehashing
tens of GB on every read.

A stage reads its input straight from the store directory (no copy). Sizes alone
let a same-size byte change through (it would be converted, pass a gate that
compares against the same corrupt bytes, and be committed), so every file is
hashed, in parallel, and compared with the manifest.

The verified stamp: after a file hashes right (or was hashed by the commit
itself), its identity is recorded: device, inode, size, mtime_ns and ctime_ns.
A later read whose stat matches the stamp skips the hash. That is safe against
any change made through the filesystem: writing through any hard link, or
truncating, updates the inode's ctime, which no user-space call can set back
(utime sets mtime/atime only), and replacing the file changes the inode. What
it does not cover: writes to the raw block device or a changed system clock.
Stamps live in the user's cache dir (GPTOSS_CACHE), never in the store, so a
read-only store stays readable.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from .base import hash_file
from .manifest import Manifest

log = logging.getLogger(__name__)


class LocalIntegrityError(RuntimeError):
    """A file of a committed version no longer matches its manifest."""


def _identity(path: Path) -> list[int]:
    st = path.stat()
    return [st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns]


def _stamp_file(stamp_dir: Path, root: Path, manifest: Manifest) -> Path:
    key = hashlib.sha256(f"{root.resolve()}\0{manifest.version}".encode()).hexdigest()[:32]
    return stamp_dir / f"{key}.json"


def _read_stamp(path: Path) -> dict:
    try:
        data = json.loads(path.read_text())
        return data if isinstance(data, dict) else {}
    except (OSError, ValueError):
        return {}


def _write_stamp(path: Path, stamp: dict) -> None:
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f".{os.getpid()}.tmp")
        tmp.write_text(json.dumps(stamp))
        os.replace(tmp, path)
    except OSError as exc:  # a stamp only saves time: without one, the next read hashes again
        log.warning("could not record verified stamp %s (%s)", path, type(exc).__name__)


def stamp_committed(root: Path, manifest: Manifest, stamp_dir: Path) -> None:
    """Record the files the commit itself just hashed as verified."""
    _write_stamp(_stamp_file(stamp_dir, root, manifest),
                 {e.path: _identity(root / e.path) for e in manifest.files})


def verify_in_place(root: Path, manifest: Manifest, stamp_dir: Path, max_workers: int = 4) -> int:
    """Raise LocalIntegrityError unless every file under `root` matches the manifest; bytes hashed."""
    stamp_path = _stamp_file(stamp_dir, root, manifest)
    stamp = _read_stamp(stamp_path)
    todo = []
    for entry in manifest.files:
        path = root / entry.path
        if not path.is_file() or path.stat().st_size != entry.size:
            raise LocalIntegrityError(f"{manifest.spec}: file {entry.path!r} is missing or has the wrong size "
                                      f"(manifest: {entry.size} bytes)")
        if stamp.get(entry.path) != _identity(path):
            todo.append(entry)

    def check(entry) -> None:
        got = hash_file(root / entry.path)
        if got != entry.sha256:
            raise LocalIntegrityError(f"{manifest.spec}: file {entry.path!r} does not match its manifest: "
                                      f"sha256 {got} on disk, {entry.sha256} committed")

    if todo:
        with ThreadPoolExecutor(max_workers, thread_name_prefix="verify") as pool:
            list(pool.map(check, todo))
        _write_stamp(stamp_path, {e.path: _identity(root / e.path) for e in manifest.files})
    return sum(e.size for e in todo)
