"""Resumable, verified placement of snapshot files into a local directory.

The engine under `gptoss_model.hub.download` (Hub over HTTP) and its local /
fsspec mirror copy. A source only has to append bytes from an offset
(`Transfer._fill`); this module does the rest, the same for every source:

* `dest/.partial/<path>` holds the bytes of an unfinished file; after a
  kill -9 the next call hashes what is there and continues from its end;
  `dest/.partial/.expect/<path>` says which content those bytes were for, so
  a dest_dir reused for another version starts that file over;
* bytes are hashed as they are written (1 MiB steps: bounded memory);
* verification: size, and sha256 (LFS) or git blob oid where known; a
  mismatch fetches the file once more from byte 0, then fails naming it;
* only verified, fsynced files are renamed into place (atomic rename), so
  `dest/<path>` is either absent or right; a file already in place that
  verifies is kept and costs no transfer.
"""

from __future__ import annotations

import abc

import hashlib
import json
import logging
import os
import shutil
import threading
import time
from concurrent.futures import ThreadPoolExecutor, as_completed
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Iterable

from huggingface_hub.utils import filter_repo_objects

from gptoss_model.errors import PermanentError
from gptoss_model.system.paths import relative_path_problem, try_lock, work_dir_lock

log = logging.getLogger(__name__)

CHUNK = 1 << 20  # bytes per read/write/hash step: bounds memory per worker
PARTIAL_DIR = ".partial"
_EXPECT_DIR = ".expect"
_RETRIES = 5  # consecutive failed requests without progress before a file fails

Progress = Callable[[int, int], None]  # (bytes_done, bytes_total)


class TransferError(RuntimeError):
    """A snapshot transfer failed; the message names the source (and file)."""


class SourceNotFoundError(PermanentError, TransferError):
    """The source, or a file it lists, does not exist (a Hub 404, a missing mirror)."""


class ChecksumMismatchError(PermanentError, TransferError):
    """A file still did not match its expected digest after one re-fetch."""


class MirrorNotFoundError(SourceNotFoundError):
    """The mirror directory, or a file it listed, cannot be read."""


@dataclass(frozen=True)
class RemoteFile:
    path: str
    size: int
    blob_id: str | None = None  # git oid (of the LFS pointer for LFS files)
    sha256: str | None = None  # LFS oid: sha256 of the content

    @property
    def lfs(self) -> bool:
        return self.sha256 is not None


@dataclass
class FileRecord:
    path: str
    size: int
    sha256: str  # of the content, always computed
    git_oid: str | None  # the tree's blob oid (verified for non-LFS files)
    lfs: bool
    bytes_fetched: int  # bytes transferred by this call (0 when already in place)


@dataclass
class DownloadResult:
    source: str  # endpoint/repo or the local URL (never with credentials)
    repo_id: str | None
    revision: str | None  # as asked
    commit: str | None  # the resolved sha; None for local copies
    files: list[FileRecord] = field(default_factory=list)
    seconds: float = 0.0

    @property
    def bytes_total(self) -> int:
        return sum(f.size for f in self.files)

    @property
    def bytes_fetched(self) -> int:
        return sum(f.bytes_fetched for f in self.files)

    def content_digest(self) -> str:
        """sha256 over (path, size, sha256) of all files: names the content."""
        rows = sorted((f.path, f.size, f.sha256) for f in self.files)
        return hashlib.sha256(json.dumps(rows).encode()).hexdigest()

    def to_dict(self) -> dict:
        d = asdict(self)
        d.update(bytes_total=self.bytes_total, bytes_fetched=self.bytes_fetched)
        return d


def safe_relpath(path: str, where: str) -> str:
    """Refuse paths that would land outside dest_dir."""
    problem = relative_path_problem(path)
    if problem:
        raise TransferError(f"{where}: refusing unsafe file path {path!r} ({problem}).")
    return path


def select_files(files: Iterable[RemoteFile], allow_patterns, ignore_patterns) -> list[RemoteFile]:
    # huggingface_hub's own filter: the same semantics as snapshot_download.
    return list(filter_repo_objects(files, allow_patterns=allow_patterns, ignore_patterns=ignore_patterns,
                                    key=lambda f: f.path))


class Retry(Exception):
    """A transient failure: request again from the bytes on disk."""


class _Cancelled(Exception):
    """Another file failed: stop this one at the next chunk."""


