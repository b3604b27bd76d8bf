"""What crashed or abandoned runs leave behind, found and removed by `gptoss artifacts gc`.

- uncommitted versions in the store (files without a MANIFEST.json);
- unfinished S3 multipart uploads under the store prefix (invisible in listings,
  billed by S3) of writers killed mid-upload;
- local work dirs under the workdir: stage staging dirs (`{stage}-{version}`,
  `{stage}-{version}-XXXX`), training run dirs (`train-{identity}`: checkpoints with
  optimizer state, everything of which is committed to the store as it is saved) and
  download work dirs (`hf-downloads/*`).

Nothing a live writer holds is touched: a version is only cleared by whoever
gets its claim, and a work dir only while gc holds its lock (`.{name}.lock`
beside it, held by the stage or transfer using it; the kernel drops it when
that process dies, even by kill -9). Everything is also left alone until
untouched for `older_than_s`.
"""
from __future__ import annotations

import os
import re
import shutil
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from gptoss_model.system.paths import try_lock

from .claims import CLAIM_FILE, work_dir_lock
from .manifest import MANIFEST_FILE
from .names import VERSION_RE
from .store import SPECIAL_DIRS

DOWNLOADS_DIR = "hf-downloads"
# `{stage}-{version}` (resumable staging) or `{stage}-{version}-{random}` (one-shot staging).
STAGING_RE = re.compile(r"^[a-z][a-z0-9_-]*-[0-9a-f]{20}(-[A-Za-z0-9_]+)?$")
TRAIN_RUN_RE = re.compile(r"^train-[0-9a-f]{16}$")  # tasks.train.run_dir: one per run identity


@dataclass(frozen=True)
class Leftover:
    what: str   # "incomplete version", "multipart upload", "staging dir", "training run dir", "download work dir"
    where: str  # store key prefix, object key (+ upload id) or local path
    bytes: int = 0


def _newest_mtime(root: Path) -> float:
    newest = root.lstat().st_mtime
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            try:
                newest = max(newest, (Path(dirpath) / name).lstat().st_mtime)
            except FileNotFoundError:
                continue
    return newest


def _du(root: Path) -> int:
    total = 0
    for dirpath, _, filenames in os.walk(root):
        for name in filenames:
            try:
                total += (Path(dirpath) / name).lstat().st_size
            except FileNotFoundError:
                continue
    return total


def work_dir_candidates(workdir: Path) -> Iterator[tuple[str, Path]]:
    """Directories under `workdir` that stages create; nothing else there is ever looked at
    (the default workdir is the system temp dir, shared with everything else)."""
    workdir = Path(workdir)
    if not workdir.is_dir():
        return
    for entry in sorted(workdir.iterdir()):
        if entry.is_dir() and not entry.is_symlink() and STAGING_RE.match(entry.name):
            yield "staging dir", entry
        elif entry.is_dir() and not entry.is_symlink() and TRAIN_RUN_RE.match(entry.name):
            yield "training run dir", entry
    downloads = workdir / DOWNLOADS_DIR
    if downloads.is_dir():
        for entry in sorted(downloads.iterdir()):
            if entry.is_dir() and not entry.is_symlink() and not entry.name.startswith("."):
                yield "download work dir", entry


def clean_work_dirs(workdir: Path, older_than_s: float, *, dry_run: bool = False) -> list[Leftover]:
    """Remove stale staging and download work dirs that no live process holds."""
    cutoff = time.time() - older_than_s
    found = []
    for what, directory in work_dir_candidates(workdir):
        try:
            if _newest_mtime(directory) > cutoff:
                continue
        except FileNotFoundError:
            continue
        lock = work_dir_lock(directory)
        lock_existed = lock.exists()
        fd = try_lock(lock)
        if fd is None:
            continue  # a live stage or transfer holds it
        try:
            found.append(Leftover(what, str(directory), _du(directory)))
            if not dry_run:
                shutil.rmtree(directory)
            if not dry_run or not lock_existed:
                lock.unlink(missing_ok=True)
        finally:
            os.close(fd)
    return found


def version_prefix(key: str) -> str | None:
    """`kind/name.../version` of a store key inside a version, else None."""
    parts = key.split("/")
    for i in range(2, len(parts) - 1):
        if VERSION_RE.match(parts[i]):
            return "/".join(parts[: i + 1])
    return None


