"""Flow: download a Hugging Face checkpoint into the store as `hf-checkpoint`.

flows/download.py -> tasks/download.py -> gptoss_model/hub/download.py

Deployable on a CPU work pool on its own, or called by the pipeline flow.
Run locally:  python -m flows.download openai/gpt-oss-20b [revision]
"""
from __future__ import annotations

import sys

from prefect import flow

from tasks.download import DownloadParams, download_checkpoint


@flow(name="download")
def download_flow(params: DownloadParams | None = None):
    """Resolve the revision to a commit, download and verify every file, and
    commit them as an hf-checkpoint artifact (skipped when already committed)."""
    # Defaults are built per run, not at import: the store URL comes from the environment.
    return download_checkpoint(params or DownloadParams())


if __name__ == "__main__":
    args = sys.argv[1:]
    if not args:
        sys.exit("usage: python -m flows.download REPO_ID [REVISION]")
    manifest = download_flow(DownloadParams(repo_id=args[0], revision=args[1] if len(args) > 1 else "main"))
    print(manifest.spec)
