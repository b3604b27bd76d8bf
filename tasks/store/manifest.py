"""MANIFEST.json: the commit record of one artifact version."""
from __future__ import annotations

import functools
import subprocess
from datetime import datetime, timezone
from importlib import metadata
from pathlib import Path
from typing import Any

from pydantic import BaseModel, Field

from gptoss_model.errors import PermanentError

SCHEMA_VERSION = 1
MANIFEST_FILE = "MANIFEST.json"


class CorruptStoreObject(PermanentError, ValueError):
    """A manifest or ref in the store that cannot be read (the message names its URL)."""


class FileEntry(BaseModel):
    path: str
    size: int
    sha256: str


class InputRef(BaseModel):
    kind: str
    name: str
    version: str


class Producer(BaseModel):
    stage: str
    code_version: str
    package_version: str | None = None
    git_sha: str | None = None


class Manifest(BaseModel):
    schema_version: int = SCHEMA_VERSION
    kind: str
    name: str
    version: str
    producer: Producer
    parameters: dict[str, Any] = Field(default_factory=dict)
    inputs: list[InputRef] = Field(default_factory=list)
    files: list[FileEntry] = Field(default_factory=list)
    metrics: dict[str, Any] = Field(default_factory=dict)
    created_at: str = Field(default_factory=lambda: datetime.now(timezone.utc).isoformat())

    @property
    def ref(self) -> InputRef:
        return InputRef(kind=self.kind, name=self.name, version=self.version)

    @property
    def spec(self) -> str:
        return f"{self.kind}/{self.name}@{self.version}"

    @property
    def total_bytes(self) -> int:
        return sum(f.size for f in self.files)

    def to_json(self) -> bytes:
        return self.model_dump_json(indent=2).encode()

    @classmethod
    def from_json(cls, data: bytes, *, where: str) -> "Manifest":
        try:
            return cls.model_validate_json(data)
        except ValueError as exc:
            problem = " ".join(str(exc).split())
            raise CorruptStoreObject(f"corrupt manifest {where}: {problem}") from None


@functools.cache
def package_version() -> str | None:
    try:
        return metadata.version("gptoss-pipeline")
    except metadata.PackageNotFoundError:
        return None


@functools.cache
def git_sha() -> str | None:
    """The checkout's commit, when the package runs from one (never fatal)."""
    root = Path(__file__).resolve().parents[2]
    try:
        out = subprocess.run(
            ["git", "-C", str(root), "rev-parse", "HEAD"],
            capture_output=True, text=True, timeout=5, check=True,
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() or None
