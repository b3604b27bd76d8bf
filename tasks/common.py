"""Prefect glue shared by every stage: the store from settings or blocks,
progress artifacts, and the stage helper as seen from a flow."""
from __future__ import annotations

import os
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

from pydantic import BaseModel, Field

from tasks.store import ArtifactStore, InputRef, Manifest, ProgressSink, StageResult, run_stage
from tasks.store.store import DEFAULT_STORE

_BOTO_KEYS = ("aws_access_key_id", "aws_secret_access_key", "aws_session_token")


class StoreSettings(BaseModel):
    """Where artifacts live. Holds no secret: credentials come from the named
    Prefect Secret block or from boto3's usual chain (environment, profile, role)."""

    url: str = Field(default_factory=lambda: os.environ.get("GPTOSS_STORE", DEFAULT_STORE),
                     description="fsspec URL of the store root: file://... (default) or s3://bucket/prefix")
    s3_endpoint_url: str | None = Field(default_factory=lambda: os.environ.get("GPTOSS_S3_ENDPOINT_URL"),
                                        description="S3-compatible endpoint (MinIO, Ceph, moto); None for AWS")
    credentials_block: str | None = Field(
        default=None, description="Name of a Prefect Secret block holding JSON "
        "{aws_access_key_id, aws_secret_access_key[, aws_session_token]}")

    def open(self) -> ArtifactStore:
        creds = None
        if self.credentials_block:
            from prefect.blocks.system import Secret

            value = Secret.load(self.credentials_block).get()
            if not isinstance(value, dict):
                raise ValueError(f"Prefect Secret block {self.credentials_block!r} must hold a JSON object "
                                 f"with keys {', '.join(_BOTO_KEYS[:2])}")
            creds = {k: value[k] for k in _BOTO_KEYS if value.get(k)}
        return ArtifactStore(self.url, s3_endpoint_url=self.s3_endpoint_url, s3_credentials=creds)


def in_prefect_run() -> bool:
    from prefect.context import FlowRunContext, TaskRunContext

    return FlowRunContext.get() is not None or TaskRunContext.get() is not None


class PrefectProgress(ProgressSink):
    """A Prefect progress artifact, updated at most every few seconds."""

    def __init__(self, min_interval: float = 2.0):
        super().__init__(min_interval=min_interval)
        self._artifact_id = None

    def render(self, force: bool) -> None:
        from prefect.artifacts import create_progress_artifact, update_progress_artifact

        pct = round(100.0 * self.fraction, 1)
        if self._artifact_id is None:
            self._artifact_id = create_progress_artifact(pct, description=self.description[:200])
        else:
            update_progress_artifact(self._artifact_id, pct, description=self.description[:200])


def progress_sink() -> ProgressSink:
    return PrefectProgress() if in_prefect_run() else ProgressSink()


def run_logged_stage(store: ArtifactStore, *, stage: str, code_version: str, kind: str, name: str,
                     params: Any, build: Callable[[Path], dict | None],
                     inputs: Iterable[Manifest | InputRef] = (), **kw) -> StageResult:
    """run_stage plus a markdown artifact describing what was produced or reused."""
    result = run_stage(store, stage=stage, code_version=code_version, kind=kind, name=name, params=params,
                       build=build, inputs=inputs, progress=progress_sink(), **kw)
    if in_prefect_run():
        from prefect.artifacts import create_markdown_artifact

        create_markdown_artifact(markdown=manifest_markdown(store, result), description=f"{stage} output")
    return result


def manifest_markdown(store: ArtifactStore, result: StageResult) -> str:
    m = result.manifest
    lines = [f"### {m.kind}/{m.name}", "",
             f"- version: `{m.version}` ({'cache hit, nothing recomputed' if result.cache_hit else 'new'})",
             f"- location: `{store.uri(m.kind, m.name, m.version)}`",
             f"- files: {len(m.files)}, {m.total_bytes / 1e6:.1f} MB",
             f"- inputs: {', '.join(f'`{i.kind}/{i.name}@{i.version}`' for i in m.inputs) or 'none'}"]
    if m.metrics:
        lines += ["", "| metric | value |", "|---|---|"] + [f"| {k} | {v} |" for k, v in sorted(m.metrics.items())]
    return "\n".join(lines)
