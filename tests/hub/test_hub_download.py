"""gptoss_model.hub.download against the local Hub in tests/hub_server.py."""

import hashlib
import json
import logging
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from gptoss_model.hub.download import HubAuthError, HubNotFoundError, download_snapshot, resolve_revision
from gptoss_model.hub.transfer import (PARTIAL_DIR, ChecksumMismatchError, MirrorNotFoundError,
                                            copy_local_snapshot)

REPO_ROOT = Path(__file__).resolve().parents[2]
MB = 1 << 20


def _files(payload):
    return {
        "config.json": json.dumps({"hidden_size": 64}).encode(),
        "tokenizer.json": payload(300_000, 1),  # below the LFS threshold: verified by git blob oid
        "model-00001-of-00002.safetensors": payload(3 * MB, 2),  # LFS, served through the "CDN"
        "model-00002-of-00002.safetensors": payload(2 * MB + 17, 3),
        "original/weights.bin": payload(1 * MB + 5, 4),  # LFS by size
        "original/params.json": b"{}",
        "empty.txt": b"",
    }


def _check_dir(dest: Path, files: dict, result) -> None:
    assert sorted(r.path for r in result.files) == sorted(files)
    for rec in result.files:
        data = files[rec.path]
        assert (dest / rec.path).read_bytes() == data
        assert rec.size == len(data) and rec.sha256 == hashlib.sha256(data).hexdigest()
    assert not (dest / PARTIAL_DIR).exists()


def test_full_download(hub, payload, tmp_path):
    files = _files(payload)
    sha = hub.add_repo("openai/tiny", files)
    seen = []
    result = download_snapshot("openai/tiny", "main", tmp_path, endpoint=hub.endpoint,
                               progress=lambda done, total: seen.append((done, total)))
    assert result.commit == sha and result.revision == "main"
    _check_dir(tmp_path, files, result)
    assert result.bytes_fetched == result.bytes_total == sum(map(len, files.values()))
    assert seen[-1] == (result.bytes_total, result.bytes_total)
    lfs = {r.path for r in result.files if r.lfs}
    assert lfs == {"model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors", "original/weights.bin"}
    assert any(r.host == "cdn" for r in hub.requests)  # LFS went through the redirect
    json.dumps(result.to_dict())  # manifest-ready


def test_second_call_fetches_nothing_and_repairs_a_damaged_file(hub, payload, tmp_path):
    files = _files(payload)
    hub.add_repo("openai/tiny", files)
    download_snapshot("openai/tiny", "main", tmp_path, endpoint=hub.endpoint)
    hub.reset_counters()
    again = download_snapshot("openai/tiny", "main", tmp_path, endpoint=hub.endpoint)
    assert again.bytes_fetched == 0 and sum(hub.bytes_served.values()) == 0
    _check_dir(tmp_path, files, again)
    # A file damaged in place (same size) is detected and fetched again, alone.
    p = tmp_path / "tokenizer.json"
    p.write_bytes(b"x" + p.read_bytes()[1:])
    third = download_snapshot("openai/tiny", "main", tmp_path, endpoint=hub.endpoint)
    assert {r.path: r.bytes_fetched for r in third.files if r.bytes_fetched} == {"tokenizer.json": 300_000}
    _check_dir(tmp_path, files, third)


def test_allow_and_ignore_patterns(hub, payload, tmp_path):
    files = _files(payload)
    hub.add_repo("openai/tiny", files)
    result = download_snapshot("openai/tiny", "main", tmp_path, endpoint=hub.endpoint,
                               allow_patterns=["*.json", "*.safetensors"], ignore_patterns=["original/*", "*-00002-of-*"])
    assert [r.path for r in result.files] == ["config.json", "model-00001-of-00002.safetensors", "tokenizer.json"]
    assert not (tmp_path / "original").exists() and not (tmp_path / "model-00002-of-00002.safetensors").exists()
    assert set(hub.bytes_served) == {r.path for r in result.files}


