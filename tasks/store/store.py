"""The versioned artifact store (see docs/architecture.md, "The artifact contract").

Layout under the store root:
    {kind}/{name}/{version}/...files...      immutable once MANIFEST.json exists
    {kind}/{name}/{version}/MANIFEST.json    written last: the commit point
    {kind}/{name}/refs/{ref}                 mutable pointers ('latest', tags)
"""
from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
from collections.abc import Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime, timezone
from pathlib import Path, PurePosixPath
from typing import Any

from gptoss_model.errors import PermanentError
from gptoss_model.settings import DEFAULT_STORE, settings

from .backends import backend_for_url
from .base import PreconditionFailed, hash_file
from .claims import CLAIM_FILE, LOCK_DIR, claim_for
from .fingerprint import public_params
from .manifest import MANIFEST_FILE, CorruptStoreObject, FileEntry, InputRef, Manifest, Producer
from .names import (VERSION_RE, InvalidNameError, parse_artifact_spec, validate_kind, validate_name,
                    validate_ref, validate_relpath, validate_version)
from .progress import ProgressSink
from .local_verify import LocalIntegrityError, stamp_committed, verify_in_place

log = logging.getLogger(__name__)
QUARANTINE_DIR = ".quarantine"  # unreadable manifests and refs moved aside by `gptoss artifacts fsck`
SPECIAL_DIRS = (LOCK_DIR + "/", QUARANTINE_DIR + "/")


class ArtifactNotFound(PermanentError, LookupError):
    pass


class ConcurrentWriterError(RuntimeError):
    """Another writer holds the claim on the version being committed."""


class IntegrityError(RuntimeError):
    """A pulled file does not match its manifest (size or sha256)."""


class DestinationConflict(PermanentError, FileExistsError):
    """A pull would replace files that are already in the destination."""


class CorruptArtifactError(PermanentError, IntegrityError):
    """A committed version in the store itself no longer matches its manifest (a retry reads the same bytes)."""


