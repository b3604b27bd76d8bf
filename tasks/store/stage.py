"""The stage helper every pipeline stage runs through.

version from inputs and parameters -> committed? return it (no work) ->
else claim the version, build into a local staging dir, upload, commit.
"""
from __future__ import annotations

import logging
import os
import shutil
import tempfile
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from gptoss_model.settings import settings

from .claims import hold_work_dir, work_dir_lock
from .fingerprint import fingerprint
from .manifest import FileEntry, InputRef, Manifest, Producer, git_sha, package_version
from .progress import ProgressSink
from .store import ArtifactStore

log = logging.getLogger(__name__)


class StageTimeout(TimeoutError):
    pass


@dataclass(frozen=True)
class StageResult:
    manifest: Manifest
    cache_hit: bool

    @property
    def spec(self) -> str:
        return self.manifest.spec


def run_stage(store: ArtifactStore, *, stage: str, code_version: str, kind: str, name: str,
              params: Any, build: Callable[..., Any],
              inputs: Iterable[Manifest | InputRef] = (), workdir: str | Path | None = None,
              progress: ProgressSink | None = None, wait_timeout: float | None = None,
              poll_interval: float = 1.0, refs: Iterable[str] = ("latest",),
              resumable: bool = False, writes_to_store: bool = False) -> StageResult:
    """Run `build(staging_dir) -> metrics` once per distinct (stage, code, params, inputs).

    Concurrent callers with the same inputs end with one committed version:
    one builds, the others wait for its manifest and return it as a cache hit.

    With `resumable`, the staging dir is `{workdir}/{stage}-{version}` and survives a
    failed or killed attempt: the next attempt (which holds the claim, so it is alone)
    gets the same dir with whatever `build` left there, and `build` decides what to keep.
    It is removed once the version is committed.

    With `writes_to_store`, the build (or the workers it spreads over) also puts files
    straight under the version's prefix in the store: it is called as
    `build(staging_dir, version_prefix) -> (metrics, uploaded FileEntry list)`, and the
    commit adopts those files beside what the staging dir holds.
    """
    input_refs = [i.ref if isinstance(i, Manifest) else i for i in inputs]
    version = fingerprint(stage, code_version, params, [r.model_dump() for r in input_refs])
    spec = f"{kind}/{name}@{version}"
    deadline = None if wait_timeout is None else time.monotonic() + wait_timeout
    waiting_logged = False
    while True:
        manifest = store.get_manifest(kind, name, version)
        if manifest is not None:
            log.info("stage %s: %s already committed, reusing it", stage, spec)
            _set_refs(store, manifest, refs, cache_hit=True)
            return StageResult(manifest, cache_hit=True)
        claim = store.claim(kind, name, version)
        if claim.try_acquire():
            break
        if not waiting_logged:
            log.info("stage %s: %s is being produced by %s; waiting for its commit", stage, spec, claim.holder())
            waiting_logged = True
        if deadline is not None and time.monotonic() > deadline:
            raise StageTimeout(f"stage {stage}: gave up waiting for {spec} held by {claim.holder()}")
        time.sleep(poll_interval)

    try:
        manifest = store.get_manifest(kind, name, version)
        if manifest is not None:  # committed between our check and our claim
            _set_refs(store, manifest, refs)
            return StageResult(manifest, cache_hit=True)
        # Files an interrupted attempt uploaded stay: the commit keeps those whose recorded
        # sha256 matches the new staging files and deletes the rest.
        base = Path(workdir or settings().workdir)
        base.mkdir(parents=True, exist_ok=True)
        # The staging dir's lock (held until we are done with it) tells `gc` it is live.
        if resumable:
            staging = base / f"{stage}-{version}"
            held = hold_work_dir(staging)
            staging.mkdir(exist_ok=True)
        else:
            staging = Path(tempfile.mkdtemp(prefix=f"{stage}-{version}-", dir=base))
            held = hold_work_dir(staging)
        committed = False
        try:
            started = time.time()
            uploaded: list[FileEntry] = []
            if writes_to_store:
                metrics, uploaded = build(staging, store.prefix(kind, name, version))
            else:
                metrics = build(staging)
            metrics = dict(metrics or {})
            metrics.setdefault("build_seconds", round(time.time() - started, 3))
            producer = Producer(stage=stage, code_version=code_version,
                                package_version=package_version(), git_sha=git_sha())
            manifest, won = store.commit(staging, kind=kind, name=name, version=version, producer=producer,
                                         parameters=params, inputs=input_refs, metrics=metrics,
                                         progress=progress, claim=claim, uploaded=uploaded)
            committed = True
        finally:
            if committed or not resumable:
                shutil.rmtree(staging, ignore_errors=True)
                work_dir_lock(staging).unlink(missing_ok=True)
            os.close(held)
    finally:
        claim.release()
    log.info("stage %s: committed %s (%d files, %d bytes)", stage, spec, len(manifest.files),
             manifest.total_bytes)
    _set_refs(store, manifest, refs)
    return StageResult(manifest, cache_hit=not won)


def _set_refs(store: ArtifactStore, manifest: Manifest, refs: Iterable[str], *, cache_hit: bool = False) -> None:
    for ref in refs:
        try:
            store.set_ref(manifest.kind, manifest.name, ref, manifest.version)
        except Exception as exc:
            # A cache hit only reads: a store we may not write to still serves it.
            if not cache_hit or not _is_write_denied(exc):
                raise
            log.warning("stage: could not point %s@%s at %s (%s: no write access to %s); using it anyway",
                        f"{manifest.kind}/{manifest.name}", ref, manifest.version, type(exc).__name__, store.url)


def _is_write_denied(exc: BaseException) -> bool:
    if isinstance(exc, PermissionError):
        return True
    code = str(getattr(exc, "response", {}).get("Error", {}).get("Code", ""))
    return code in ("AccessDenied", "403", "AllAccessDisabled")