def test_revision_by_tag_branch_and_sha_pin_the_same_commit(hub, payload, tmp_path):
    old = {"config.json": b'{"v": 1}', "w.safetensors": payload(MB, 5)}
    new = {"config.json": b'{"v": 2}', "w.safetensors": payload(MB, 6)}
    sha1 = hub.add_repo("org/m", old, tags=["v1.0"], branches=["main", "release"])
    sha2 = hub.add_repo("org/m", new, branches=["main"])  # main moves on; the tag and release stay
    assert sha1 != sha2
    for rev in ("v1.0", "release", sha1):
        assert resolve_revision("org/m", rev, endpoint=hub.endpoint) == sha1
        result = download_snapshot("org/m", rev, tmp_path / rev, endpoint=hub.endpoint)
        assert result.commit == sha1 and result.revision == rev
        _check_dir(tmp_path / rev, old, result)
    result = download_snapshot("org/m", "main", tmp_path / "main", endpoint=hub.endpoint)
    assert result.commit == sha2
    _check_dir(tmp_path / "main", new, result)
    # Every file request named the commit sha, never the moving branch name.
    assert all(sha1 in r.path or sha2 in r.path for r in hub.requests if "/resolve/" in r.path)


def test_token_required_and_never_shown(hub, payload, tmp_path, caplog, monkeypatch):
    secret = "hf_S3CRETtokenVALUE123"
    files = {"config.json": b"{}", "w.safetensors": payload(MB, 7)}
    hub.add_repo("org/private", files, token=secret)
    caplog.set_level(logging.DEBUG)

    with pytest.raises(HubAuthError) as missing:
        download_snapshot("org/private", "main", tmp_path, endpoint=hub.endpoint)
    assert "token is required" in str(missing.value) and "org/private" in str(missing.value)
    with pytest.raises(HubAuthError) as wrong:
        download_snapshot("org/private", "main", tmp_path, endpoint=hub.endpoint, token="hf_wrongWRONGwrong")
    assert "rejected" in str(wrong.value) and "hf_wrongWRONGwrong" not in str(wrong.value)

    result = download_snapshot("org/private", "main", tmp_path, endpoint=hub.endpoint, token=secret)
    _check_dir(tmp_path, files, result)
    # HF_TOKEN works too (token=None means: the environment / saved login).
    monkeypatch.setenv("HF_TOKEN", secret)
    again = download_snapshot("org/private", "main", tmp_path / "env", endpoint=hub.endpoint)
    _check_dir(tmp_path / "env", files, again)

    # The token went to the Hub host only, never to the CDN the LFS file came from.
    assert any(r.authorized for r in hub.requests if r.host == "hub")
    assert [r for r in hub.requests if r.host == "cdn"] and not any(r.authorized for r in hub.requests
                                                                      if r.host == "cdn")
    for exc in (missing.value, wrong.value):
        text = "".join(str(e) + repr(e) for e in (exc, exc.__cause__, exc.__context__) if e is not None)
        assert secret not in text and "hf_wrongWRONGwrong" not in text
    assert secret not in caplog.text and "hf_wrongWRONGwrong" not in caplog.text
    assert secret not in json.dumps(result.to_dict())


def test_unknown_repo_revision_and_endpoint(hub, tmp_path):
    hub.add_repo("org/m", {"config.json": b"{}"})
    with pytest.raises(HubNotFoundError, match=r"repo 'org/nope' not found.*revision 'main'"):
        download_snapshot("org/nope", "main", tmp_path, endpoint=hub.endpoint)
    with pytest.raises(HubNotFoundError, match=r"Revision 'v9' not found in Hub repo 'org/m'"):
        download_snapshot("org/m", "v9", tmp_path, endpoint=hub.endpoint)
    assert not any(tmp_path.iterdir())


def test_hf_endpoint_env_and_paginated_tree(hub, payload, tmp_path, monkeypatch):
    files = {f"shard-{i}.json": payload(100 + i, i) for i in range(7)}
    hub.add_repo("org/many", files)
    hub.tree_page_size = 3  # the tree comes in 3 pages, linked by Link headers
    monkeypatch.setenv("HF_ENDPOINT", hub.endpoint)
    result = download_snapshot("org/many", "main", tmp_path)
    _check_dir(tmp_path, files, result)
    assert sum("/tree/" in r.path for r in hub.requests) == 3