class Part:
    """The bytes of one file so far (on disk or being checked) and their digests."""

    def __init__(self, fh, rf: RemoteFile, tick: Callable[[int], None]):
        self.fh, self.rf, self.tick = fh, rf, tick  # fh None: hash only
        self.have = 0
        self.fetched = 0  # bytes that came from the source in this call
        self._new_digests()

    def reset(self) -> None:
        """Forget all bytes (truncate the file): the next byte is byte 0."""
        self.tick(-self.have)
        self.fh.seek(0)
        self.fh.truncate()
        self.have = 0
        self._new_digests()

    def _new_digests(self) -> None:
        self.sha256 = hashlib.sha256()
        # git blob oid = sha1(b"blob {size}\0" + content); it names the content only
        # for non-LFS files (for LFS files it is the pointer's oid).
        self.sha1 = None
        if self.rf.blob_id and not self.rf.lfs:
            self.sha1 = hashlib.sha1(b"blob %d\0" % self.rf.size)

    def add(self, chunk: bytes, write: bool = True) -> None:
        if write:
            self.fh.write(chunk)
            self.fetched += len(chunk)
        self.sha256.update(chunk)
        if self.sha1 is not None:
            self.sha1.update(chunk)
        self.have += len(chunk)
        self.tick(len(chunk))

    def problem(self) -> str | None:
        """None when the bytes match what the source promised, else why not."""
        rf = self.rf
        if self.have != rf.size:
            return f"size mismatch: expected {rf.size} bytes, found {self.have}"
        if rf.lfs and self.sha256.hexdigest() != rf.sha256:
            return f"sha256 mismatch: expected {rf.sha256}, found {self.sha256.hexdigest()}"
        if self.sha1 is not None and self.sha1.hexdigest() != rf.blob_id:
            return f"git blob oid mismatch: expected {rf.blob_id}, found {self.sha1.hexdigest()}"
        return None


