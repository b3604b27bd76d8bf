"""gc: stale staging and download work dirs, unfinished multipart uploads and uncommitted
versions go; nothing a live run holds (its claim or its work dir's lock) is touched."""
from __future__ import annotations

import os
import signal
import threading
import time
from pathlib import Path

import pytest
from typer.testing import CliRunner

from flows.cli import app
from gptoss_model.system.paths import try_lock
from tasks.store import ArtifactStore, run_stage
from tasks.store.claims import work_dir_lock
from tasks.store.housekeeping import incomplete_versions
from tests.store.test_store import _run_writer

OLD = time.time() - 3 * 86400


def _age(root: Path, when: float = OLD) -> None:
    for p in [*root.rglob("*"), root]:
        os.utime(p, (when, when), follow_symlinks=False)


def _tree(root: Path, files: dict[str, bytes], when: float = OLD) -> Path:
    for rel, data in files.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_bytes(data)
    _age(root, when)
    return root


def test_gc_removes_stale_work_dirs_and_keeps_live_ones(store, tmp_path):
    work = tmp_path / "work"
    stale_staging = _tree(work / "convert-0123456789abcdef0123", {"iter_0000000/a.distcp": b"x" * 5000})
    stale_oneshot = _tree(work / "download-aaaaaaaaaabbbbbbbbbb-k3j_x9", {"config.json": b"{}"})
    stale_download = _tree(work / "hf-downloads" / f"openai--gpt-oss-20b--{'e' * 40}", {"a.safetensors": b"y" * 3000})
    young = _tree(work / "convert-1111111111bbbbbbbbbb", {"x": b"1"}, when=time.time())
    held_download = _tree(work / "hf-downloads" / "local--00ff00ff00ff00ff", {"b": b"2"})
    not_ours = _tree(work / "my-notes", {"keep.txt": b"mine"})
    held_fd = try_lock(work_dir_lock(held_download))  # a transfer in progress
    stale_train = _tree(work / "train-0123456789abcdef", {"checkpoints/iter_0000004/__0_0.distcp": b"o" * 4000})
    live_train = _tree(work / "train-fedcba9876543210", {"checkpoints/iter_0000002/__0_0.distcp": b"p" * 10})
    train_fd = try_lock(work_dir_lock(live_train))  # a training run in progress (tasks.train holds this)

    # A live stage: it holds its version's claim and its staging dir; its build waits for gc.
    building, finish = threading.Event(), threading.Event()
    seen: dict[str, Path] = {}

    def build(staging: Path) -> dict:
        (staging / "w.bin").write_bytes(b"z" * 1000)
        _age(staging)  # looks abandoned by age: only the lock says it is live
        seen["staging"] = staging
        building.set()
        assert finish.wait(60)
        return {}

    live = threading.Thread(target=lambda: seen.setdefault("result", run_stage(
        store, stage="preprocess", code_version="1", kind="dataset", name="live", params={}, build=build,
        workdir=work)))
    live.start()
    try:
        assert building.wait(60)
        runner = CliRunner()
        env = {"GPTOSS_STORE": store.url, "GPTOSS_WORKDIR": str(work), "COLUMNS": "250"}
        out = runner.invoke(app, ["artifacts", "gc", "--older-than", "1h", "--dry-run"], env=env)
        assert out.exit_code == 0, out.output
        for d in (stale_staging, stale_oneshot, stale_download):
            assert f"would remove {'download work' if 'hf-downloads' in str(d) else 'staging'} dir {d}" \
                in out.output and d.is_dir()
        for d in (young, held_download, not_ours, seen["staging"], live_train):
            assert str(d) not in out.output
        assert f"would remove training run dir {stale_train}" in out.output

        out = runner.invoke(app, ["artifacts", "gc", "--older-than", "1h"], env=env)
        assert out.exit_code == 0, out.output
        assert ("removed 0 incomplete version(s), 0 multipart upload(s), 2 staging dir(s), 1 training run dir(s), "
                "1 download work dir(s)") in out.output
        assert not stale_train.exists() and (live_train / "checkpoints").is_dir()
        assert not stale_staging.exists() and not stale_oneshot.exists() and not stale_download.exists()
        assert not work_dir_lock(stale_staging).exists()
        assert young.is_dir() and held_download.is_dir() and (not_ours / "keep.txt").is_file()
        assert (seen["staging"] / "w.bin").is_file()
        # The live stage's uncommitted version survives a gc that treats everything as stale.
        assert runner.invoke(app, ["artifacts", "gc", "--older-than", "0s"], env=env).exit_code == 0
        assert (seen["staging"] / "w.bin").is_file() and not young.exists()
    finally:
        finish.set()
        live.join(60)
        os.close(held_fd)
        os.close(train_fd)
    assert seen["result"].manifest.files[0].path == "w.bin"  # the live stage committed normally
    assert not seen["staging"].exists() and not work_dir_lock(seen["staging"]).exists()


@pytest.mark.s3
def test_kill_9_mid_s3_upload_leaves_nothing_after_gc(s3_bucket, tmp_path, monkeypatch):
    url = f"s3://{s3_bucket}/store"
    work = tmp_path / "work"
    monkeypatch.setenv("GPTOSS_WORKDIR", str(work))
    proc = _run_writer(url, "hang-mid-upload")
    assert proc.stdout.readline().strip() == "READY", proc.stderr.read()
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait(timeout=30)
    store = ArtifactStore(url)
    assert list(store.backend.multipart_uploads())  # the killed writer's upload, never aborted
    assert [p.name.startswith("writer-test-") for p in work.iterdir() if p.is_dir()] == [True]

    env = {"GPTOSS_STORE": url, "GPTOSS_WORKDIR": str(work), "COLUMNS": "250"}
    out = CliRunner().invoke(app, ["artifacts", "gc", "--older-than", "0s"], env=env)
    assert out.exit_code == 0, out.output
    assert "1 multipart upload(s), 1 staging dir(s)" in out.output
    assert list(store.backend.multipart_uploads()) == []
    assert incomplete_versions(store) == {}
    assert [p for p in work.iterdir() if p.is_dir()] == []


def test_download_transfers_hold_the_lock_gc_checks(tmp_path):
    """A download work dir being written is held under the same lock name gc tries."""
    from gptoss_model.hub.transfer import _exclusive

    work = tmp_path / "hf-downloads" / "org--m--abc"
    work.mkdir(parents=True)
    with _exclusive(work, "test"):
        assert try_lock(work_dir_lock(work)) is None
    fd = try_lock(work_dir_lock(work))
    assert fd is not None
    os.close(fd)
