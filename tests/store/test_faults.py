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
from tasks.store.backends import S3Backend, StoreUnreachable


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
        store.list()
    with pytest.raises(StoreUnreachable, match=silent_endpoint):
        store.get_manifest("hf-checkpoint", "org/model", "0123456789abcdef0123")
    elapsed = time.monotonic() - started
    print(f"two calls against a silent endpoint failed after {elapsed:.1f} s (read timeout 1 s, 2 tries)")
    assert elapsed < 30

    out = CliRunner().invoke(app, ["artifacts", "ls"], env={"GPTOSS_STORE": "s3://bucket/prefix",
                                                           "GPTOSS_S3_ENDPOINT_URL": silent_endpoint})
    assert out.exit_code == 1 and out.stderr.count("\n") == 1 and silent_endpoint in out.stderr, out.stderr