@pytest.mark.parametrize("path, digest", [("model-00001-of-00002.safetensors", "sha256"),
                                          ("tokenizer.json", "git blob oid")])
def test_corruption_persists_fails_naming_the_file(hub, payload, tmp_path, path, digest):
    files = _files(payload)
    hub.add_repo("openai/tiny", files)
    hub.corrupt("openai/tiny", path, offset=12345)  # every body of this file has one flipped byte
    with pytest.raises(ChecksumMismatchError) as err:
        download_snapshot("openai/tiny", "main", tmp_path, endpoint=hub.endpoint)
    msg = str(err.value)
    assert path in msg and f"{digest} mismatch" in msg and "re-fetch" in msg
    data = files[path]
    expected = (hashlib.sha256(data).hexdigest() if digest == "sha256"
                else hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest())
    assert f"expected {expected}, found " in msg
    assert hub.bytes_served[path] == 2 * len(files[path])  # fetched once more from byte 0, then gave up
    assert not (tmp_path / path).exists()  # never placed unverified
    assert not (tmp_path / PARTIAL_DIR / path).exists()  # and its bad bytes are not kept for a resume


def test_transient_corruption_is_refetched_once(hub, payload, tmp_path, caplog):
    files = _files(payload)
    hub.add_repo("openai/tiny", files)
    path = "model-00002-of-00002.safetensors"
    hub.corrupt("openai/tiny", path, offset=len(files[path]) - 1, times=1)
    result = download_snapshot("openai/tiny", "main", tmp_path, endpoint=hub.endpoint)
    _check_dir(tmp_path, files, result)
    rec = next(r for r in result.files if r.path == path)
    assert rec.bytes_fetched == 2 * len(files[path])
    assert "sha256 mismatch" in caplog.text and path in caplog.text


def test_dropped_connection_resumes_within_the_call(hub, payload, tmp_path):
    files = _files(payload)
    hub.add_repo("openai/tiny", files)
    path = "model-00001-of-00002.safetensors"
    hub.drop("openai/tiny", path, after=MB + 3, times=2)
    result = download_snapshot("openai/tiny", "main", tmp_path, endpoint=hub.endpoint)
    _check_dir(tmp_path, files, result)
    ranges = [r.range for r in hub.file_requests(path) if r.host == "cdn"]
    assert ranges[0] is None and all(r and r.startswith("bytes=") and r != "bytes=0-" for r in ranges[1:])
    assert next(r for r in result.files if r.path == path).bytes_fetched <= 3 * MB + 2 * MB


def test_server_ignoring_range_restarts_cleanly(hub, payload, tmp_path):
    files = {"w.safetensors": payload(3 * MB, 8)}
    hub.add_repo("org/m", files)

    def crash(done, total):
        if done >= MB:
            raise KeyboardInterrupt  # an in-process stand-in for a crash mid-file

    with pytest.raises(KeyboardInterrupt):
        download_snapshot("org/m", "main", tmp_path, endpoint=hub.endpoint, progress=crash)
    assert (tmp_path / PARTIAL_DIR / "w.safetensors").stat().st_size >= MB
    hub.ignore_range = True  # 200 with the whole body: the partial bytes must be dropped, not doubled
    result = download_snapshot("org/m", "main", tmp_path, endpoint=hub.endpoint)
    _check_dir(tmp_path, files, result)


_CHILD = """
import sys
from gptoss_model.hub.download import download_snapshot
download_snapshot("org/big", "main", sys.argv[2], endpoint=sys.argv[1])
"""


