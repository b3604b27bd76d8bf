"""Flow: download a Hugging Face checkpoint into the store as `hf-checkpoint`.

flows/download.py -> tasks/download.py -> gptoss_model/hub/

Deployable on a CPU work pool on its own, or called by the pipeline flow.
Run locally:  python -m flows.download openai/gpt-oss-20b [REVISION] [--source-url DIR ...]
"""
# No `from __future__ import annotations`: Prefect reads the parameter type from the signature,
# also where `serve()` ships the function to another process.
from tasks.download import DOWNLOAD, DownloadParams


@DOWNLOAD.flow
def download_flow(params: DownloadParams | None = None):
    """Resolve the revision to a commit, download and verify every file, and commit them as an
    hf-checkpoint artifact (skipped when already committed)."""
    return DOWNLOAD.task(params or DownloadParams())


if __name__ == "__main__":
    from flows.stage_cli import run_flow_from_command_line

    run_flow_from_command_line(DOWNLOAD, download_flow)
