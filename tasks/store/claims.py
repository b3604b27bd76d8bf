"""Claims: at most one writer works on an artifact version at a time.

Two runs of the same stage on the same inputs compute the same version. The
first to claim it does the work; the others wait for its manifest and reuse
it. A claim dies with its writer: on a local store it is an OS file lock
(released by the kernel on kill -9); on object storage it is a small object
with a heartbeat, taken over once stale (or at once when its writer's pid is
known dead on this host). The conditional manifest write stays the final
guard, so a claim only saves duplicate work, it is never trusted for safety.
"""
from __future__ import annotations

import fcntl
import hashlib
import json
import os
import socket
import threading
import time
import uuid
from pathlib import Path

from gptoss_model.system.paths import try_lock, work_dir_lock

from .base import Backend, PreconditionFailed

CLAIM_FILE = ".claim.json"
LOCK_DIR = ".locks"


def _boot_id() -> str:
    try:
        return Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    except OSError:
        return ""


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def owner_record() -> dict:
    return {"owner": uuid.uuid4().hex, "host": socket.gethostname(), "boot_id": _boot_id(),
            "pid": os.getpid(), "heartbeat": time.time()}


class LocalClaim:
    """flock on `{root}/.locks/<hash>.lock`; the kernel releases it on any exit."""

    def __init__(self, root: Path, prefix: str):
        digest = hashlib.sha256(prefix.encode()).hexdigest()[:32]
        self.path = root / LOCK_DIR / f"{digest}.lock"
        self.prefix = prefix
        self._fd: int | None = None

    def try_acquire(self) -> bool:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = try_lock(self.path)
        if fd is None:
            return False
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps({**owner_record(), "prefix": self.prefix}).encode(), 0)
        self._fd = fd
        return True

    def holder(self) -> str:
        try:
            info = json.loads(self.path.read_text() or "{}")
        except (OSError, ValueError):
            return "another writer"
        return f"pid {info.get('pid')} on {info.get('host')}"

    def ensure_held(self) -> None:
        if self._fd is None:
            raise RuntimeError(f"claim on {self.prefix} is not held")

    def release(self) -> None:
        if self._fd is not None:
            fcntl.flock(self._fd, fcntl.LOCK_UN)
            os.close(self._fd)
            self._fd = None


class ObjectClaim:
    """A claim object `{prefix}/.claim.json` with a heartbeat."""

    def __init__(self, backend: Backend, prefix: str, *, ttl: float = 300.0):
        self.backend = backend
        self.key = f"{prefix}/{CLAIM_FILE}"
        self.prefix = prefix
        self.ttl = ttl
        self.record: dict | None = None
        self._etag: str | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.lost = False

    def _read(self) -> tuple[dict, str | None] | None:
        got = self.backend.get_with_etag(self.key)
        if got is None:
            return None
        data, etag = got
        try:
            return json.loads(data), etag
        except ValueError:
            return {}, etag

    def _is_stale(self, rec: dict) -> bool:
        if time.time() - float(rec.get("heartbeat", 0)) > self.ttl:
            return True
        same_host = rec.get("host") == socket.gethostname() and rec.get("boot_id") == _boot_id()
        return same_host and not _pid_alive(int(rec.get("pid", -1)))

    def try_acquire(self) -> bool:
        rec = owner_record()
        data = json.dumps(rec).encode()
        try:
            self.backend.put_bytes(self.key, data, if_absent=True)
        except PreconditionFailed:
            current = self._read()
            if current is None or not self._is_stale(current[0]):
                return False
            # Take over a dead writer's claim; where there are etags, only one of several breakers wins.
            try:
                self.backend.replace(self.key, data, if_match=current[1])
            except PreconditionFailed:
                return False
        self.record = rec
        got = self._read()
        if got is None or got[0].get("owner") != rec["owner"]:
            return False
        self._etag = got[1]
        self._thread = threading.Thread(target=self._heartbeat, daemon=True, name="claim-heartbeat")
        self._thread.start()
        return True

    def _heartbeat(self) -> None:
        while not self._stop.wait(self.ttl / 5):
            rec = {**self.record, "heartbeat": time.time()}
            try:
                self._etag = self.backend.replace(self.key, json.dumps(rec).encode(), if_match=self._etag)
            except PreconditionFailed:
                self.lost = True
                return

    def holder(self) -> str:
        got = self._read()
        if not got:
            return "another writer"
        return f"pid {got[0].get('pid')} on {got[0].get('host')}"

    def ensure_held(self) -> None:
        if self.record is None or self.lost:
            raise RuntimeError(f"claim on {self.prefix} was lost to another writer (heartbeat missed?)")

    def release(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        if self.record is not None:
            got = self._read()
            if got is not None and got[0].get("owner") == self.record["owner"]:
                self.backend.delete([self.key])
        self.record = None


def hold_work_dir(directory: Path) -> int:
    """Block until the work dir's lock is ours; returns the fd (close it to release)."""
    fd = try_lock(work_dir_lock(directory), blocking=True)
    assert fd is not None
    return fd


def claim_for(backend: Backend, prefix: str, *, ttl: float = 300.0):
    if backend.local_root is not None:
        return LocalClaim(backend.local_root, prefix)
    return ObjectClaim(backend, prefix, ttl=ttl)
