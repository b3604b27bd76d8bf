"""The README's "Deploy on a Prefect server" block, run command by command.

The test reads the block out of README.md and executes its lines as written:
`export` lines set the environment, lines marked "its own terminal" start in
the background (server, worker), every other line must exit 0. Only the
placeholders change: the port, the bucket and the S3 endpoint (a moto server),
and the Hub (HF_ENDPOINT points at the local test Hub serving a tiny
checkpoint as openai/gpt-oss-20b). So the nightly deployment's defaults
(download -> convert) run exactly as a user would start them, with no Prefect
block.
"""
from __future__ import annotations

import os
import re
import shlex
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
README = ROOT / "README.md"
SECTION = "## Deploy on a Prefect server"


def readme_deploy_commands() -> list[str]:
    text = README.read_text()
    assert SECTION in text, f"README.md lost its {SECTION!r} section"
    block = re.search(r"```bash\n(.*?)```", text[text.index(SECTION):], re.S)
    return [ln for ln in block.group(1).splitlines() if ln.strip() and not ln.lstrip().startswith("#")]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait_healthy(url: str, server: subprocess.Popen, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert server.poll() is None, "prefect server exited"
        try:
            with urllib.request.urlopen(f"{url}/health", timeout=2) as r:
                if r.status == 200:
                    return
        except OSError:
            pass
        time.sleep(0.5)
    raise TimeoutError(f"prefect server at {url} not healthy after {timeout} s")


def _stop(proc: subprocess.Popen) -> None:
    # The worker ignores one SIGINT/SIGTERM; its process group goes down with SIGKILL after a grace period.
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=10)


@pytest.fixture(params=["sqlite", "postgresql"])
def prefect_database(request) -> str | None:
    """The server's database: its embedded SQLite, or a throwaway PostgreSQL cluster (the team set-up
    of docs/operate.md) given as PREFECT_API_DATABASE_CONNECTION_URL; None for SQLite."""
    if request.param == "sqlite":
        yield None
        return
    from tests.infra.postgres import postgres_binaries, throwaway_postgres

    if postgres_binaries() is None:
        pytest.skip("PostgreSQL-backed Prefect server not tested: no PostgreSQL binaries (initdb) here")
    with throwaway_postgres() as url:
        yield url


def _flow_runs_in(url: str) -> int:
    import asyncio

    import asyncpg

    async def count() -> int:
        connection = await asyncpg.connect(url.replace("postgresql+asyncpg://", "postgresql://"))
        try:
            return await connection.fetchval("SELECT count(*) FROM flow_run WHERE state_type = 'COMPLETED'")
        finally:
            await connection.close()

    return asyncio.run(count())


def _put_corpus(endpoint: str, bucket: str, key: str) -> None:
    import boto3
    import zstandard

    s3 = boto3.client("s3", endpoint_url=endpoint)
    if bucket not in {b["Name"] for b in s3.list_buckets()["Buckets"]}:
        s3.create_bucket(Bucket=bucket)
    text = (ROOT / "configs" / "demo-corpus.jsonl").read_bytes()
    s3.put_object(Bucket=bucket, Key=key, Body=zstandard.ZstdCompressor().compress(text))


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_readme_deployment_steps_run_the_nightly_deployment(tmp_path, s3_endpoint, s3_bucket, prefect_database):
    from gptoss_model.checkpoint.tiny import write_tiny_checkpoint
    from tasks.store import ArtifactStore
    from tests.hub_server import HubServer

    port = _free_port()
    placeholders = {"4200": str(port), "s3://my-bucket/gptoss": f"s3://{s3_bucket}/gptoss",
                    "http://minio:9000": s3_endpoint}
    env = {**os.environ, "PREFECT_HOME": str(tmp_path / "prefect-home"), "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
           "DO_NOT_TRACK": "1", "PREFECT_WORKER_QUERY_SECONDS": "2",
           "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    for var in ("PREFECT_API_URL", "GPTOSS_STORE", "GPTOSS_S3_ENDPOINT_URL", "GPTOSS_WORKDIR", "HF_TOKEN"):
        env.pop(var, None)
    env["GPTOSS_WORKDIR"] = str(tmp_path / "work")
    env.pop("PREFECT_API_DATABASE_CONNECTION_URL", None)
    if prefect_database is not None:  # what docs/operate.md has the server's terminal export
        env["PREFECT_API_DATABASE_CONNECTION_URL"] = prefect_database
    _put_corpus(s3_endpoint, "corpora", "web/part-000.jsonl.zst")  # what the preprocess deployment reads
    background: list[subprocess.Popen] = []
    logs = tmp_path / "logs"
    logs.mkdir()
    with HubServer() as hub:
        hub.add_repo("openai/gpt-oss-20b", write_tiny_checkpoint(tmp_path / "tiny", dtype="bfloat16", seed=3))
        env["HF_ENDPOINT"] = hub.endpoint
        try:
            for line in readme_deploy_commands():
                command, _, comment = line.partition("  #")
                for placeholder, value in placeholders.items():
                    command = command.replace(placeholder, value)
                argv = shlex.split(command)
                started = time.monotonic()
                if argv[0] == "export":
                    for assignment in argv[1:]:
                        key, _, value = assignment.partition("=")
                        env[key] = value
                elif "its own terminal" in comment:
                    out = open(logs / f"{argv[1]}.log", "w")
                    proc = subprocess.Popen(argv, cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT,
                                            start_new_session=True)
                    background.append(proc)
                    if argv[1] == "server":
                        _wait_healthy(f"http://127.0.0.1:{port}/api", proc)
                else:
                    done = subprocess.run(argv, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
                    worker_log = (logs / "worker.log").read_text() if (logs / "worker.log").exists() else ""
                    assert done.returncode == 0, (f"{command!r} failed:\n{done.stdout[-4000:]}\n"
                                                  f"{done.stderr[-4000:]}\nworker:\n{worker_log[-6000:]}")
                print(f"{time.monotonic() - started:6.1f} s  {command.strip()}")
        finally:
            for proc in reversed(background):
                _stop(proc)
    assert [p.args[1] for p in background] == ["server", "worker"]
    store = ArtifactStore(f"s3://{s3_bucket}/gptoss", s3_endpoint_url=s3_endpoint)
    checkpoint = store.resolve("hf-checkpoint", "openai/gpt-oss-20b")  # what the watched run committed
    assert {"config.json", "model.safetensors.index.json"} <= {f.path for f in checkpoint.files}
    megatron = store.resolve("megatron-checkpoint", "openai/gpt-oss-20b")
    assert [i.version for i in megatron.inputs] == [checkpoint.version]
    dataset = store.resolve("dataset", "web")  # preprocess's deployment run alone
    assert [i.version for i in dataset.inputs] == [checkpoint.version] and dataset.metrics.get("data_prefixes")
    assert "Completed" in done.stdout + done.stderr
    if prefect_database is not None:  # the runs live in PostgreSQL, and no SQLite file was made
        assert _flow_runs_in(prefect_database) >= 3  # the watched pipeline run and its two stage subflows
        assert not list((tmp_path / "prefect-home").glob("*.db"))
