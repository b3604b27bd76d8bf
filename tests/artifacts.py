"""Commit a local directory as an artifact, the way a stage would: the tests' stand-in for
the stages (download, convert, train) whose output a test needs but does not test."""
from __future__ import annotations

import shutil
from pathlib import Path

from tasks.store import ArtifactStore, Manifest, run_stage


def commit_directory(store: ArtifactStore, path: str | Path, *, name: str = "tiny/gpt-oss", kind: str = "hf-checkpoint",
                     stage: str = "download", params: dict | None = None, inputs=()) -> Manifest:
    """Every file under `path` as kind/name (version from `params`, default: the source path)."""
    def build(staging: Path) -> dict:
        shutil.copytree(path, staging, dirs_exist_ok=True)
        return {}

    return run_stage(store, stage=stage, code_version="test", kind=kind, name=name,
                     params={"source": str(path)} if params is None else params, build=build,
                     inputs=inputs).manifest
