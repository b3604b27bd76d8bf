"""The download stage (tasks/download.py, flows/download.py) against the local Hub."""

import asyncio
import json
import logging

import pytest

from tasks.common import StoreSettings
from tasks.download import DownloadParams, run_download
from tasks.store import ArtifactStore

MB = 1 << 20


def _params(hub, tmp_path, **kw) -> DownloadParams:
    return DownloadParams(endpoint=hub.endpoint, workdir=str(tmp_path / "work"),
                          store=StoreSettings(url=(tmp_path / "store").as_uri()), **kw)


def test_stage_commits_pinned_version_and_reuses_it(hub, payload, tmp_path):
    files = {"config.json": b'{"a": 1}', "model.safetensors": payload(2 * MB, 1), "README.md": b"hi"}
    sha = hub.add_repo("openai/tiny", files, tags=["v1"])
    store = ArtifactStore((tmp_path / "store").as_uri())

    first = run_download(_params(hub, tmp_path, repo_id="openai/tiny", revision="v1",
                                 ignore_patterns=["*.md"]), store)
    m = first.manifest
    assert not first.cache_hit and m.kind == "hf-checkpoint" and m.name == "openai/tiny"
    assert m.parameters == {"repo_id": "openai/tiny", "commit": sha, "allow_patterns": None,
                            "ignore_patterns": ["*.md"]}
    assert {f.path for f in m.files} == {"config.json", "model.safetensors"}
    assert m.metrics["commit"] == sha and m.metrics["revision"] == "v1"
    assert m.metrics["bytes_fetched"] == 2 * MB + len(files["config.json"])
    local = store.local_path(m)
    assert (local / "model.safetensors").read_bytes() == files["model.safetensors"]
    # The work copy is gone once committed (only the tiny lock file stays).
    assert not [p for p in (tmp_path / "work" / "hf-downloads").iterdir() if p.is_dir()]

    # The same commit by branch name: same version, nothing fetched.
    hub.reset_counters()
    again = run_download(_params(hub, tmp_path, repo_id="openai/tiny", revision="main",
                                 ignore_patterns=["*.md"]), store)
    assert again.cache_hit and again.manifest.version == m.version
    assert sum(hub.bytes_served.values()) == 0

    # main moves on: a new version.
    hub.add_repo("openai/tiny", {**files, "config.json": b'{"a": 2}'}, branches=["main"])
    moved = run_download(_params(hub, tmp_path, repo_id="openai/tiny", ignore_patterns=["*.md"]), store)
    assert not moved.cache_hit and moved.manifest.version != m.version


def test_stage_resumes_after_a_failed_attempt_and_keeps_token_out(hub, payload, tmp_path, caplog, monkeypatch):
    secret = "hf_StageSecretToken42"
    monkeypatch.setenv("HF_TOKEN", secret)  # the worker's environment: a token is never a parameter
    files = {"config.json": b"{}", "w.safetensors": payload(3 * MB, 2)}
    hub.add_repo("org/private", files, token=secret)
    store = ArtifactStore((tmp_path / "store").as_uri())
    caplog.set_level(logging.DEBUG)
    hub.corrupt("org/private", "w.safetensors", offset=10, times=2)  # attempt 1 fails verification
    with pytest.raises(Exception, match="w.safetensors"):
        run_download(_params(hub, tmp_path, repo_id="org/private"), store)
    hub.drop("org/private", "w.safetensors", after=MB, times=1)
    hub.reset_counters()
    ok = run_download(_params(hub, tmp_path, repo_id="org/private"), store)
    assert {f.path: f.size for f in ok.manifest.files}["w.safetensors"] == 3 * MB
    assert secret not in json.dumps(ok.manifest.model_dump()) and secret not in caplog.text
    with pytest.raises(ValueError, match="hf_token: a token is never a parameter.*hf_token_block") as refused:
        DownloadParams(repo_id="org/private", hf_token=secret)
    assert secret not in str(refused.value)


def test_stage_from_local_mirror(payload, tmp_path):
    src = tmp_path / "mirror" / "gpt-oss-tiny"
    src.mkdir(parents=True)
    (src / "config.json").write_bytes(b"{}")
    (src / "model.safetensors").write_bytes(payload(MB, 3))
    params = DownloadParams(source_url=src.as_uri(), workdir=str(tmp_path / "work"),
                            store=StoreSettings(url=(tmp_path / "store").as_uri()))
    first = run_download(params)
    assert first.manifest.name == "gpt-oss-tiny" and len(first.manifest.files) == 2
    assert "content_sha256" in first.manifest.parameters
    assert run_download(params).cache_hit


@pytest.mark.prefect
def test_flow_with_secret_block(prefect_harness, hub, payload, tmp_path):
    from prefect.blocks.system import Secret
    from prefect.client.orchestration import get_client

    from flows.download import download_flow

    secret = "hf_BlockSecretToken77"
    Secret(value=secret).save("hf-token-test", overwrite=True)
    files = {"config.json": b"{}", "w.safetensors": payload(MB, 4)}
    hub.add_repo("org/gated", files, token=secret)
    params = _params(hub, tmp_path, repo_id="org/gated", hf_token_block="hf-token-test")
    state = download_flow(params, return_state=True)
    manifest = state.result()
    assert {f.path for f in manifest.files} == set(files)

    async def fetch():
        async with get_client() as client:
            run = await client.read_flow_run(state.state_details.flow_run_id)
            arts = await client.read_artifacts()
            return run, arts

    run, arts = asyncio.run(fetch())
    assert secret not in str(run.parameters) + " ".join(str(a.data) for a in arts)


