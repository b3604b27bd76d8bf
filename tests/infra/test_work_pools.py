"""Stages on their own work pools, as a team deploys them: a Prefect server, two process work pools
(gptoss-cpu, gptoss-gpu) with a worker each, the deployments of infra/prefect.yaml.

- `gptoss-pipeline/demo` run with no parameters runs all six stages; train/export/verify's own
  deployments then run alone (cache hits on what the demo made);
- the pipeline sends its train stage to the gpu pool (`train: {deployment: train/gpu}`): the
  second pool's worker runs it, its result comes back into the pipeline's lineage and its key
  lines onto the pipeline run;
- cancelling the pipeline while that train run trains cancels the train run and leaves no rank.
"""
from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
import yaml

from tasks.store import ArtifactStore
from tests.infra.test_deploy_readme import _free_port, _stop, _wait_healthy

ROOT = Path(__file__).resolve().parents[2]
pytestmark = [pytest.mark.slow, pytest.mark.prefect]


@pytest.fixture(scope="module")
def team(tmp_path_factory):
    from flows.cli import ensure_demo_source

    ensure_demo_source(ROOT / ".gptoss" / "demo" / "tiny-gpt-oss")  # what `make demo` writes first
    root = tmp_path_factory.mktemp("team")
    port = _free_port()
    api = f"http://127.0.0.1:{port}/api"
    env = {**os.environ, "PREFECT_HOME": str(root / "prefect-home"), "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
           "DO_NOT_TRACK": "1", "PREFECT_WORKER_QUERY_SECONDS": "1", "OMP_NUM_THREADS": "1",
           "PREFECT_SERVER_SERVICES_CANCELLATION_CLEANUP_LOOP_SECONDS": "2",
           "GPTOSS_STORE": (root / "store").as_uri(), "GPTOSS_WORKDIR": str(root / "work"),
           "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    for var in ("PREFECT_API_URL", "GPTOSS_S3_ENDPOINT_URL", "HF_TOKEN", "PREFECT_API_DATABASE_CONNECTION_URL"):
        env.pop(var, None)
    logs = root / "logs"
    logs.mkdir()
    background: list[subprocess.Popen] = []

    def start(name: str, *argv: str) -> None:
        background.append(subprocess.Popen(argv, cwd=ROOT, env=env, stdout=(logs / f"{name}.log").open("w"),
                                           stderr=subprocess.STDOUT, start_new_session=True))

    def run(*argv: str, timeout: float = 300) -> subprocess.CompletedProcess:
        done = subprocess.run(argv, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)
        assert done.returncode == 0, (f"{' '.join(argv)} failed:\n{done.stdout[-4000:]}\n{done.stderr[-4000:]}\n"
                                      + "\n".join(f"{p.name}:\n{p.read_text()[-3000:]}" for p in logs.iterdir()))
        return done

    try:
        # docs/operate.md, "The UI on another port": the server's terminal names the API for browsers
        start("server", "env", f"PREFECT_UI_API_URL={api}", "prefect", "server", "start", "--host", "127.0.0.1",
              "--port", str(port))
        _wait_healthy(api, background[0])
        env["PREFECT_API_URL"] = api
        for pool in ("gptoss-cpu", "gptoss-gpu"):
            run("prefect", "work-pool", "create", pool, "--type", "process")
            start(pool, "prefect", "worker", "start", "--pool", pool, "--name", f"{pool}-worker")
        run("prefect", "--no-prompt", "deploy", "--all", "--prefect-file", "infra/prefect.yaml")
        yield {"env": env, "api": api, "run": run, "logs": logs, "store": root / "store", "work": root / "work"}
    finally:
        for proc in reversed(background):
            _stop(proc)


def test_the_ui_finds_the_api_on_a_port_other_than_4200(team):
    import json
    import urllib.request

    root = team["api"].removesuffix("/api")
    with urllib.request.urlopen(f"{root}/ui-settings", timeout=10) as answer:
        ui = json.load(answer)
    assert ui["api_url"] == team["api"] and not team["api"].endswith(":4200/api"), ui


@pytest.fixture
def client(team):
    from prefect.client.orchestration import get_client
    from prefect.settings import PREFECT_API_URL, temporary_settings

    with temporary_settings({PREFECT_API_URL: team["api"]}), get_client(sync_client=True) as c:
        yield c


def _kinds_in(store_dir: Path) -> set[str]:
    store = ArtifactStore(store_dir.as_uri())
    return {kind for kind in ("hf-checkpoint", "megatron-checkpoint", "dataset", "train-checkpoint", "hf-export",
                              "verify-report") if store.list(kind)}


def test_the_demo_deployment_runs_all_six_stages_and_each_stage_deployment_alone(team):
    """Each stage's `demo` deployment, run alone after the pipeline's, is a cache hit: its defaults
    are exactly what the demo pipeline ran."""
    started = time.monotonic()
    done = team["run"]("prefect", "deployment", "run", "gptoss-pipeline/demo", "--watch")
    assert "Completed" in done.stdout + done.stderr
    assert _kinds_in(team["store"]) == {"hf-checkpoint", "megatron-checkpoint", "dataset", "train-checkpoint",
                                        "hf-export", "verify-report"}
    took = {"gptoss-pipeline/demo": time.monotonic() - started}
    for alone in ("download/demo", "convert/demo", "preprocess/demo", "train/demo", "export/demo",
                  "verify/demo"):  # each stage alone: their defaults name the demo's source and artifacts
        started = time.monotonic()
        done = team["run"]("prefect", "deployment", "run", alone, "--watch")
        assert "Completed" in done.stdout + done.stderr, done.stdout[-2000:]
        took[alone] = time.monotonic() - started
    kinds = ("hf-checkpoint", "megatron-checkpoint", "dataset", "train-checkpoint", "hf-export", "verify-report")
    store = ArtifactStore(team["store"].as_uri())
    versions = {kind: sorted({m.spec for m in store.list(kind)}) for kind in kinds}
    saves = 2  # train: one version per checkpoint, iterations 6 and 12
    assert {k: len(v) for k, v in versions.items()} == {k: saves if k == "train-checkpoint" else 1 for k in kinds}, \
        versions  # nothing new: each stage alone was a cache hit
    print("\n" + "\n".join(f"{name}: completed in {s:.1f} s" for name, s in took.items()))


def _pipeline_params(**train) -> dict:
    params = yaml.safe_load((ROOT / "configs" / "demo.yaml").read_text())
    params["train"] = {**params["train"], "deployment": "train/gpu", **train}
    return {"params": params}


def _children(client, parent_id) -> list:
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterParentFlowRunId

    return client.read_flow_runs(flow_run_filter=FlowRunFilter(
        parent_flow_run_id=FlowRunFilterParentFlowRunId(any_=[parent_id])))


def _wait_final(client, flow_run_id, timeout: float = 300):
    deadline = time.monotonic() + timeout
    while not (flow_run := client.read_flow_run(flow_run_id)).state.is_final():
        assert time.monotonic() < deadline, f"flow run {flow_run.name} stuck in {flow_run.state.name}"
        time.sleep(1)
    return flow_run


def test_the_pipeline_sends_train_to_the_gpu_pool(team, client):
    from prefect.deployments import run_deployment

    pipeline = run_deployment("gptoss-pipeline/demo-train-on-gpu-pool", timeout=0)
    pipeline = _wait_final(client, pipeline.id)
    assert pipeline.state.is_completed(), pipeline.state
    trains = [r for r in _children(client, pipeline.id) if r.deployment_id is not None]
    assert len(trains) == 1 and trains[0].work_pool_name == "gptoss-gpu", trains
    train = trains[0]
    assert train.state.is_completed() and train.work_queue_name == "default"
    gpu_log, cpu_log = ((team["logs"] / f"{p}.log").read_text() for p in ("gptoss-gpu", "gptoss-cpu"))
    assert str(train.id) in gpu_log and str(train.id) not in cpu_log  # the second pool's worker ran it
    assert str(pipeline.id) in cpu_log
    def relayed(lines: list[str]) -> bool:
        return (any(m.startswith("train/gpu: train-checkpoint/demo/tiny-gpt-oss-tiny_pretrain@") for m in lines)
                and any("train: train-checkpoint/" in m for m in lines))  # the stage's own key line, relayed

    deadline = time.monotonic() + 30  # a finished run's last log batch may still be on its way
    while not relayed(lines := _all_log_lines(client, pipeline.id)) and time.monotonic() < deadline:
        time.sleep(1)
    assert relayed(lines), lines[-40:]
    lineage = client.read_artifacts(key="gptoss-pipeline-lineage")
    assert any("train-checkpoint/demo/tiny-gpt-oss-tiny_pretrain" in str(a.data) for a in lineage
               if a.flow_run_id == pipeline.id)
    print(f"\ntrain ran as {train.name} on gptoss-gpu (its worker), the rest on gptoss-cpu; the pipeline completed")


def _all_log_lines(client, flow_run_id, page: int = 200) -> list[str]:
    """Every log line of a flow run, page by page (the API returns at most `page` a call)."""
    from prefect.client.schemas.filters import LogFilter, LogFilterFlowRunId

    lines: list[str] = []
    while True:
        batch = client.read_logs(LogFilter(flow_run_id=LogFilterFlowRunId(any_=[flow_run_id])), limit=page,
                                 offset=len(lines))
        lines += [m.message for m in batch]
        if len(batch) < page:
            return lines


def _ranks_under(work: Path) -> list[psutil.Process]:
    found = []
    for p in psutil.process_iter(["cmdline"]):
        cmd = " ".join(p.info["cmdline"] or [])
        if ("gptoss_model.train" in cmd or "torch.distributed.run" in cmd) and str(work) in cmd:
            found.append(p)
    return found


def test_cancelling_the_pipeline_cancels_its_train_run_on_the_other_pool(team, client):
    from prefect.deployments import run_deployment
    from prefect.states import Cancelling

    params = _pipeline_params(name="long-training", overrides={"train.train_iters": 5000, "train.eval_interval": 0,
                                                               "checkpoint.save_interval": 5000})
    pipeline = run_deployment("gptoss-pipeline/demo-train-on-gpu-pool", parameters=params, timeout=0)
    deadline = time.monotonic() + 240
    while not (ranks := _ranks_under(team["work"])):
        state = client.read_flow_run(pipeline.id).state
        assert not state.is_final() and time.monotonic() < deadline, f"training never started ({state.name})"
        time.sleep(1)
    time.sleep(3)  # training
    (train,) = [r for r in _children(client, pipeline.id) if r.deployment_id is not None]
    cancelled_at = time.monotonic()
    client.set_flow_run_state(pipeline.id, Cancelling(), force=True)  # what `prefect flow-run cancel` does
    train = _wait_final(client, train.id, timeout=120)
    train_gone = time.monotonic() - cancelled_at
    assert train.state.is_cancelled(), train.state
    _, alive = psutil.wait_procs(ranks, timeout=30)
    assert not alive and not _ranks_under(team["work"]), [p.cmdline()[:5] for p in _ranks_under(team["work"])]
    assert _wait_final(client, pipeline.id, timeout=60).state.is_cancelled()
    print(f"\npipeline cancelled: its train run on gptoss-gpu {train.state.name} {train_gone:.1f} s later "
          f"({train.state.message!r}), no torchrun or rank left")


def test_the_continued_pretraining_smoke_deployment_runs_offline(team):
    """Its defaults: the demo's tiny checkpoint and configs/nightly-smoke/*.jsonl, nothing from the
    network; download and convert are the demo's (cache hits), training starts from the converted
    base the first time (tests/e2e/test_continued_pretraining.py follows it over several nights)."""
    started = time.monotonic()
    done = team["run"]("prefect", "deployment", "run", "gptoss-pipeline/continued-pretraining-smoke", "--watch")
    assert "Completed" in done.stdout + done.stderr
    store = ArtifactStore(team["store"].as_uri())
    trained = store.resolve("train-checkpoint", "demo/tiny-gpt-oss-continued")
    assert {i.kind for i in trained.inputs} == {"megatron-checkpoint", "dataset"}
    assert len({m.version for m in store.list("megatron-checkpoint")}) == 1  # convert: the demo's, a cache hit
    print(f"\ncontinued-pretraining-smoke: {trained.spec} in {time.monotonic() - started:.1f} s")


def test_a_wrong_deployment_fails_the_pipeline_before_any_stage_runs(team, client, tmp_path):
    from flows.pipeline import PipelineParams, gptoss_pipeline
    from flows.routing import StageDeploymentFailed

    params = _pipeline_params()["params"]
    params["train"]["deployment"] = "export/demo"  # another stage's deployment
    params["export"]["deployment"] = "export/nightly-gpu"  # not deployed
    for section in ("download", "convert", "preprocess", "train", "export"):
        params[section]["store"] = {"url": (tmp_path / "store").as_uri()}
    with pytest.raises(StageDeploymentFailed) as refused:
        gptoss_pipeline(PipelineParams.model_validate(params))
    from prefect.logging.handlers import APILogHandler

    APILogHandler().flush()  # while the team's server is up: nothing left to send to it once it stops
    message = str(refused.value)
    assert "train.deployment: 'export/demo' is not a train deployment" in message, message
    assert "export.deployment: no deployment 'export/nightly-gpu' on this Prefect server" in message, message
    assert not (tmp_path / "store").exists()  # no stage ran