def incomplete_versions(store) -> dict[str, float]:
    """Uncommitted version prefixes -> newest object time."""
    newest: dict[str, float] = {}
    committed: set[str] = set()
    for info in store.backend.list(""):
        prefix = None if info.key.startswith(SPECIAL_DIRS) else version_prefix(info.key)
        if prefix is not None:
            newest[prefix] = max(newest.get(prefix, 0.0), info.mtime)
            if info.key == f"{prefix}/{MANIFEST_FILE}":
                committed.add(prefix)
    return {p: t for p, t in newest.items() if p not in committed}


def remove_incomplete_versions(store, older_than_s: float, *, dry_run: bool = False) -> list[str]:
    """Delete uncommitted versions untouched for `older_than_s` seconds whose claim we can take."""
    cutoff = time.time() - older_than_s
    removed = []
    for prefix, mtime in sorted(incomplete_versions(store).items()):
        if mtime > cutoff:
            continue
        kind, *name, version = prefix.split("/")
        claim = store.claim(kind, "/".join(name), version)
        if not claim.try_acquire():
            continue  # a live writer is still on it
        try:
            if not dry_run:
                store.clear_incomplete(kind, "/".join(name), version)
                store.backend.delete([f"{prefix}/{CLAIM_FILE}"])
            removed.append(prefix)
        finally:
            claim.release()
    return removed


def abort_stale_uploads(store, older_than_s: float, *, dry_run: bool = False) -> list[Leftover]:
    """Abort multipart uploads under the store prefix older than the cutoff whose
    version no live writer claims (a claim we can take means its writer is gone).
    Only S3 makes multipart uploads; other backends list none."""
    backend = store.backend
    cutoff = time.time() - older_than_s
    by_version: dict[str | None, list[tuple[str, str]]] = {}
    for key, upload_id, initiated in backend.multipart_uploads(""):
        if initiated <= cutoff:
            by_version.setdefault(version_prefix(key), []).append((key, upload_id))
    aborted = []
    for prefix, uploads in sorted(by_version.items(), key=lambda kv: kv[0] or ""):
        claim = None
        if prefix is not None:
            kind, *name, version = prefix.split("/")
            claim = store.claim(kind, "/".join(name), version)
            if not claim.try_acquire():
                continue  # its writer is alive: the upload may still complete
        try:
            for key, upload_id in uploads:
                if not dry_run:
                    backend.abort_upload(key, upload_id)
                aborted.append(Leftover("multipart upload", f"{key} (upload {upload_id[:16]}...)"))
        finally:
            if claim is not None:
                claim.release()
    return aborted


@dataclass(frozen=True)
class Problem:
    key: str          # the store key of the damaged object
    what: str         # one line naming the file and what is wrong
    quarantinable: bool  # an unreadable manifest or ref: moving it aside unblocks its artifact


def fsck(store) -> list[Problem]:
    """Every manifest and ref readable, every committed file present at its size."""
    from .manifest import MANIFEST_FILE, CorruptStoreObject
    from .store import SPECIAL_DIRS

    sizes = {o.key: o.size for o in store.backend.list("") if not o.key.startswith(SPECIAL_DIRS)}
    problems = []
    for key in sorted(sizes):
        parts = key.split("/")
        try:
            if parts[-1] == MANIFEST_FILE and (prefix := version_prefix(key)):
                kind, *name, version = prefix.split("/")
                manifest = store.get_manifest(kind, "/".join(name), version)
                for entry in manifest.files:
                    got = sizes.get(f"{prefix}/{entry.path}")
                    if got != entry.size:
                        state = "is missing" if got is None else f"has {got} bytes, not {entry.size}"
                        problems.append(Problem(key, f"{store.url}/{prefix}/{entry.path} {state} "
                                                     f"(committed in {manifest.spec})", False))
            elif len(parts) >= 4 and parts[-2] == "refs" and version_prefix(key) is None:
                version = store.get_ref(parts[0], "/".join(parts[1:-2]), parts[-1])
                if store.get_manifest(parts[0], "/".join(parts[1:-2]), version) is None:
                    problems.append(Problem(key, f"ref {store.url}/{key} points at {version}, which is not "
                                                 "committed", True))
        except (CorruptStoreObject, ValueError) as exc:
            problems.append(Problem(key, str(exc), True))
    return problems


def quarantine(store, key: str) -> str:
    """Move an unreadable manifest or ref aside (kept for inspection); returns where it went.
    Its artifact version then counts as uncommitted, so the next stage run rebuilds it."""
    from datetime import datetime, timezone

    from .store import QUARANTINE_DIR

    data = store.backend.get_bytes(key)
    aside = f"{QUARANTINE_DIR}/{key}.{datetime.now(timezone.utc).strftime('%Y%m%dT%H%M%S%fZ')}"
    if data is not None:
        store.backend.put_bytes(aside, data)
        store.backend.delete([key])
    return aside