@pytest.mark.prefect
@pytest.mark.timeout(90)
def test_flow_fails_fast_on_permanent_errors(prefect_harness, hub, tmp_path):
    """A 404 is not retried (the task's retry delays are 10/60/300 s)."""
    import time

    from flows.download import download_flow

    t0 = time.monotonic()
    state = download_flow(_params(hub, tmp_path, repo_id="org/missing"), return_state=True)
    assert state.is_failed() and time.monotonic() - t0 < 8
    with pytest.raises(Exception, match="org/missing"):
        state.result()


def test_local_mirror_cache_hit_copies_nothing(payload, tmp_path, monkeypatch):
    """The mirror is identified in place: a committed version is found before any byte is copied."""
    import tasks.download as download

    src = tmp_path / "mirror" / "gpt-oss-tiny"
    src.mkdir(parents=True)
    (src / "config.json").write_bytes(b"{}")
    (src / "model.safetensors").write_bytes(payload(MB, 5))
    params = DownloadParams(source_url=src.as_uri(), workdir=str(tmp_path / "work"),
                            store=StoreSettings(url=(tmp_path / "store").as_uri()))
    first = run_download(params)
    assert not first.cache_hit

    def no_copy(*args, **kwargs):
        raise AssertionError("a cache hit must not copy the mirror")

    monkeypatch.setattr(download, "copy_local_snapshot", no_copy)
    again = run_download(params)
    assert again.cache_hit and again.manifest.version == first.manifest.version
    assert not (tmp_path / "work" / "hf-downloads").exists() or not any(
        p.is_dir() for p in (tmp_path / "work" / "hf-downloads").iterdir())

    # A changed mirror is a new version, and is copied.
    monkeypatch.undo()
    (src / "model.safetensors").write_bytes(payload(MB, 6))
    changed = run_download(params)
    assert not changed.cache_hit and changed.manifest.version != first.manifest.version


def test_hostile_commit_sha_is_refused_before_anything_is_written(hub, payload, tmp_path, monkeypatch):
    """An endpoint answering a 'sha' with path separators never names a directory."""
    import gptoss_model.hub.download as hd

    victim = tmp_path / "victim"
    victim.mkdir()
    (victim / "keep.txt").write_text("user data")
    hub.add_repo("org/evil", {"config.json": b"{}", "w.safetensors": payload(MB, 8)})

    real = hd.HfApi.model_info

    def lying_model_info(self, *args, **kwargs):
        info = real(self, *args, **kwargs)
        info.sha = "x/../../../victim"
        return info

    monkeypatch.setattr(hd.HfApi, "model_info", lying_model_info)
    with pytest.raises(hd.HubResponseError, match="40-hex-digit"):
        run_download(_params(hub, tmp_path, repo_id="org/evil"))
    assert (victim / "keep.txt").read_text() == "user data"
    assert not (tmp_path / "work").exists() or not any((tmp_path / "work").rglob("*.safetensors"))


def test_download_refuses_a_set_without_config_or_weights(hub, payload, tmp_path):
    from gptoss_model.checkpoint.load_hf import CheckpointError

    hub.add_repo("org/docs-only", {"README.md": b"hello", "config.json": b"{}"})
    with pytest.raises(CheckpointError, match="no \\*.safetensors weights"):
        run_download(_params(hub, tmp_path, repo_id="org/docs-only"))
    empty = tmp_path / "empty-mirror"
    empty.mkdir()
    with pytest.raises(CheckpointError, match="no config.json and no"):
        run_download(DownloadParams(source_url=empty.as_uri(), workdir=str(tmp_path / "work"),
                                    store=StoreSettings(url=(tmp_path / "store").as_uri())))
    store = ArtifactStore((tmp_path / "store").as_uri())
    assert store.list() == []  # nothing committed, no `latest` pointing at an empty checkpoint


@pytest.mark.parametrize("spelling", ["relative", "absolute", "trailing-slash", "file-uri"])
def test_mirror_spellings_are_one_version(payload, tmp_path, monkeypatch, spelling):
    src = tmp_path / "mirror" / "gpt-oss-tiny"
    src.mkdir(parents=True)
    (src / "config.json").write_bytes(b"{}")
    (src / "model.safetensors").write_bytes(payload(MB, 9))
    monkeypatch.chdir(tmp_path)
    url = {"relative": "mirror/gpt-oss-tiny", "absolute": str(src), "trailing-slash": f"{src}/",
           "file-uri": src.as_uri()}[spelling]
    store = (tmp_path / "store").as_uri()
    reference = run_download(DownloadParams(source_url=src.as_uri(), workdir=str(tmp_path / "w"),
                                            store=StoreSettings(url=store)))
    again = run_download(DownloadParams(source_url=url, workdir=str(tmp_path / "w"), store=StoreSettings(url=store)))
    assert again.cache_hit and again.manifest.version == reference.manifest.version


def test_download_into_a_file_store_writes_each_byte_once(hub, payload, tmp_path, monkeypatch):
    """The work copy is renamed into staging, which the store hard-links: no file is copied."""
    import tasks.store.local as local

    copies = []
    real_copy = local.copy_hashing
    monkeypatch.setattr(local, "copy_hashing", lambda src, *a, **k: copies.append(src) or real_copy(src, *a, **k))
    hub.add_repo("org/once", {"config.json": b"{}", "w.safetensors": payload(2 * MB, 10)})
    result = run_download(_params(hub, tmp_path, repo_id="org/once"))
    assert not result.cache_hit and copies == []
    stored = ArtifactStore((tmp_path / "store").as_uri()).local_path(result.manifest) / "w.safetensors"
    assert stored.stat().st_nlink == 1 and stored.read_bytes() == payload(2 * MB, 10)
    kept = run_download(_params(hub, tmp_path, repo_id="org/once", name="org/once-kept", keep_download=True))
    assert len(copies) == 2  # a kept work copy is never shared with the store: copied
    assert not kept.cache_hit
