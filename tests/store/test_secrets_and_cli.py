"""Secrets stay out of manifests, logs and Prefect's parameter view; the CLI works."""
from __future__ import annotations

import asyncio
import logging
from pathlib import Path

import pytest
from prefect import flow
from pydantic import BaseModel, SecretStr
from typer.testing import CliRunner

from flows.cli import app, parse_duration
from tasks.common import StoreSettings, run_logged_stage
from tasks.store import ArtifactStore, run_stage

SECRET = "hf_SeCrEt_tOkEn_0123456789"
AWS_SECRET = "testing-secret"  # conftest's fake AWS secret key


class DemoParams(BaseModel):
    repo: str = "org/model"
    hf_token: SecretStr | None = None
    store: StoreSettings = StoreSettings()


@flow(name="secret-probe")
def secret_probe(params: DemoParams) -> dict:
    store = params.store.open()

    def build(out: Path) -> dict:
        logging.getLogger("gptoss.test").info("building with token present=%s", params.hf_token is not None)
        (out / "weights.bin").write_bytes(b"w" * 64)
        return {"ok": 1}

    result = run_logged_stage(store, stage="probe", code_version="1", kind="hf-checkpoint", name=params.repo,
                              params=params, build=build)
    return result.manifest.model_dump()


def test_secret_params_never_reach_manifest_or_fingerprint(tmp_path, caplog):
    store = ArtifactStore((tmp_path / "s").as_uri())
    caplog.set_level(logging.DEBUG)
    params = {"repo": "org/model", "token": SECRET, "aws_secret_access_key": SECRET, "nested": {"api_key": SECRET},
              "hf_token": SecretStr(SECRET), "token_block": "hf-token"}
    res = run_stage(store, stage="probe", code_version="1", kind="blob", name="x", params=params,
                    build=lambda out: (out / "f").write_bytes(b"1") and None)
    raw = store.backend.get_bytes(f"{store.prefix('blob', 'x', res.manifest.version)}/MANIFEST.json").decode()
    assert SECRET not in raw
    assert res.manifest.parameters == {"repo": "org/model", "nested": {}, "token_block": "hf-token"}
    rotated = run_stage(store, stage="probe", code_version="1", kind="blob", name="x",
                        params={**params, "token": "another"}, build=lambda out: None)
    assert rotated.cache_hit and rotated.manifest.version == res.manifest.version
    assert SECRET not in caplog.text


@pytest.mark.prefect
def test_secrets_absent_from_prefect_parameters_logs_and_artifacts(prefect_harness, s3_bucket, caplog):
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import LogFilter, LogFilterFlowRunId

    caplog.set_level(logging.DEBUG)
    params = DemoParams(hf_token=SecretStr(SECRET), store=StoreSettings(url=f"s3://{s3_bucket}/a"))
    state = secret_probe(params, return_state=True)
    manifest = state.result()
    assert SECRET not in str(manifest) and AWS_SECRET not in str(manifest)

    async def fetch():
        async with get_client() as client:
            run = await client.read_flow_run(state.state_details.flow_run_id)
            logs = await client.read_logs(LogFilter(flow_run_id=LogFilterFlowRunId(any_=[run.id])))
            arts = await client.read_artifacts()
            return run, logs, arts

    run, logs, arts = asyncio.run(fetch())
    assert run.parameters["params"]["repo"] == "org/model"  # parameters are recorded...
    visible = str(run.parameters) + " ".join(l.message for l in logs) + " ".join(str(a.data) for a in arts)
    assert any("probe" in str(a.description) for a in arts)
    assert SECRET not in visible and AWS_SECRET not in visible  # ...without the secrets
    assert SECRET not in caplog.text and AWS_SECRET not in caplog.text


