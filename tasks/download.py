"""Download stage: a Hugging Face repo (or a mirror in HF layout) -> `hf-checkpoint`.

flows/download.py -> here -> gptoss_model/hub_download.py

The artifact version is a fingerprint of the resolved commit sha (never the
branch name, which moves) and the file patterns, so "main" today and the same
sha tomorrow are one version, and a moved branch is a new one. The token is
not part of it (it rotates) and never reaches a manifest, a log or an error.

Resume: files are fetched into a work directory that outlives the task
attempt (`{workdir}/hf-downloads/<repo>--<sha>`), not into the stage's fresh
staging dir, so a retry, or a new run after kill -9, continues where the
last one stopped. Verified files are then hard-linked (no copy, where the
filesystem allows) into the staging dir the store uploads and commits.
"""
from __future__ import annotations

import contextvars
import hashlib
import logging
import os
import shutil
import tempfile
import threading
from pathlib import Path

from prefect import task
from pydantic import BaseModel, Field, SecretStr

from gptoss_model.hub_download import HubAuthError, download_snapshot, hub_endpoint, resolve_revision
from gptoss_model.verified_transfer import (ChecksumMismatchError, DownloadResult, SourceNotFoundError,
                                            copy_local_snapshot)
from tasks.common import StoreSettings, progress_sink, run_logged_stage
from tasks.store import ArtifactStore, ProgressSink, StageResult

log = logging.getLogger(__name__)

STAGE = "download"
KIND = "hf-checkpoint"
CODE_VERSION = "1"  # bump when what lands in the artifact changes for the same inputs


class DownloadParams(BaseModel):
    """What to download. Holds no secret in the clear: `hf_token` is a SecretStr
    and `hf_token_block` only names a Prefect Secret block."""

    repo_id: str = Field("openai/gpt-oss-20b", description="Hugging Face model repo id")
    revision: str = Field("main", description="branch, tag or commit sha; resolved to a sha first")
    source_url: str | None = Field(None, description="fsspec URL of a mirror in HF layout to copy "
                                   "instead of the Hub (air-gapped sites, the demo)")
    name: str | None = Field(None, description="artifact name; default: repo_id")
    allow_patterns: list[str] | None = Field(None, description="only files matching one of these")
    ignore_patterns: list[str] | None = Field(None, description="skip files matching one of these")
    hf_token_block: str | None = Field(None, description="Prefect Secret block holding the HF token; "
                                       "default: HF_TOKEN / the saved login")
    hf_token: SecretStr | None = Field(None, description="the token itself (prefer hf_token_block)")
    endpoint: str | None = Field(None, description="Hub endpoint; default: HF_ENDPOINT or huggingface.co")
    max_workers: int = Field(4, ge=1, le=32, description="files downloaded in parallel")
    workdir: str | None = Field(None, description="where partial downloads persist between attempts; "
                                "default: GPTOSS_WORKDIR or the temp dir")
    keep_download: bool = Field(False, description="keep the work copy after the commit")
    store: StoreSettings = Field(default_factory=StoreSettings)


def _token(params: DownloadParams) -> str | None:
    if params.hf_token is not None:
        return params.hf_token.get_secret_value()
    if params.hf_token_block:
        from prefect.blocks.system import Secret

        value = Secret.load(params.hf_token_block).get()
        if not isinstance(value, str) or not value:
            raise ValueError(f"Prefect Secret block {params.hf_token_block!r} must hold the HF token as a string")
        return value
    return None  # huggingface_hub then uses HF_TOKEN or the saved login


class _ToSink:
    """download_snapshot reports (done, total) from its worker threads; sinks take
    deltas. Calls run in a copy of the creating thread's context, so a Prefect
    progress artifact made from a worker still belongs to this task run."""

    def __init__(self, sink: ProgressSink, description: str):
        self.sink, self.description = sink, description
        self._lock, self._last, self._started = threading.Lock(), 0, False
        self._ctx = contextvars.copy_context()

    def __call__(self, done: int, total: int) -> None:
        if self.sink is None:
            return
        try:
            with self._lock:
                start = not self._started
                self._started = True
                delta, self._last = done - self._last, done
                if start:
                    self._ctx.copy().run(self.sink.start, total, self.description)
            self._ctx.copy().run(self.sink.advance, delta)
        except Exception as e:  # a progress bar must never fail a 65 GB download
            log.warning("progress reporting failed (%s); continuing without it", type(e).__name__)
            self.sink = None


