"""Every environment variable the project reads, in one place (documented in the README).

Read at call time, not import time: a worker process, a test or the demo may
set them after the package was imported.
"""
from __future__ import annotations

import os
import tempfile
from dataclasses import dataclass
from pathlib import Path

DEFAULT_STORE = "file://.gptoss/store"


@dataclass(frozen=True)
class Settings:
    store_url: str            # GPTOSS_STORE: root of the artifact store (file://... or s3://bucket/prefix)
    s3_endpoint_url: str | None  # GPTOSS_S3_ENDPOINT_URL: an S3-compatible endpoint; None for AWS
    workdir: Path             # GPTOSS_WORKDIR: staging and partial downloads that outlive an attempt
    cache_dir: Path           # GPTOSS_CACHE: verified local copies of artifacts pulled from a remote store
    aws_region: str           # AWS_DEFAULT_REGION (boto3's own variable; default us-east-1)

    @classmethod
    def from_env(cls, environ=None) -> "Settings":
        env = os.environ if environ is None else environ
        return cls(
            store_url=env.get("GPTOSS_STORE") or DEFAULT_STORE,
            s3_endpoint_url=env.get("GPTOSS_S3_ENDPOINT_URL") or None,
            workdir=Path(env.get("GPTOSS_WORKDIR") or tempfile.gettempdir()),
            cache_dir=Path(env.get("GPTOSS_CACHE") or Path.home() / ".cache" / "gptoss"),
            aws_region=env.get("AWS_DEFAULT_REGION") or "us-east-1",
        )


def settings() -> Settings:
    return Settings.from_env()