class Transfer(abc.ABC):
    """Places files into `dest` in parallel. Subclasses set `where` (for
    messages) and implement `_fill` (append bytes from `part.have` on)."""

    where = "source"

    def __init__(self, dest_dir, max_workers: int, progress: Progress | None):
        self.dest = Path(dest_dir)
        self.max_workers = max(1, int(max_workers))
        self._progress, self._done, self._total = progress, 0, 0
        self._lock = threading.Lock()
        self._cancel = threading.Event()

    @abc.abstractmethod
    def _fill(self, rf: RemoteFile, part: Part) -> None:
        """Append `rf`'s bytes from `part.have` on to `part`."""

    def _tick(self, n: int) -> None:
        if self._cancel.is_set():
            raise _Cancelled()
        with self._lock:
            self._done += n
            done = self._done
        if self._progress is not None and n:
            self._progress(done, self._total)

    def run(self, files: list[RemoteFile]) -> list[FileRecord]:
        self._total = sum(f.size for f in files)
        self.dest.mkdir(parents=True, exist_ok=True)
        with _exclusive(self.dest, self.where):
            self._check_space(files)
            return self._run(files)

    def _run(self, files: list[RemoteFile]) -> list[FileRecord]:
        records: list[FileRecord] = []
        # Largest first, so one big shard does not start last and run alone.
        order = sorted(files, key=lambda f: -f.size)
        with ThreadPoolExecutor(self.max_workers, thread_name_prefix="snapshot-dl") as ex:
            futures = [ex.submit(self._one, rf) for rf in order]
            try:
                for fut in as_completed(futures):
                    records.append(fut.result())
            except BaseException:
                self._cancel.set()  # the other workers stop at their next chunk
                for fut in futures:
                    fut.cancel()
                raise
        _remove_if_no_files(self.dest / PARTIAL_DIR)
        return sorted(records, key=lambda r: r.path)

    def _check_space(self, files: list[RemoteFile]) -> None:
        # Fail in seconds, not after hours: bytes still missing vs free space.
        need = 0
        for rf in files:
            final, partial = self.dest / rf.path, self.dest / PARTIAL_DIR / rf.path
            if final.is_file() and final.stat().st_size == rf.size:
                continue
            need += rf.size - (partial.stat().st_size if partial.is_file() else 0)
        free = shutil.disk_usage(self.dest).free
        if need > free:
            raise TransferError(f"{self.where}: {need} more bytes are needed in {self.dest} "
                                f"but only {free} are free.")

    def _one(self, rf: RemoteFile) -> FileRecord:
        final = self.dest / rf.path
        done = self._in_place(rf, final)
        if done is not None:
            return done
        partial = self.dest / PARTIAL_DIR / rf.path
        expect = self.dest / PARTIAL_DIR / _EXPECT_DIR / rf.path
        want = json.dumps([rf.size, rf.sha256, rf.blob_id])
        partial.parent.mkdir(parents=True, exist_ok=True)
        expect.parent.mkdir(parents=True, exist_ok=True)
        if partial.exists() and (not expect.exists() or expect.read_text() != want):
            partial.unlink()  # bytes of some other content
        expect.write_text(want)
        # Append mode: every write lands at the end, which is where the next byte goes.
        with open(partial, "a+b") as fh:
            fh.seek(0)
            part = Part(fh, rf, self._tick)
            # Hash what an earlier (killed) call left, then fetch the rest.
            while part.have < rf.size and (chunk := fh.read(min(CHUNK, rf.size - part.have))):
                part.add(chunk, write=False)
            fh.truncate(part.have)  # drop bytes beyond the expected size, if any
            for attempt in (1, 2):
                self._fetch_rest(rf, part)
                problem = part.problem()
                if problem is None:
                    break
                part.reset()  # discard: never resume from bytes known to be wrong
                if attempt == 2:
                    partial.unlink(missing_ok=True)
                    expect.unlink(missing_ok=True)
                    raise ChecksumMismatchError(f"{self.where}: file {rf.path!r} failed verification after a "
                                                f"re-fetch from byte 0: {problem}.")
                log.warning("%s: %s: %s; discarding it and fetching again from byte 0", self.where, rf.path, problem)
            fh.flush()
            os.fsync(fh.fileno())  # the rename below must not publish unwritten bytes
        final.parent.mkdir(parents=True, exist_ok=True)
        os.replace(partial, final)
        expect.unlink(missing_ok=True)
        return self._record(rf, part, part.fetched)

    def _in_place(self, rf: RemoteFile, final: Path) -> FileRecord | None:
        """A file already in place is kept if its bytes verify (nothing fetched)."""
        if not final.is_file() or final.stat().st_size != rf.size:
            return None
        part = Part(None, rf, self._tick)
        with open(final, "rb") as fh:
            while chunk := fh.read(CHUNK):
                part.add(chunk, write=False)
        if self._known_good(rf, part):
            return self._record(rf, part, 0)
        self._tick(-part.have)
        log.warning("%s: %s in place does not verify; fetching it again", self.where, rf.path)
        return None

    def _known_good(self, rf: RemoteFile, part: Part) -> bool:
        return part.problem() is None

    def _record(self, rf: RemoteFile, part: Part, fetched: int) -> FileRecord:
        return FileRecord(rf.path, rf.size, part.sha256.hexdigest(), rf.blob_id, rf.lfs, fetched)

    def _fetch_rest(self, rf: RemoteFile, part: Part) -> None:
        """Append bytes until `rf.size` are on disk (or the source runs dry)."""
        failures = 0
        while part.have < rf.size:
            before = part.have
            try:
                self._fill(rf, part)
            except Retry as e:
                failures = 0 if part.have > before else failures + 1
                if failures >= _RETRIES:
                    raise TransferError(f"{self.where}: file {rf.path!r}: giving up after {failures} failed "
                                        f"tries at byte {part.have} of {rf.size}: {e}") from None
                log.info("%s: %s: %s; retrying from byte %d", self.where, rf.path, e, part.have)
                time.sleep(min(0.5 * 2**failures, 10.0))
            else:
                if part.have == before:
                    break  # the source has no more bytes: verification reports it


@contextmanager
def _exclusive(dest: Path, where: str):
    """One writer per dest_dir: two would append to the same partial files.
    An flock, so the kernel releases it when its holder dies (even kill -9)."""
    lock = work_dir_lock(dest)
    fd = try_lock(lock)
    if fd is None:
        log.info("%s: another process is writing into %s; waiting for it", where, dest)
        fd = try_lock(lock, blocking=True)
    try:
        yield
    finally:
        os.close(fd)  # releases the lock; the file stays (unlinking would race a new locker)


def _remove_if_no_files(root: Path) -> None:
    if not root.is_dir():
        return
    for _, _, filenames in os.walk(root):
        if filenames:
            return  # bytes of unfinished files: keep them for a later resume
    shutil.rmtree(root, ignore_errors=True)


# --------------------------------------------------------------------------
# Local / fsspec mirrors (air-gapped sites, the demo)
# --------------------------------------------------------------------------
# Files a mirror may carry that are not part of the model.
_LOCAL_SKIP = (".git/", ".cache/huggingface/", PARTIAL_DIR + "/")