class ArtifactStore:
    def __init__(self, url: str | None = None, *, s3_endpoint_url: str | None = None,
                 s3_credentials: dict | None = None, storage_options: dict | None = None,
                 max_workers: int = 4):
        self.backend = backend_for_url(url or settings().store_url,
                                       s3_endpoint_url=s3_endpoint_url, s3_credentials=s3_credentials,
                                       storage_options=storage_options)
        self.url = self.backend.url
        self.max_workers = max_workers

    @property
    def is_local(self) -> bool:
        """A file:// store (commits hard-link staging files; reads happen in place)."""
        return self.backend.local_root is not None

    def __repr__(self) -> str:
        return f"ArtifactStore({self.url!r})"

    # -- keys -------------------------------------------------------------
    @staticmethod
    def prefix(kind: str, name: str, version: str) -> str:
        return f"{validate_kind(kind)}/{validate_name(name)}/{validate_version(version)}"

    def uri(self, kind: str, name: str, version: str) -> str:
        return f"{self.url}/{self.prefix(kind, name, version)}"

    # -- reading ----------------------------------------------------------
    def get_manifest(self, kind: str, name: str, version: str) -> Manifest | None:
        key = f"{self.prefix(kind, name, version)}/{MANIFEST_FILE}"
        data = self.backend.get_bytes(key)
        if data is None:
            return None
        manifest = Manifest.from_json(data, where=f"{self.url}/{key}")
        if (manifest.kind, manifest.name, manifest.version) != (kind, name, version):
            raise CorruptStoreObject(f"corrupt manifest {self.url}/{key}: it describes {manifest.spec}")
        return manifest

    def resolve(self, kind: str, name: str, selector: str | None = None) -> Manifest:
        """A committed version by version, ref, or (default) the 'latest' ref."""
        selector = selector or "latest"
        version = selector if VERSION_RE.match(selector) else self.get_ref(kind, name, selector)
        manifest = self.get_manifest(kind, name, version) if version else None
        if manifest is None:
            raise ArtifactNotFound(f"no committed artifact {kind}/{name}@{selector} in {self.url}")
        return manifest

    def resolve_spec(self, spec: str) -> Manifest:
        return self.resolve(*parse_artifact_spec(spec))

    def list(self, kind: str | None = None, *, problems: list[str] | None = None) -> list[Manifest]:
        """Committed versions. A manifest that cannot be read is skipped and described in
        `problems` (when given; else logged), so one corrupt manifest hides only itself."""
        prefix = f"{validate_kind(kind)}/" if kind else ""
        found = []
        for info in self.backend.list(prefix):
            if info.key.endswith("/" + MANIFEST_FILE) and not info.key.startswith(SPECIAL_DIRS):
                data = self.backend.get_bytes(info.key)
                if data is None:
                    continue
                try:
                    found.append(Manifest.from_json(data, where=f"{self.url}/{info.key}"))
                except CorruptStoreObject as exc:
                    (problems.append if problems is not None else log.warning)(str(exc))
        return sorted(found, key=lambda m: (m.kind, m.name, m.created_at))

    def lineage(self, manifest: Manifest, _path: tuple[str, ...] = ()) -> dict[str, Any]:
        """The manifest's inputs, recursively, as a tree of specs (a loop is an error naming the file)."""
        path = (*_path, manifest.spec)
        children = []
        for ref in manifest.inputs:
            spec = f"{ref.kind}/{ref.name}@{ref.version}"
            if spec in path:
                raise CorruptStoreObject(
                    f"corrupt lineage: {self.uri(manifest.kind, manifest.name, manifest.version)}/{MANIFEST_FILE} "
                    f"names {spec} as an input, which loops: {' -> '.join((*path, spec))}")
            parent = self.get_manifest(ref.kind, ref.name, ref.version)
            children.append(self.lineage(parent, path) if parent else {"spec": spec, "missing": True, "inputs": []})
        return {"spec": manifest.spec, "stage": manifest.producer.stage, "inputs": children}

    # -- refs -------------------------------------------------------------
    def get_ref(self, kind: str, name: str, ref: str) -> str | None:
        key = f"{validate_kind(kind)}/{validate_name(name)}/refs/{validate_ref(ref)}"
        data = self.backend.get_bytes(key)
        if data is None:
            return None
        try:
            return validate_version(json.loads(data)["version"])
        except (ValueError, KeyError, TypeError) as exc:
            problem = " ".join(str(exc).split()) or type(exc).__name__
            raise CorruptStoreObject(f"corrupt ref {self.url}/{key}: expected JSON with a 'version' "
                                     f"(20 hex digits): {problem}") from None

    def set_ref(self, kind: str, name: str, ref: str, version: str) -> None:
        """Point `ref` at a committed version; no write when it already points there
        (so reading a committed artifact needs no write access to the store)."""
        try:
            if self.get_ref(kind, name, ref) == version:
                return
        except CorruptStoreObject as exc:
            log.warning("%s; replacing it", exc)
        if self.get_manifest(kind, name, version) is None:
            raise ArtifactNotFound(f"cannot point {kind}/{name}@{ref} at uncommitted version {version}")
        body = {"version": version, "updated_at": datetime.now(timezone.utc).isoformat()}
        self.backend.put_bytes(f"{kind}/{name}/refs/{validate_ref(ref)}", json.dumps(body).encode())

    # -- writing ----------------------------------------------------------
    def claim(self, kind: str, name: str, version: str, *, ttl: float = 300.0):
        return claim_for(self.backend, self.prefix(kind, name, version), ttl=ttl)

    def clear_incomplete(self, kind: str, name: str, version: str) -> int:
        """Remove a previous, uncommitted attempt's files (the caller holds the claim)."""
        prefix = self.prefix(kind, name, version)
        keys = [o.key for o in self.backend.list(prefix + "/") if not o.key.endswith("/" + CLAIM_FILE)]
        if any(k.endswith("/" + MANIFEST_FILE) for k in keys):
            raise RuntimeError(f"refusing to clear committed version {self.url}/{prefix}")
        self.backend.delete(keys)
        return len(keys)

    def upload_dir(self, src: Path, prefix: str, progress: ProgressSink | None = None,
                   uploaded: Sequence[FileEntry] = ()) -> list[FileEntry]:
        """Upload every file under `src` to `prefix/` (the caller holds the version's claim).

        Resumes an interrupted attempt: an object already there whose recorded sha256
        equals its staging file's is kept, not sent again. `uploaded` lists files that
        workers already put under the prefix themselves (their sizes are checked here).
        Objects under the prefix that are in neither (an older attempt's, a build's
        scratch) are deleted, so the version holds exactly what its manifest lists."""
        src = Path(src)
        files = sorted(p for p in src.rglob("*") if p.is_file())
        rels = [validate_relpath(p.relative_to(src).as_posix()) for p in files]
        sizes = [p.stat().st_size for p in files]
        progress = progress or ProgressSink()
        progress.start(sum(sizes), f"upload {prefix}")
        present = {o.key: o.size for o in self.backend.list(prefix + "/") if not o.key.endswith("/" + CLAIM_FILE)}
        if f"{prefix}/{MANIFEST_FILE}" in present:
            raise RuntimeError(f"refusing to overwrite committed version {self.url}/{prefix}")
        self._check_uploaded(prefix, uploaded, present, set(rels))
        kept = []

        def one(i: int) -> FileEntry:
            key = f"{prefix}/{rels[i]}"
            if present.get(key) == sizes[i]:
                remote = self.backend.recorded_sha256(key, sizes[i])
                if remote is not None and remote == hash_file(files[i]):
                    kept.append(rels[i])
                    progress.advance(sizes[i])
                    return FileEntry(path=rels[i], size=sizes[i], sha256=remote)
            digest = self.backend.upload_file(files[i], key, progress.advance)
            return FileEntry(path=rels[i], size=sizes[i], sha256=digest)

        with ThreadPoolExecutor(self.max_workers, thread_name_prefix="upload") as pool:
            entries = list(pool.map(one, range(len(files))))
        progress.finish()
        if kept:
            log.info("%s/%s: kept %d of %d files an interrupted attempt had uploaded (sha256 matched)",
                     self.url, prefix, len(kept), len(files))
        entries = sorted([*entries, *uploaded], key=lambda e: PurePosixPath(e.path).parts)
        wanted = {f"{prefix}/{e.path}" for e in entries}
        self.backend.delete(sorted(k for k in present if k not in wanted))
        return entries

    def _check_uploaded(self, prefix: str, uploaded: Sequence[FileEntry], present: dict[str, int],
                        staged: set[str]) -> None:
        for entry in uploaded:
            where = f"{self.url}/{prefix}/{validate_relpath(entry.path)}"
            if entry.path in staged:
                raise ValueError(f"{where}: both in the staging dir and among the files workers uploaded")
            found = present.get(f"{prefix}/{entry.path}")
            if found != entry.size:
                raise IntegrityError(f"{where}: a worker reported uploading {entry.size} bytes; the store holds "
                                     + ("nothing" if found is None else f"{found} bytes"))

    def commit(self, src: Path, *, kind: str, name: str, version: str, producer: Producer,
               parameters: Any = None, inputs: Iterable[InputRef | Manifest] = (),
               metrics: dict | None = None, progress: ProgressSink | None = None,
               claim=None, uploaded: Sequence[FileEntry] = ()) -> tuple[Manifest, bool]:
        """Upload `src` (plus files already `uploaded` under the version, see upload_dir)
        as kind/name@version and write its manifest last.

        Returns (manifest, won). won is False when another writer committed
        the version first; its manifest is returned and ours is dropped.
        """
        prefix = self.prefix(kind, name, version)
        own_claim = None
        if claim is None:
            # Without a claim a concurrent writer could overwrite our files
            # after we commit; refuse rather than risk a corrupt version.
            own_claim = claim = self.claim(kind, name, version)
            if not claim.try_acquire():
                raise ConcurrentWriterError(
                    f"{kind}/{name}@{version} is being written by {claim.holder()}")
        try:
            return self._commit(src, prefix, kind=kind, name=name, version=version, producer=producer,
                                parameters=parameters, inputs=inputs, metrics=metrics,
                                progress=progress, claim=claim, uploaded=uploaded)
        finally:
            if own_claim is not None:
                own_claim.release()

    def _commit(self, src, prefix, *, kind, name, version, producer, parameters, inputs, metrics,
                progress, claim, uploaded) -> tuple[Manifest, bool]:
        entries = self.upload_dir(src, prefix, progress, uploaded)
        manifest = Manifest(kind=kind, name=name, version=version, producer=producer,
                            parameters=public_params(parameters or {}),
                            inputs=[i.ref if isinstance(i, Manifest) else i for i in inputs],
                            files=entries, metrics=metrics or {})
        claim.ensure_held()
        try:
            self.backend.put_bytes(f"{prefix}/{MANIFEST_FILE}", manifest.to_json(), if_absent=True)
        except PreconditionFailed:
            winner = self.get_manifest(kind, name, version)
            log.info("version %s/%s@%s was committed by another writer; reusing it", kind, name, version)
            return winner, False
        if self.is_local:  # every byte was just hashed on its way in
            stamp_committed(self.backend.local_root / prefix, manifest, settings().cache_dir / "verified")
        return manifest, True

    # -- pulling ----------------------------------------------------------
    def download(self, manifest: Manifest, dest: Path, progress: ProgressSink | None = None) -> Path:
        """Pull every file of a committed version into `dest`, verifying size and sha256."""
        dest = Path(dest)
        prefix = self.prefix(manifest.kind, manifest.name, manifest.version)
        progress = progress or ProgressSink()
        progress.start(manifest.total_bytes, f"download {manifest.spec}")

        def one(entry: FileEntry) -> None:
            target = dest / validate_relpath(entry.path)
            target.parent.mkdir(parents=True, exist_ok=True)
            digest = self.backend.download_file(f"{prefix}/{entry.path}", target, entry.size, progress.advance)
            size = target.stat().st_size
            if size != entry.size or digest != entry.sha256:
                target.unlink(missing_ok=True)
                raise IntegrityError(
                    f"{manifest.spec}: file {entry.path!r} does not match its manifest: sha256 {digest} "
                    f"(manifest: {entry.sha256}), {size} bytes (manifest: {entry.size})")

        try:
            with ThreadPoolExecutor(self.max_workers, thread_name_prefix="download") as pool:
                list(pool.map(one, manifest.files))
        finally:
            progress.finish()
        return dest

    def pull(self, manifest: Manifest, dest: Path, *, overwrite: bool = False,
             progress: ProgressSink | None = None) -> Path:
        """Pull a version into `dest`: all of it verified, or nothing new in `dest`.

        Files are downloaded and verified in a temp dir beside `dest` (same
        filesystem) and only then renamed into place. Files already in `dest` at the
        artifact's paths are a conflict unless `overwrite`; other files are left alone.
        """
        dest = Path(dest).absolute()
        rels = [validate_relpath(f.path) for f in manifest.files]
        if dest.exists() and not dest.is_dir():
            raise DestinationConflict(f"cannot pull {manifest.spec} into {dest}: it is not a directory")
        blocked = [r for r in rels if _blocks(dest, r)]
        if blocked:
            raise DestinationConflict(
                f"cannot pull {manifest.spec} into {dest}: {blocked[0]!r} needs a directory where a file is "
                f"(or a file where a directory is); {len(blocked)} such path(s)")
        existing = [r for r in rels if (dest / r).exists() or (dest / r).is_symlink()]
        if existing and not overwrite:
            raise DestinationConflict(
                f"cannot pull {manifest.spec} into {dest}: {len(existing)} of its files already exist there "
                f"({', '.join(existing[:3])}{', ...' if len(existing) > 3 else ''}); pass --overwrite to replace them")
        dest.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{dest.name}.pull-", dir=dest.parent))
        try:
            self.download(manifest, tmp, progress)
            if not dest.exists():
                os.replace(tmp, dest)
                return dest
            for rel in rels:
                target = dest / rel
                target.parent.mkdir(parents=True, exist_ok=True)
                os.replace(tmp / rel, target)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        return dest

    def local_path(self, manifest: Manifest, cache_dir: Path | None = None,
                   progress: ProgressSink | None = None) -> Path:
        """A local directory holding the version, verified.

        On a local store that is the version directory itself, every file checked
        against the manifest's sha256 (hashed once, then trusted while its inode is
        untouched: see local_verify); elsewhere a download into a cache that is
        reused once complete.
        """
        if self.is_local:
            root = self.backend.local_root / self.prefix(manifest.kind, manifest.name, manifest.version)
            try:
                hashed = verify_in_place(root, manifest, settings().cache_dir / "verified", self.max_workers)
            except LocalIntegrityError as exc:
                raise CorruptArtifactError(str(exc)) from None
            if hashed:
                log.info("%s: verified %d bytes in place against the manifest", manifest.spec, hashed)
            return root
        cache_dir = Path(cache_dir or settings().cache_dir)
        dest = cache_dir / manifest.kind / manifest.name / manifest.version
        marker = dest / ".complete"
        if marker.is_file() and marker.read_text() == manifest.version:
            return dest
        self.download(manifest, dest, progress)
        marker.write_text(manifest.version)
        return dest


__all__ = ["ArtifactStore", "ArtifactNotFound", "ConcurrentWriterError", "DestinationConflict", "IntegrityError", "InvalidNameError", "DEFAULT_STORE"]


def _blocks(dest: Path, rel: str) -> bool:
    """True where pulling `rel` into `dest` needs to replace a directory by a file or the reverse."""
    target = dest / rel
    if target.is_dir() and not target.is_symlink():
        return True
    return any((dest / parent).exists() and not (dest / parent).is_dir()
               for parent in map(str, Path(rel).parents) if parent != ".")