def test_kill9_mid_file_then_resume(hub, payload, tmp_path):
    files = {"config.json": b"{}", "big.safetensors": payload(8 * MB, 9)}
    hub.add_repo("org/big", files)
    hub.throttle = 2 * MB  # bytes/s: slow enough to be killed mid-file
    dest = tmp_path / "dest"
    partial = dest / PARTIAL_DIR / "big.safetensors"
    env = dict(os.environ, PYTHONPATH=str(REPO_ROOT))
    child = subprocess.Popen([sys.executable, "-c", _CHILD, hub.endpoint, str(dest)], env=env, cwd=tmp_path)
    try:
        deadline = time.monotonic() + 30
        while not (partial.exists() and partial.stat().st_size >= MB):
            assert child.poll() is None, "the download ended before it could be killed"
            assert time.monotonic() < deadline, "no bytes on disk after 30 s"
            time.sleep(0.02)
    finally:
        child.send_signal(signal.SIGKILL)
        child.wait()
    on_disk = partial.stat().st_size
    assert MB <= on_disk < 8 * MB and not (dest / "big.safetensors").exists()

    hub.throttle = None
    hub.reset_counters()
    result = download_snapshot("org/big", "main", dest, endpoint=hub.endpoint)
    _check_dir(dest, files, result)
    rec = next(r for r in result.files if r.path == "big.safetensors")
    assert rec.bytes_fetched == 8 * MB - on_disk < 8 * MB
    # (bytes_served is not compared: the killed client's server thread may still be writing.)
    resumed = [(r.range, r.status) for r in hub.file_requests("big.safetensors") if r.host == "cdn"]
    assert resumed == [(f"bytes={on_disk}-", 206)]


def test_copy_local_snapshot_matches_hub_records(hub, payload, tmp_path):
    files = _files(payload)
    src = tmp_path / "mirror"
    for path, data in files.items():
        (src / path).parent.mkdir(parents=True, exist_ok=True)
        (src / path).write_bytes(data)
    (src / ".cache" / "huggingface").mkdir(parents=True)
    (src / ".cache" / "huggingface" / "junk.lock").write_bytes(b"")  # local_dir metadata: not model files
    copied = copy_local_snapshot(f"file://{src}", tmp_path / "out", ignore_patterns=["original/*"])
    want = {p: d for p, d in files.items() if not p.startswith("original/")}
    _check_dir(tmp_path / "out", want, copied)
    assert copied.commit is None and copied.bytes_fetched == sum(map(len, want.values()))
    assert copy_local_snapshot(str(src), tmp_path / "out", ignore_patterns=["original/*"]).bytes_fetched == 0

    hub.add_repo("openai/tiny", files)
    pulled = download_snapshot("openai/tiny", "main", tmp_path / "hub", endpoint=hub.endpoint,
                               ignore_patterns=["original/*"])
    assert [(r.path, r.size, r.sha256) for r in pulled.files] == [(r.path, r.size, r.sha256) for r in copied.files]
    assert pulled.content_digest() == copied.content_digest()
    with pytest.raises(MirrorNotFoundError, match="not a directory") as missing:
        copy_local_snapshot(str(tmp_path / "missing"), tmp_path / "x")
    assert not isinstance(missing.value, HubNotFoundError)  # named after the source: a mirror, not the Hub


def test_server_speaks_huggingface_hub_protocol(hub, payload, tmp_path, monkeypatch):
    """The test Hub also serves huggingface_hub's own snapshot_download."""
    import huggingface_hub
    monkeypatch.setenv("HF_HUB_DISABLE_XET", "1")
    files = _files(payload)
    sha = hub.add_repo("openai/tiny", files, tags=["v1"])
    out = huggingface_hub.snapshot_download("openai/tiny", revision="v1", local_dir=tmp_path,
                                            endpoint=hub.endpoint, allow_patterns=["*.json", "*.safetensors"])
    assert (Path(out) / "model-00001-of-00002.safetensors").read_bytes() == files["model-00001-of-00002.safetensors"]
    info = huggingface_hub.HfApi(endpoint=hub.endpoint).model_info("openai/tiny", revision="v1", files_metadata=True)
    assert info.sha == sha and {s.rfilename for s in info.siblings} == set(files)


def test_two_writers_into_one_dest_take_turns(hub, payload, tmp_path):
    import threading

    files = {"w.safetensors": payload(2 * MB, 11)}
    hub.add_repo("org/m", files)
    hub.throttle = 8 * MB  # ~0.25 s per body: the two calls overlap
    results = []
    calls = [threading.Thread(target=lambda: results.append(
        download_snapshot("org/m", "main", tmp_path, endpoint=hub.endpoint))) for _ in range(2)]
    for t in calls:
        t.start()
    for t in calls:
        t.join()
    assert len(results) == 2 and sorted(r.bytes_fetched for r in results) == [0, 2 * MB]
    _check_dir(tmp_path, files, results[0])