class _FsTransfer(Transfer):
    def __init__(self, fs, root: str, where: str, dest_dir, max_workers, progress):
        super().__init__(dest_dir, max_workers, progress)
        self.fs, self.root, self.where = fs, root, where

    def _fill(self, rf: RemoteFile, part: Part) -> None:
        try:
            with self.fs.open(f"{self.root}/{rf.path}", "rb") as src:
                src.seek(part.have)
                while part.have <= rf.size and (chunk := src.read(CHUNK)):
                    part.add(chunk)
        except (FileNotFoundError, PermissionError) as e:
            raise MirrorNotFoundError(f"{self.where}: cannot read file {rf.path!r}: {type(e).__name__}.") from None
        except OSError as e:
            raise Retry(f"{type(e).__name__}: {e}") from None

    def _known_good(self, rf: RemoteFile, part: Part) -> bool:
        # A mirror carries no digests: keep the file in place only if it equals the source.
        h = hashlib.sha256()
        with self.fs.open(f"{self.root}/{rf.path}", "rb") as src:
            while chunk := src.read(CHUNK):
                h.update(chunk)
        return part.have == rf.size and h.hexdigest() == part.sha256.hexdigest()


def normalized_url(url: str) -> str:
    """One spelling per location, without credentials: a local path (relative, absolute,
    trailing '/', file://) becomes its absolute file:// URI; other URLs lose user:password@."""
    from urllib.parse import urlsplit

    u = urlsplit(url)
    if u.scheme in ("", "file"):
        return Path(u.path if u.scheme else url).expanduser().resolve().as_uri()
    if u.username or u.password:
        u = u._replace(netloc=u.hostname + (f":{u.port}" if u.port else ""))
    return u.geturl().rstrip("/")


def _open_mirror(src_url: str, storage_options: dict | None):
    """(fs, root, where): `where` names the mirror without any credentials in its URL."""
    import fsspec

    where = normalized_url(src_url)
    fs, root = fsspec.core.url_to_fs(src_url, **(storage_options or {}))
    root = root.rstrip("/")
    if not fs.isdir(root):
        raise MirrorNotFoundError(f"Local snapshot {where} is not a directory.")
    return fs, root, where


def _mirror_files(fs, root: str, where: str, allow_patterns, ignore_patterns) -> list[RemoteFile]:
    files = []
    for path, info in fs.find(root, detail=True).items():
        rel = path[len(root):].lstrip("/")
        if info.get("type") == "file" and not rel.startswith(_LOCAL_SKIP):
            files.append(RemoteFile(safe_relpath(rel, where), int(info["size"])))
    return select_files(files, allow_patterns, ignore_patterns)


def copy_local_snapshot(src_url: str, dest_dir, *, allow_patterns=None, ignore_patterns=None, max_workers: int = 4,
                        progress: Progress | None = None, storage_options: dict | None = None) -> DownloadResult:
    """Copy a directory in HF layout (any fsspec URL) the way `download_snapshot`
    downloads: same resume, atomic placement and records (sha256 computed).
    Sizes are checked against the source listing, as a mirror has no digests."""
    t0 = time.monotonic()
    fs, root, where = _open_mirror(src_url, storage_options)
    files = _mirror_files(fs, root, where, allow_patterns, ignore_patterns)
    records = _FsTransfer(fs, root, where, dest_dir, max_workers, progress).run(files)
    return DownloadResult(where, None, None, None, records, time.monotonic() - t0)


def digest_local_snapshot(src_url: str, *, allow_patterns=None, ignore_patterns=None, max_workers: int = 4,
                          storage_options: dict | None = None) -> DownloadResult:
    """The records `copy_local_snapshot` would produce (sizes, sha256), read in place: nothing is written.

    A mirror has no commit sha, so its content digest is its identity; knowing it
    before copying lets a stage find an already committed version and copy nothing.
    """
    t0 = time.monotonic()
    fs, root, where = _open_mirror(src_url, storage_options)
    files = _mirror_files(fs, root, where, allow_patterns, ignore_patterns)

    def one(rf: RemoteFile) -> FileRecord:
        h = hashlib.sha256()
        with fs.open(f"{root}/{rf.path}", "rb") as src:
            while chunk := src.read(CHUNK):
                h.update(chunk)
        return FileRecord(rf.path, rf.size, h.hexdigest(), None, False, 0)

    with ThreadPoolExecutor(max_workers, thread_name_prefix="digest") as pool:
        records = list(pool.map(one, files))
    return DownloadResult(where, None, None, None, records, time.monotonic() - t0)
