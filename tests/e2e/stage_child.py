"""download -> convert for one Hub repo, as its own process (the crash test kill -9s it).

    python tests/e2e/stage_child.py ENDPOINT REPO STORE_URL WORKDIR WORKERS OUT_JSON

Writes {"download": manifest, "convert": manifest} (JSON) to OUT_JSON when both are committed.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))


def run(endpoint: str, repo: str, store_url: str, workdir: str, workers: int) -> dict:
    from tasks.common import StoreSettings
    from tasks.convert import ConvertParams, run_convert
    from tasks.download import DownloadParams, run_download

    store = StoreSettings(url=store_url)
    hf = run_download(DownloadParams(repo_id=repo, endpoint=endpoint, workdir=workdir, store=store))
    meg = run_convert(ConvertParams(source=hf.spec, workers=workers, workdir=workdir, parity=False, store=store))
    return {"download": hf.manifest.model_dump(mode="json"), "convert": meg.manifest.model_dump(mode="json")}


if __name__ == "__main__":
    endpoint, repo, store_url, workdir, workers, out = sys.argv[1:]
    result = run(endpoint, repo, store_url, workdir, int(workers))
    Path(out).write_text(json.dumps(result))
