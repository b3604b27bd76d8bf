"""Download stage: a Hugging Face repo (or a mirror in HF layout) -> `hf-checkpoint`.

flows/download.py -> here -> gptoss_model/hub/download.py

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

import hashlib
import logging
import os
import shutil
from pathlib import Path

from pydantic import Field, model_validator

from gptoss_model.hub.download import HubResponseError, download_snapshot, hub_endpoint, resolve_revision
from gptoss_model.checkpoint.hf_validate import require_checkpoint_files
from gptoss_model.system.paths import is_within
from gptoss_model.hub.transfer import DownloadResult, copy_local_snapshot, digest_local_snapshot
from tasks.common import (PlainUrl, SecretBlockError, StageParams, StageProgress, StoreSettings,
                          default_workdir, load_secret_block)
from tasks.kinds import Kind
from tasks.stage import Stage, StageRun, Version
from tasks.store.names import ARTIFACT_NAME_PATTERN

# JSON-schema patterns: the Prefect server refuses a run whose parameters miss them, naming the field.
HF_REPO_ID_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._-]{0,95}(/[A-Za-z0-9][A-Za-z0-9._-]{0,95})?$"
HF_REVISION_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._/-]{0,254}$"

log = logging.getLogger(__name__)


class DownloadParams(StageParams):
    """Download a Hugging Face checkpoint (or a mirror of one) into the store as an hf-checkpoint.

    Holds no secret: a token is never a parameter (Prefect keeps parameters
    in clear in its database, the run's Parameters tab and `flow-run inspect`); `hf_token_block`
    names a Prefect Secret block, or the worker's environment has HF_TOKEN. Unknown keys (a
    `hf_token` among them) are refused, by the Prefect server when the run is created."""

    repo_id: str = Field("openai/gpt-oss-20b", pattern=HF_REPO_ID_PATTERN,
                         description="Hugging Face model repo id (owner/name)")
    revision: str = Field("main", pattern=HF_REVISION_PATTERN,
                          description="branch, tag or commit sha; resolved to a sha first")
    source_url: PlainUrl | None = Field(None, description="fsspec URL of a mirror in HF layout to copy instead "
                                        "of the Hub (air-gapped sites, the demo); no user:password@ in it (it "
                                        "would be stored with the run's parameters): use the filesystem's own "
                                        "credentials")
    name: str | None = Field(None, pattern=ARTIFACT_NAME_PATTERN, description="artifact name; default: repo_id")
    allow_patterns: list[str] | None = Field(None, description="only files matching one of these")
    ignore_patterns: list[str] | None = Field(None, description="skip files matching one of these")
    hf_token_block: str | None = Field(None, description="Prefect Secret block holding the HF token; "
                                       "default: HF_TOKEN / the saved login")
    endpoint: PlainUrl | None = Field(None, description="Hub endpoint; default: HF_ENDPOINT or huggingface.co")
    max_workers: int = Field(4, ge=1, le=32, description="files downloaded in parallel")
    workdir: str | None = Field(None, description="where partial downloads persist between attempts; "
                                "default: GPTOSS_WORKDIR or the temp dir")
    keep_download: bool = Field(False, description="keep the work copy after the commit")
    store: StoreSettings = Field(default_factory=StoreSettings)

    @model_validator(mode="before")
    @classmethod
    def _no_token_values(cls, data):
        if isinstance(data, dict) and "hf_token" in data:
            raise ValueError("hf_token: a token is never a parameter (Prefect stores parameters in clear): save it "
                             "as a Prefect Secret block and pass its name as hf_token_block, or set HF_TOKEN in "
                             "the worker's environment")
        return data


def _token(params: DownloadParams) -> str | None:
    if params.hf_token_block:
        value = load_secret_block(params.hf_token_block, "Hugging Face token")
        if not isinstance(value, str) or not value:
            raise SecretBlockError(f"Prefect Secret block {params.hf_token_block!r} must hold the HF token as a string")
        return value
    return None  # huggingface_hub then uses HF_TOKEN or the saved login


def _link_tree(result: DownloadResult, src: Path, dest: Path, *, move: bool) -> None:
    """Exactly the downloaded files (not leftovers of other patterns) into dest.

    `move`: renamed rather than linked, so the staging file has no second link and a
    file:// store hard-links it instead of copying (the bytes are written once).
    """
    for rec in result.files:
        target = dest / rec.path
        target.parent.mkdir(parents=True, exist_ok=True)
        try:
            (os.replace if move else os.link)(src / rec.path, target)
        except OSError:  # another filesystem, or no hard links there
            shutil.copyfile(src / rec.path, target)


def _metrics(result: DownloadResult) -> dict:
    return {"source": result.source, "revision": result.revision, "commit": result.commit,
            "files": len(result.files), "bytes": result.bytes_total, "bytes_fetched": result.bytes_fetched,
            "download_seconds": round(result.seconds, 3), "content_sha256": result.content_digest()}


def plan_download(run: StageRun[DownloadParams]) -> Version:
    params, store = run.params, run.store
    token = _token(params)
    base = default_workdir(params.workdir) / "hf-downloads"
    patterns = {"allow_patterns": params.allow_patterns, "ignore_patterns": params.ignore_patterns}
    progress = StageProgress(f"download {params.source_url or params.repo_id}")

    if params.source_url:
        # A mirror has no commit sha: its content digest is the identity, read in place, so
        # a version already committed is found without copying a byte.
        listed = digest_local_snapshot(params.source_url, max_workers=params.max_workers, **patterns)
        work = base / ("local--" + hashlib.sha256(listed.source.encode()).hexdigest()[:16])
        name = params.name or Path(params.source_url.rstrip("/")).name
        identity = {"source": listed.source, "content_sha256": listed.content_digest()}

        def fetch() -> DownloadResult:
            copied = copy_local_snapshot(params.source_url, work, max_workers=params.max_workers,
                                         progress=progress, **patterns)
            if copied.content_digest() != identity["content_sha256"]:
                raise MirrorChangedError(f"{listed.source} changed while it was being copied; run again")
            return copied
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

    if not is_within(base, work):  # names from a remote never reach outside the work dir
        raise HubResponseError(f"refusing work directory {work}: outside {base}")

    def build(staging: Path) -> dict:
        result = fetch()
        require_checkpoint_files([f.path for f in result.files], result.source)
        progress.finish()
        result.revision = params.revision if not params.source_url else None
        # On a file:// store the commit is a local link, so giving up the work copy first costs
        # nothing; before a long S3 upload it is kept, so a failed upload does not re-download.
        _link_tree(result, work, staging, move=store.is_local and not params.keep_download)
        return _metrics(result)

    def clean_up(_) -> None:
        if not params.keep_download:
            shutil.rmtree(work, ignore_errors=True)

    return Version(name=name, identity={**identity, **patterns}, build=build, after=clean_up)


class MirrorChangedError(RuntimeError):
    """The mirror's files changed between identifying and copying them (transient: retried)."""


DOWNLOAD = Stage(name="download", output=Kind.HF_CHECKPOINT, params=DownloadParams, code_version="1",
                 plan=plan_download, task_name="download-hf-checkpoint", retries=3, retry_delay_seconds=(10, 60, 300),
                 describe=lambda p: f"download {p.source_url or f'{p.repo_id}@{p.revision}'}",
                 cli_args=("repo_id", "revision"))
run_download = DOWNLOAD.run
download_checkpoint = DOWNLOAD.task