def test_cli_ls_show_gc(tmp_path):
    url = (tmp_path / "store").as_uri()
    store = ArtifactStore(url)
    parent = run_stage(store, stage="download", code_version="1", kind="hf-checkpoint", name="org/m", params={},
                       build=lambda out: (out / "config.json").write_text("{}") and None).manifest
    child = run_stage(store, stage="convert", code_version="1", kind="megatron-checkpoint", name="org/m",
                      params={"dtype": "bf16"}, inputs=[parent],
                      build=lambda out: (out / "w.bin").write_bytes(b"0" * 2048) and None).manifest
    store.backend.put_bytes(store.prefix("dataset", "d", "ab" * 10) + "/part.bin", b"x")
    runner = CliRunner()
    env = {"GPTOSS_STORE": url, "COLUMNS": "200", "GPTOSS_WORKDIR": str(tmp_path / "work")}
    out = runner.invoke(app, ["artifacts", "ls"], env=env)
    assert out.exit_code == 0, out.output
    assert parent.version in out.output and child.version in out.output
    out = runner.invoke(app, ["artifacts", "ls", "hf-checkpoint"], env=env)
    assert parent.version in out.output and child.version not in out.output
    out = runner.invoke(app, ["artifacts", "show", "megatron-checkpoint/org/m"], env=env)
    assert out.exit_code == 0, out.output
    assert "lineage" in out.output and f"hf-checkpoint/org/m@{parent.version}" in out.output
    out = runner.invoke(app, ["artifacts", "show", "--json", f"hf-checkpoint/org/m@{parent.version}"], env=env)
    assert '"stage": "download"' in out.output
    out = runner.invoke(app, ["artifacts", "show", "hf-checkpoint/../etc"], env=env)
    assert out.exit_code == 1 and "invalid artifact name" in out.stderr
    out = runner.invoke(app, ["artifacts", "gc", "--older-than", "0s"], env=env)
    assert "removed 1 incomplete version" in out.output
    assert store.get_manifest("megatron-checkpoint", "org/m", child.version) is not None
    assert parse_duration("24h") == 86400 and parse_duration("90") == 90


@pytest.mark.prefect
def test_s3_credentials_from_a_secret_block_alone(prefect_harness, s3_endpoint, s3_bucket, tmp_path, monkeypatch):
    """A worker with no AWS credentials of its own reaches the S3 store with the keys of the Secret
    block its parameters name (docs/operate.md); the keys appear in no manifest, parameter or log."""
    from prefect.blocks.system import Secret
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import LogFilter, LogFilterFlowRunId

    block_key, block_secret = "AKIABLOCKONLY0001", "bLoCk-SeCrEt-kEy-0123456789"
    for var in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_PROFILE"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "none"))
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "none"))
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    url = f"s3://{s3_bucket}/team"
    with pytest.raises(Exception, match="(?i)credentials"):  # nothing else to sign requests with
        StoreSettings(url=url, s3_endpoint_url=s3_endpoint).open().list("hf-checkpoint")

    Secret(value={"aws_access_key_id": block_key, "aws_secret_access_key": block_secret}).save("team-s3", overwrite=True)
    params = DemoParams(store=StoreSettings(url=url, s3_endpoint_url=s3_endpoint, credentials_block="team-s3"))
    state = secret_probe(params, return_state=True)
    manifest = state.result()
    store = params.store.open()
    assert [m.version for m in store.list("hf-checkpoint")] == [manifest["version"]]
    raw = store.backend.get_bytes(f"{store.prefix('hf-checkpoint', 'org/model', manifest['version'])}/MANIFEST.json")

    async def fetch():
        async with get_client() as client:
            run = await client.read_flow_run(state.state_details.flow_run_id)
            logs = await client.read_logs(LogFilter(flow_run_id=LogFilterFlowRunId(any_=[run.id])))
            return run, logs

    run, logs = asyncio.run(fetch())
    assert run.parameters["params"]["store"]["credentials_block"] == "team-s3"
    visible = raw.decode() + str(run.parameters) + " ".join(l.message for l in logs)
    assert block_secret not in visible and block_key not in visible
    # the server's database holds the block (encrypted) and the run, never the key in clear
    db_files = _prefect_database_files()
    assert any(str(run.id).replace("-", "").encode() in f.read_bytes() or str(run.id).encode() in f.read_bytes()
               for f in db_files), f"flow run {run.id} is not in {db_files}: not the server's database"
    assert not any(block_secret.encode() in f.read_bytes() for f in db_files), db_files


def _prefect_database_files() -> list[Path]:
    from prefect.settings import get_current_settings

    url = get_current_settings().server.database.connection_url.get_secret_value()
    db = Path(url.split(":///", 1)[1])
    return [f for f in (db, db.with_name(db.name + "-wal")) if f.is_file()]
