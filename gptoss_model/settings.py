"""Every environment variable the project reads, in one place (the README's configuration table).

Read at call time, not import time: a worker process, a test or the demo may
set them after the package was imported (huggingface_hub and Prefect read
theirs at import, which is why this module reads HF_ENDPOINT or PREFECT_API_URL
again). Setting a variable for a child process or a library is not reading it
and happens where the child is started; tests/test_settings.py holds the rule.

Kept free of torch and Prefect: every process imports it, Prefect workers included.
"""
from __future__ import annotations

import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping

DEFAULT_STORE = "file://.gptoss/store"
DEFAULT_PREFECT_STARTUP_TIMEOUT = 120.0  # seconds; Prefect's own 20 s fails the demo on a loaded machine
_TRUE = ("1", "ON", "YES", "TRUE")  # huggingface_hub's spelling of a true flag


@dataclass(frozen=True)
class Settings:
    # the artifact store
    store_url: str               # GPTOSS_STORE: root of the artifact store (file://... or s3://bucket/prefix)
    s3_endpoint_url: str | None  # GPTOSS_S3_ENDPOINT_URL: an S3-compatible endpoint; None for AWS
    workdir: Path                # GPTOSS_WORKDIR: staging and partial downloads that outlive an attempt
    cache_dir: Path              # GPTOSS_CACHE: verified local copies of artifacts pulled from a remote store
    aws_region: str              # AWS_DEFAULT_REGION (boto3's own variable; default us-east-1)
    # the Hub (huggingface_hub's variables, which it reads once at its import)
    hf_endpoint: str | None      # HF_ENDPOINT; None: huggingface_hub's default
    hf_home: Path | None         # HF_HOME; None: huggingface_hub's default
    hf_hub_offline: bool         # HF_HUB_OFFLINE
    # Prefect (its variables; Prefect reads them itself too)
    prefect_home: Path | None    # PREFECT_HOME; None: Prefect's default
    prefect_api_url: str | None  # PREFECT_API_URL: a server of the user's; None: the demo starts its own
    prefect_startup_timeout: float  # PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS, for the demo's server
    # torchrun's description of this rank; None outside torchrun
    rank: int | None             # RANK
    world_size: int | None       # WORLD_SIZE
    local_rank: int              # LOCAL_RANK (0 outside torchrun)
    group_rank: int              # GROUP_RANK: this rank's node (torchrun agent), 0 outside torchrun
    torchelastic_run_id: str | None  # TORCHELASTIC_RUN_ID: set for every rank torchrun starts
    omp_num_threads: int | None  # OMP_NUM_THREADS (OpenMP's; the benchmarks size torch's threads by it)
    # the Kubernetes launcher (the kubernetes client reads it once at its import)
    kubeconfig: str | None       # KUBECONFIG: kubeconfig file(s), `:`-separated; None: ~/.kube/config

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> "Settings":
        env = os.environ if environ is None else environ

        def get(name: str) -> str | None:
            return env.get(name) or None  # empty counts as unset, as a shell's `export X=` means

        def number(name: str, kind: type):
            raw = get(name)
            try:
                return None if raw is None else kind(raw)
            except ValueError:
                raise ValueError(f"environment variable {name}={raw!r}: expected "
                                 f"{'an integer' if kind is int else 'a number'}") from None

        timeout = number("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", float)
        return cls(
            store_url=get("GPTOSS_STORE") or DEFAULT_STORE,
            s3_endpoint_url=get("GPTOSS_S3_ENDPOINT_URL"),
            workdir=Path(get("GPTOSS_WORKDIR") or tempfile.gettempdir()),
            cache_dir=Path(get("GPTOSS_CACHE") or Path.home() / ".cache" / "gptoss"),
            aws_region=get("AWS_DEFAULT_REGION") or "us-east-1",
            hf_endpoint=get("HF_ENDPOINT"),
            hf_home=Path(get("HF_HOME")) if get("HF_HOME") else None,
            hf_hub_offline=(get("HF_HUB_OFFLINE") or "").strip().upper() in _TRUE,
            prefect_home=Path(get("PREFECT_HOME")) if get("PREFECT_HOME") else None,
            prefect_api_url=get("PREFECT_API_URL"),
            prefect_startup_timeout=DEFAULT_PREFECT_STARTUP_TIMEOUT if timeout is None else timeout,
            rank=number("RANK", int),
            world_size=number("WORLD_SIZE", int),
            local_rank=number("LOCAL_RANK", int) or 0,
            group_rank=number("GROUP_RANK", int) or 0,
            torchelastic_run_id=get("TORCHELASTIC_RUN_ID"),
            omp_num_threads=number("OMP_NUM_THREADS", int),
            kubeconfig=get("KUBECONFIG"),
        )


def settings() -> Settings:
    return Settings.from_env()