def _link_tree(result: DownloadResult, src: Path, dest: Path) -> None:
    """Exactly the downloaded files (not leftovers of other patterns) into dest."""
    for rec in result.files:
        target = dest / rec.path
        target.parent.mkdir(parents=True, exist_ok=True)
        try:
            os.link(src / rec.path, target)
        except OSError:  # another filesystem, or no hard links there
            shutil.copyfile(src / rec.path, target)


def _metrics(result: DownloadResult) -> dict:
    return {"source": result.source, "revision": result.revision, "commit": result.commit,
            "files": len(result.files), "bytes": result.bytes_total, "bytes_fetched": result.bytes_fetched,
            "download_seconds": round(result.seconds, 3), "content_sha256": result.content_digest()}


def run_download(params: DownloadParams, store: ArtifactStore | None = None) -> StageResult:
    """The whole stage without Prefect's task machinery (tests, the CLI)."""
    store = store or params.store.open()
    token = _token(params)
    base = Path(params.workdir or os.environ.get("GPTOSS_WORKDIR") or tempfile.gettempdir()) / "hf-downloads"
    patterns = {"allow_patterns": params.allow_patterns, "ignore_patterns": params.ignore_patterns}
    progress = _ToSink(progress_sink(), f"download {params.source_url or params.repo_id}")

    if params.source_url:
        # A mirror has no commit sha: copy it first, then its content digest is the identity.
        work = base / ("local--" + hashlib.sha256(params.source_url.encode()).hexdigest()[:16])
        copied = copy_local_snapshot(params.source_url, work, max_workers=params.max_workers,
                                     progress=progress, **patterns)
        name = params.name or Path(params.source_url.rstrip("/")).name
        identity = {"source": copied.source, "content_sha256": copied.content_digest()}
        fetch = lambda: copied  # noqa: E731
    else:
        endpoint = hub_endpoint(params.endpoint)
        commit = resolve_revision(params.repo_id, params.revision, token, endpoint=endpoint)
        work = base / f"{params.repo_id.replace('/', '--')}--{commit}"
        name = params.name or params.repo_id
        # The sha is git's content address: the same on every endpoint, so not part of it.
        identity = {"repo_id": params.repo_id, "commit": commit}

        def fetch() -> DownloadResult:
            # Pinned to the sha resolved above: the branch may move meanwhile.
            return download_snapshot(params.repo_id, commit, work, token=token, endpoint=endpoint,
                                     max_workers=params.max_workers, progress=progress, **patterns)

    def build(staging: Path) -> dict:
        result = fetch()
        result.revision = params.revision if not params.source_url else None
        _link_tree(result, work, staging)
        return _metrics(result)

    stage = run_logged_stage(store, stage=STAGE, code_version=CODE_VERSION, kind=KIND, name=name,
                             params={**identity, **patterns}, build=build,
                             workdir=params.workdir or os.environ.get("GPTOSS_WORKDIR"))
    if not params.keep_download:
        shutil.rmtree(work, ignore_errors=True)
    log.info("%s: %s (%s)", STAGE, stage.spec, "cache hit" if stage.cache_hit else "committed")
    return stage


# Failures a retry cannot fix: fail the task at once instead of backing off.
_PERMANENT = (HubAuthError, SourceNotFoundError, ChecksumMismatchError, ValueError)


def _retry_worthwhile(task, task_run, state) -> bool:  # noqa: ARG001 - Prefect's signature
    return not isinstance(getattr(state, "data", None), _PERMANENT)


def _task_run_name() -> str:
    from prefect.runtime import task_run

    params = task_run.parameters["params"]
    return f"download {params.source_url or f'{params.repo_id}@{params.revision}'}"


@task(name="download-hf-checkpoint", retries=3, retry_delay_seconds=[10, 60, 300],
      retry_condition_fn=_retry_worthwhile, task_run_name=_task_run_name)
def download_checkpoint(params: DownloadParams):
    """Prefect task: the hf-checkpoint manifest (a cache hit when already committed).
    Retries resume from the bytes already on disk."""
    return run_download(params).manifest
