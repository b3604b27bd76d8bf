"""Faults of the store's surroundings: an endpoint that never answers, a read-only store,
corrupt manifests and refs, a lineage loop. Each ends in a clear error, nothing lost."""
from __future__ import annotations

import socket
import threading
import time

import pytest
from typer.testing import CliRunner

from flows.cli import app
from tasks.store import ArtifactStore
from tasks.store.s3 import S3Backend, StoreUnreachable


@pytest.fixture
def silent_endpoint():
    """An HTTP endpoint that accepts connections and never answers."""
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(64)
    held, stop = [], threading.Event()

    def accept() -> None:
        server.settimeout(0.2)
        while not stop.is_set():
            try:
                held.append(server.accept()[0])
            except OSError:
                continue

    thread = threading.Thread(target=accept, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.getsockname()[1]}"
    stop.set()
    thread.join()
    for conn in held:
        conn.close()
    server.close()


def test_silent_s3_endpoint_fails_within_the_timeouts_naming_it(silent_endpoint, monkeypatch):
    monkeypatch.setattr(S3Backend, "READ_TIMEOUT", 1)
    monkeypatch.setattr(S3Backend, "MAX_ATTEMPTS", 2)
    store = ArtifactStore("s3://bucket/prefix", s3_endpoint_url=silent_endpoint)
    started = time.monotonic()
    with pytest.raises(StoreUnreachable, match=rf"s3://bucket/prefix \(endpoint {silent_endpoint}\) did not answer"):
        store.get_manifest("hf-checkpoint", "org/model", "0123456789abcdef0123")
    elapsed = time.monotonic() - started
    print(f"a read from a silent endpoint failed after {elapsed:.1f} s (read timeout 1 s, 2 tries)")
    assert elapsed < 20

    out = CliRunner().invoke(app, ["artifacts", "ls"], env={"GPTOSS_STORE": "s3://bucket/prefix",
                                                           "GPTOSS_S3_ENDPOINT_URL": silent_endpoint})
    assert out.exit_code == 1 and out.stderr.count("\n") == 1 and silent_endpoint in out.stderr, out.stderr


def _stage(store, name: str, build_calls: list | None = None, **kw):
    from tasks.store import run_stage

    def build(out):
        (build_calls if build_calls is not None else []).append(1)
        (out / "data.bin").write_bytes(name.encode() * 100)
        return {}

    return run_stage(store, stage="probe", code_version="1", kind="dataset", name=name, params={"n": name},
                     build=build, **kw)


def test_cache_hit_on_a_store_without_write_access(store, monkeypatch, caplog):
    first = _stage(store, "ro").manifest

    def denied(*args, **kwargs):
        raise PermissionError("read-only store")

    for method in ("put_bytes", "upload_file", "delete"):
        monkeypatch.setattr(store.backend, method, denied)
    again = _stage(store, "ro")  # refs/latest already points there: nothing to write
    assert again.cache_hit and again.manifest == first
    assert store.resolve("dataset", "ro").version == first.version

    monkeypatch.undo()
    store.backend.put_bytes("dataset/ro/refs/latest", b'{"version": "ffffffffffffffffffff"}')  # latest moved away
    for method in ("put_bytes", "upload_file", "delete"):
        monkeypatch.setattr(store.backend, method, denied)
    hit = _stage(store, "ro")  # cannot move latest back: a warning, not a failure
    assert hit.cache_hit and hit.manifest.version == first.version
    assert "no write access" in caplog.text


def test_corrupt_manifest_is_listed_as_unreadable_and_fsck_quarantines_it(store, tmp_path):
    good = _stage(store, "good").manifest
    bad = _stage(store, "bad").manifest
    bad_key = f"{store.prefix(bad.kind, bad.name, bad.version)}/MANIFEST.json"
    store.backend.put_bytes(bad_key, b'{"schema_version": 1, "kind": "dataset", "na')
    env = {"GPTOSS_STORE": store.url, "COLUMNS": "250"}
    runner = CliRunner()

    out = runner.invoke(app, ["artifacts", "ls"], env=env)
    assert out.exit_code == 0 and good.version in out.stdout and bad.version not in out.stdout
    assert f"{store.url}/{bad_key}" in out.stderr and "fsck --quarantine" in out.stderr

    out = runner.invoke(app, ["artifacts", "fsck"], env=env)
    assert out.exit_code == 1 and f"corrupt manifest {store.url}/{bad_key}" in out.stdout
    out = runner.invoke(app, ["artifacts", "fsck", "--quarantine"], env=env)
    assert out.exit_code == 0 and "quarantined corrupt manifest" in out.stdout, out.output
    assert runner.invoke(app, ["artifacts", "fsck"], env=env).exit_code == 0
    assert [o.key for o in store.backend.list(".quarantine/")][0].startswith(f".quarantine/{bad_key}.")

    calls = []
    rebuilt = _stage(store, "bad", build_calls=calls)  # the version is no longer blocked
    assert calls == [1] and not rebuilt.cache_hit and rebuilt.manifest.version == bad.version
    store.download(rebuilt.manifest, tmp_path / "out")


def test_corrupt_ref_and_lineage_loop_are_one_line_errors_naming_the_file(store, tmp_path):
    from tasks.store import InputRef, Producer
    from tasks.store.manifest import CorruptStoreObject

    m = _stage(store, "pointer").manifest
    ref_key = "dataset/pointer/refs/latest"
    store.backend.put_bytes(ref_key, b"{not json")
    with pytest.raises(CorruptStoreObject, match=rf"corrupt ref {store.url}/{ref_key}"):
        store.resolve("dataset", "pointer")
    env = {"GPTOSS_STORE": store.url, "COLUMNS": "250"}
    out = CliRunner().invoke(app, ["artifacts", "show", "dataset/pointer"], env=env)
    assert out.exit_code == 1 and out.stderr.count("\n") == 1 and ref_key in out.stderr, out.stderr
    _stage(store, "pointer")  # a writer replaces the corrupt ref
    assert store.resolve("dataset", "pointer").version == m.version

    # Two manifests naming each other as inputs.
    a, b = "aaaaaaaaaa0000000000", "bbbbbbbbbb0000000000"
    for version, other in ((a, b), (b, a)):
        src = tmp_path / version
        src.mkdir()
        (src / "f").write_bytes(version.encode())
        store.commit(src, kind="dataset", name="loop", version=version, producer=Producer(stage="t", code_version="1"),
                     inputs=[InputRef(kind="dataset", name="loop", version=other)])
    with pytest.raises(CorruptStoreObject, match=rf"loops: dataset/loop@{a} -> dataset/loop@{b} -> dataset/loop@{a}"):
        store.lineage(store.get_manifest("dataset", "loop", a))
    out = CliRunner().invoke(app, ["artifacts", "show", f"dataset/loop@{a}"], env=env)
    assert out.exit_code == 1 and "MANIFEST.json" in out.stderr and "loops" in out.stderr
    assert out.stderr.count("\n") == 1 and "RecursionError" not in out.output
