"""The artifact store against file:// and moto S3 over HTTP (same tests, both backends)."""
from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tasks.store import (ArtifactNotFound, ArtifactStore, IntegrityError, InvalidNameError, Manifest,
                         Producer, run_stage)
from tasks.store.local import LocalBackend
from tasks.store.s3 import S3Backend
from tasks.store.housekeeping import incomplete_versions, remove_incomplete_versions
from tasks.store.names import parse_artifact_spec, validate_name, validate_relpath

WRITER = Path(__file__).with_name("writer.py")
ROOT = Path(__file__).resolve().parents[2]


def make_tree(root: Path, files: dict[str, bytes]) -> Path:
    for rel, data in files.items():
        p = root / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(data)
    return root


def commit_tree(store, tmp_path, files, name="org/model", version="0123456789abcdef0123", **kw):
    src = make_tree(tmp_path / f"src-{version}", files)
    manifest, won = store.commit(src, kind="hf-checkpoint", name=name, version=version,
                                 producer=Producer(stage="test", code_version="1"), **kw)
    assert won
    return manifest


def tamper(store: ArtifactStore, manifest: Manifest, rel: str) -> None:
    key = f"{store.prefix(manifest.kind, manifest.name, manifest.version)}/{rel}"
    if isinstance(store.backend, LocalBackend):
        p = store.backend.path(key)
        data = bytearray(p.read_bytes())
        data[len(data) // 2] ^= 0xFF
        p.write_bytes(bytes(data))
    else:
        be: S3Backend = store.backend
        data = bytearray(be.client.get_object(Bucket=be.bucket, Key=be._k(key))["Body"].read())
        data[len(data) // 2] ^= 0xFF
        be.client.put_object(Bucket=be.bucket, Key=be._k(key), Body=bytes(data))


def test_commit_download_roundtrip_and_listing(store, tmp_path):
    files = {"config.json": b'{"a": 1}', "shards/model-00001.safetensors": os.urandom(300_000),
             "shards/model-00002.safetensors": b""}
    m = commit_tree(store, tmp_path, files, metrics={"params": 7})
    assert {f.path for f in m.files} == set(files)
    assert store.get_manifest("hf-checkpoint", "org/model", m.version) == m
    out = store.download(m, tmp_path / "out")
    for rel, data in files.items():
        assert (out / rel).read_bytes() == data
    assert [x.spec for x in store.list()] == [m.spec]
    assert store.list("megatron-checkpoint") == []
    with pytest.raises(ArtifactNotFound):
        store.resolve("hf-checkpoint", "org/model")  # no 'latest' ref yet
    store.set_ref("hf-checkpoint", "org/model", "latest", m.version)
    assert store.resolve_spec("hf-checkpoint/org/model").version == m.version
    assert store.resolve_spec(f"hf-checkpoint/org/model@{m.version}").metrics == {"params": 7}
    local = store.local_path(m, cache_dir=tmp_path / "cache")
    assert (local / "config.json").read_bytes() == files["config.json"]


def test_multipart_transfer(store, tmp_path, monkeypatch):
    monkeypatch.setattr(S3Backend, "MULTIPART_THRESHOLD", 4 << 20)
    monkeypatch.setattr(S3Backend, "MIN_PART", 5 << 20)
    data = os.urandom(12 << 20)
    m = commit_tree(store, tmp_path, {"big.bin": data})
    assert (store.download(m, tmp_path / "out") / "big.bin").read_bytes() == data


def test_stage_cache_hit_and_lineage(store, tmp_path):
    calls = []

    def build(out: Path):
        calls.append(1)
        (out / "tokens.bin").write_bytes(b"x" * 100)
        return {"tokens": 100}

    parent = commit_tree(store, tmp_path, {"config.json": b"{}"})
    kw = dict(stage="preprocess", code_version="3", kind="dataset", name="demo",
              params={"seq": 8}, inputs=[parent], build=build)
    first = run_stage(store, **kw)
    second = run_stage(store, **kw)
    assert (first.cache_hit, second.cache_hit, len(calls)) == (False, True, 1)
    assert first.manifest == second.manifest
    assert first.manifest.producer.package_version is not None
    assert store.resolve("dataset", "demo").version == first.manifest.version
    other = run_stage(store, **{**kw, "params": {"seq": 16}})
    assert other.manifest.version != first.manifest.version and len(calls) == 2
    tree = store.lineage(first.manifest)
    assert tree["inputs"][0]["spec"] == parent.spec


def test_tampered_file_is_detected_on_download(store, tmp_path):
    m = commit_tree(store, tmp_path, {"a.bin": os.urandom(1000), "weights/b.bin": os.urandom(5000)})
    tamper(store, m, "weights/b.bin")
    with pytest.raises(IntegrityError, match=r"weights/b\.bin"):
        store.download(m, tmp_path / "out")
    assert not (tmp_path / "out" / "weights" / "b.bin").exists()


@pytest.mark.parametrize("bad", ["../etc", "a/../../b", "/abs", "a//b", "a b", "a?b", "refs", "x/" + "0" * 20,
                                 "a/b/c/d/e", "", "ü"])
def test_bad_names_are_rejected(bad):
    with pytest.raises(InvalidNameError, match="invalid artifact name"):
        validate_name(bad)


@pytest.mark.parametrize("bad", ["../x", "a/../../x", "/etc/passwd", "C:/x", "a\\b", "a//b", "./a", "MANIFEST.json",
                                 "a\nb"])
def test_bad_file_paths_are_rejected(bad):
    with pytest.raises(InvalidNameError, match="invalid file path"):
        validate_relpath(bad)


def test_bad_specs_and_keys_are_rejected(store):
    for spec in ["Hf/x", "hf-checkpoint/../x", "hf-checkpoint/x@../y", "hf-checkpoint/x@"]:
        with pytest.raises(InvalidNameError):
            parse_artifact_spec(spec) if not spec.endswith("@") else store.resolve_spec(spec + "..")
    with pytest.raises(InvalidNameError, match="version"):
        store.get_manifest("hf-checkpoint", "org/model", "../../etc")


def _run_writer(url: str, mode: str, start_at: float = 0.0) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.Popen([sys.executable, str(WRITER), url, mode, str(start_at)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=env, cwd=ROOT)


def _result(proc: subprocess.Popen) -> dict:
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, err
    line = next(ln for ln in out.splitlines() if ln.startswith("RESULT "))
    return json.loads(line[len("RESULT "):])


def test_kill_9_before_manifest_leaves_version_invisible_and_rerun_commits(store_url, tmp_path):
    proc = _run_writer(store_url, "hang-before-manifest")
    assert proc.stdout.readline().strip() == "READY", proc.stderr.read()
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait(timeout=30)
    store = ArtifactStore(store_url)
    assert store.list() == []
    leftovers = incomplete_versions(store)
    assert len(leftovers) == 1  # the data is there, without a manifest
    rerun = _result(_run_writer(store_url, "race"))
    assert rerun["cache_hit"] is False
    m = Manifest.model_validate(rerun["manifest"])
    out = store.download(m, tmp_path / "out")  # verifies every sha256
    assert json.loads((out / "config.json").read_text())["writer"] == m.metrics["writer_pid"]
    assert incomplete_versions(store) == {}


def test_two_concurrent_writers_end_with_one_version(store_url, tmp_path):
    start_at = time.time() + 4.0  # both interpreters are up by then
    procs = [_run_writer(store_url, "race", start_at) for _ in range(2)]
    results = [_result(p) for p in procs]
    manifests = [Manifest.model_validate(r["manifest"]) for r in results]
    assert manifests[0] == manifests[1]
    assert sorted(r["cache_hit"] for r in results) == [False, True]
    store = ArtifactStore(store_url)
    keys = [o.key for o in store.backend.list("") if o.key.endswith("MANIFEST.json")]
    assert len(keys) == 1
    store.download(manifests[0], tmp_path / "out")


def test_gc_removes_only_stale_uncommitted_versions(store, tmp_path):
    committed = commit_tree(store, tmp_path, {"a": b"1"})
    orphan = "1111111111aaaaaaaaaa"
    prefix = store.prefix("hf-checkpoint", "org/model", orphan)
    store.backend.put_bytes(f"{prefix}/half-written.bin", b"partial")
    assert remove_incomplete_versions(store, older_than_s=3600) == []  # too young
    held = store.claim("hf-checkpoint", "org/model", orphan)
    assert held.try_acquire()
    try:
        assert remove_incomplete_versions(store, older_than_s=0) == []  # a live writer holds it
    finally:
        held.release()
    assert remove_incomplete_versions(store, older_than_s=0, dry_run=True) == [prefix]
    assert remove_incomplete_versions(store, older_than_s=0) == [prefix]
    assert incomplete_versions(store) == {}
    assert store.get_manifest("hf-checkpoint", "org/model", committed.version) == committed


def test_local_commit_links_staging_files_it_owns_and_copies_shared_ones(tmp_path):
    """file://: a staging file with one link moves in by hard link; one linked elsewhere is copied."""
    store = ArtifactStore((tmp_path / "store").as_uri())
    src = make_tree(tmp_path / "staging", {"owned.bin": b"a" * 1000, "shared.bin": b"b" * 1000})
    os.link(src / "shared.bin", tmp_path / "kept-work-copy.bin")
    manifest, _ = store.commit(src, kind="hf-checkpoint", name="org/m", version="0123456789abcdef0123",
                               producer=Producer(stage="test", code_version="1"))
    local = store.local_path(manifest)
    assert (local / "owned.bin").stat().st_ino == (src / "owned.bin").stat().st_ino
    assert (local / "shared.bin").stat().st_ino != (src / "shared.bin").stat().st_ino
    (tmp_path / "kept-work-copy.bin").write_bytes(b"edited")  # cannot reach the artifact
    assert (local / "shared.bin").read_bytes() == b"b" * 1000
    assert {f.path: f.sha256 for f in manifest.files}["owned.bin"] == hashlib.sha256(b"a" * 1000).hexdigest()


def test_same_size_change_in_a_file_store_is_caught_by_local_path(tmp_path, monkeypatch):
    """A stage reading its input in place sees a same-size byte change (sizes alone would not)."""
    from tasks.store.store import CorruptArtifactError

    monkeypatch.setenv("GPTOSS_CACHE", str(tmp_path / "cache"))
    store = ArtifactStore((tmp_path / "store").as_uri())
    m = commit_tree(store, tmp_path, {"config.json": b"{}", "w.bin": os.urandom(3 << 20)})
    root = store.local_path(m)  # stamped by the commit: nothing to hash
    assert (root / "w.bin").stat().st_size == 3 << 20
    tamper(store, m, "w.bin")
    with pytest.raises(CorruptArtifactError, match=r"'w\.bin'.*sha256 [0-9a-f]{64} on disk, [0-9a-f]{64} committed"):
        store.local_path(m)
    # The stamp is tied to the inode's ctime: restoring the right bytes makes it readable again, verified.
    key = f"{store.prefix(m.kind, m.name, m.version)}/w.bin"
    tamper(store, m, "w.bin")  # flips the same byte back
    assert store.local_path(m) == root
    assert store.backend.path(key).is_file()


@pytest.mark.s3
def test_kill_9_mid_s3_commit_retry_uploads_only_missing_files(s3_bucket, tmp_path, monkeypatch):
    """The retry keeps every object the killed attempt finished (its recorded sha256 matches the
    new staging file) and sends only the rest; the committed version verifies."""
    monkeypatch.setenv("GPTOSS_WORKDIR", str(tmp_path / "work"))
    url = f"s3://{s3_bucket}/store"
    proc = _run_writer(url, "hang-mid-commit")
    assert proc.stdout.readline().strip() == "READY", proc.stderr.read()
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait(timeout=30)
    sizes = {"a-big.bin": 20 << 20, "b.bin": 2 << 20, "c.bin": 2 << 20, "d.bin": 2 << 20, "e.bin": 2 << 20}
    store = ArtifactStore(url)
    (prefix,) = incomplete_versions(store)
    assert sorted(o.key.rsplit("/", 1)[1] for o in store.backend.list(prefix + "/")
                  if not o.key.endswith(".claim.json")) == ["a-big.bin", "b.bin", "c.bin"]

    rerun = _result(_run_writer(url, "resume"))
    missing = sizes["d.bin"] + sizes["e.bin"]
    print(f"retry sent {rerun['data_bytes_sent']} data bytes of {sum(sizes.values())} (missing: {missing})")
    assert rerun["data_bytes_sent"] == missing
    m = Manifest.model_validate(rerun["manifest"])
    assert {f.path: f.size for f in m.files} == sizes
    store.download(m, tmp_path / "out")  # every sha256 verified
    assert incomplete_versions(store) == {}


def test_commit_retry_replaces_files_whose_content_changed(store, tmp_path):
    """A leftover object with the right size but other bytes is uploaded again, and one
    the new attempt does not produce is deleted."""
    version = "0123456789abcdef0123"
    prefix = store.prefix("hf-checkpoint", "org/model", version)
    store.backend.upload_file(make_tree(tmp_path / "old", {"w.bin": b"A" * 4096})/ "w.bin", f"{prefix}/w.bin")
    store.backend.put_bytes(f"{prefix}/stale.bin", b"from an older attempt")
    m = commit_tree(store, tmp_path, {"w.bin": b"B" * 4096}, version=version)
    assert (store.download(m, tmp_path / "out") / "w.bin").read_bytes() == b"B" * 4096
    assert sorted(o.key.rsplit("/", 1)[1] for o in store.backend.list(prefix + "/")) == ["MANIFEST.json", "w.bin"]


def test_commit_adopts_files_workers_uploaded_and_refuses_a_missing_one(store, tmp_path):
    """Files put under the version by other processes join the manifest (scratch beside them is
    deleted); one a worker reported but the store does not hold fails the commit, naming it."""
    from tasks.store.manifest import FileEntry

    version = "0123456789abcdef0124"
    prefix = store.prefix("dataset", "d", version)
    shard = os.urandom(5000)
    store.backend.put_bytes(f"{prefix}/shard.bin", shard)
    store.backend.put_bytes(f"{prefix}/_parts/unit.tok", b"scratch")
    uploaded = [FileEntry(path="shard.bin", size=len(shard), sha256=hashlib.sha256(shard).hexdigest())]
    missing = FileEntry(path="gone.bin", size=3, sha256="0" * 64)
    with pytest.raises(IntegrityError, match=r"gone\.bin: a worker reported uploading 3 bytes; the store holds nothing"):
        store.commit(make_tree(tmp_path / "src1", {"meta.json": b"{}"}), kind="dataset", name="d", version=version,
                     producer=Producer(stage="test", code_version="1"), uploaded=[*uploaded, missing])
    assert store.get_manifest("dataset", "d", version) is None

    m = store.commit(make_tree(tmp_path / "src2", {"meta.json": b"{}"}), kind="dataset", name="d",
                     version=version, producer=Producer(stage="test", code_version="1"), uploaded=uploaded)[0]
    assert [(f.path, f.size) for f in m.files] == [("meta.json", 2), ("shard.bin", len(shard))]
    assert (store.download(m, tmp_path / "out") / "shard.bin").read_bytes() == shard
    assert sorted(o.key.rsplit("/", 1)[1] for o in store.backend.list(prefix + "/")) == \
        ["MANIFEST.json", "meta.json", "shard.bin"]
