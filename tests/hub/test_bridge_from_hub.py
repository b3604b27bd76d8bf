"""AutoBridge.from_hf_pretrained on a Hub repo id: the verified, resumable download, not snapshot_download."""

import hashlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from gptoss_model import AutoBridge
from gptoss_model.hub.download import HubDownloadError, snapshot_cache_dir
from gptoss_model.checkpoint.tiny import write_tiny_checkpoint
from gptoss_model.hub.transfer import PARTIAL_DIR

REPO_ROOT = Path(__file__).resolve().parents[2]
REPO = "openai/tiny-gpt-oss"
WEIGHTS = "model.safetensors"
KB = 1 << 10

_CHILD = """
import sys
from gptoss_model import AutoBridge
AutoBridge.from_hf_pretrained(sys.argv[1])
"""


@pytest.fixture
def tiny_repo(hub, tmp_path_factory):
    """A tiny checkpoint in one safetensors file (the file the test kills the download in), plus a
    repo file the bridge must not fetch."""
    src = write_tiny_checkpoint(tmp_path_factory.mktemp("tiny"), num_shards=1)
    files = {p.name: p.read_bytes() for p in src.iterdir() if p.is_file()}
    files["original/model.safetensors"] = b"consolidated weights: not for the bridge"
    commit = hub.add_repo(REPO, files)
    return files, commit


@pytest.fixture
def hub_env(hub, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_ENDPOINT", hub.endpoint)
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf-home"))
    return dict(os.environ, PYTHONPATH=str(REPO_ROOT), PYTHONWARNINGS="ignore")


def test_repo_id_resumes_after_kill9_and_fetches_only_the_rest(hub, tiny_repo, hub_env, tmp_path):
    files, commit = tiny_repo
    size = len(files[WEIGHTS])
    dest = snapshot_cache_dir() / REPO.replace("/", "--") / commit
    partial = dest / PARTIAL_DIR / WEIGHTS
    hub.throttle = 256 * KB  # bytes/s: the weights take seconds, so the child dies mid-file
    log = tmp_path / "child.log"
    child = subprocess.Popen([sys.executable, "-c", _CHILD, REPO], env=hub_env, cwd=tmp_path,
                             stdout=log.open("w"), stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 60
        while not (partial.exists() and partial.stat().st_size >= 128 * KB):
            assert child.poll() is None, f"the child ended before it could be killed:\n{log.read_text()}"
            assert time.monotonic() < deadline, "no weight bytes on disk after 60 s"
            time.sleep(0.01)
    finally:
        child.send_signal(signal.SIGKILL)
        child.wait()
    on_disk = partial.stat().st_size
    assert 128 * KB <= on_disk < size and not (dest / WEIGHTS).exists()
    assert f"download {REPO}" in log.read_text()  # the progress bar

    hub.throttle = None
    hub.reset_counters()
    bridge = AutoBridge.from_hf_pretrained(REPO)
    assert bridge.checkpoint_dir == dest
    # Only the rest of the weights went over the wire: one range request from where the kill left it.
    resumed = [(r.range, r.status) for r in hub.file_requests(WEIGHTS) if r.host == "cdn"]
    assert resumed == [(f"bytes={on_disk}-", 206)]
    assert (dest / WEIGHTS).read_bytes() == files[WEIGHTS] and not (dest / PARTIAL_DIR).exists()
    assert not (dest / "original").exists()  # HUB_ALLOW_PATTERNS: no consolidated weights
    assert bridge.config.num_layers == json.loads(files["config.json"])["num_hidden_layers"]
    done = json.loads((dest / ".complete.json").read_text())
    assert done["commit"] == commit
    assert {f["path"]: f["sha256"] for f in done["files"]} == {
        p: hashlib.sha256(d).hexdigest() for p, d in files.items() if not p.startswith("original/")}

    # A second call only resolves the revision: no file is fetched or re-hashed.
    hub.reset_counters()
    assert AutoBridge.from_hf_pretrained(REPO).checkpoint_dir == dest
    assert [r for r in hub.requests if r.file is not None] == []


def test_offline_uses_the_cached_commit_or_names_the_repo(hub, tiny_repo, hub_env, monkeypatch):
    files, commit = tiny_repo
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(HubDownloadError, match=rf"{REPO}.*HF_HUB_OFFLINE is set and no complete snapshot"):
        AutoBridge.from_hf_pretrained(REPO)
    monkeypatch.delenv("HF_HUB_OFFLINE")
    online = AutoBridge.from_hf_pretrained(REPO).checkpoint_dir
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    hub.reset_counters()
    assert AutoBridge.from_hf_pretrained(REPO, revision="main").checkpoint_dir == online
    assert hub.requests == []
    assert online.name == commit
