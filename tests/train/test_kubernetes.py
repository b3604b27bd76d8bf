"""The Kubernetes launcher without a cluster (none can run here).

Manifests: the rendered Service + Indexed Job of the tiny run and of the 20B/120B recipes at node
counts their pre-flight accepts, compared with checked-in files and validated offline against the
Kubernetes 1.31 API schema (kubernetes-validate, strict: unknown fields are errors). Following and
stopping: against an HTTP-level fake API server (tests/infra/fake_kube.py) reached by the official
client, as a kubeconfig or a `Configuration(host=...)` points it."""
from __future__ import annotations

import os
import subprocess
import threading
import time
from pathlib import Path

import kubernetes_validate
import pytest
import yaml

from gptoss_model.errors import PermanentError
from gptoss_model.training.kubernetes import KubernetesJobRefused, manifest_text, render, run_job
from gptoss_model.training.launchers import KubernetesLaunch, launch_problems
from tests.infra.fake_kube import FakeKube, Scenario

GOLDEN = Path(__file__).parent / "golden"
SCHEMA_VERSION = "1.31"  # the oldest Kubernetes still in upstream support when this was written
IMAGE = "registry.example.com/gptoss-pipeline:0.1.0"
H100 = dict(gpus_per_node=8, procs_per_node=8, node_selector={"nvidia.com/gpu.product": "NVIDIA-H100-80GB-HBM3"},
            tolerations=[{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}])
# (recipe, launcher): 20B pretraining is TP2 x PP4 x EP4 (16 GPUs at least); 120B LoRA finetuning
# is TP1 x PP4 x EP8, so ETP*EP*PP = 32 GPUs at least.
CASES = {
    "tiny": ("tiny_pretrain", KubernetesLaunch(nodes=2, procs_per_node=1, namespace="ml-train", image=IMAGE,
                                               checkpoint_volume_claim="gptoss-runs")),
    "gpt_oss_20b_pretrain": ("gpt_oss_20b_pretrain", KubernetesLaunch(
        nodes=2, namespace="ml-train", image=IMAGE, service_account="gptoss-trainer",
        checkpoint_volume_claim="gptoss-runs", env=["HF_TOKEN"], env_from_secret="gptoss-hf",
        env_from_config_map="nccl-tuning", **H100)),
    "gpt_oss_120b_finetune": ("gpt_oss_120b_finetune", KubernetesLaunch(
        nodes=4, namespace="ml-train", image=IMAGE, checkpoint_volume_claim="gptoss-runs", env=["HF_TOKEN"],
        env_from_secret="gptoss-hf", **H100)),
}


def _config_path(case: str) -> Path:
    return Path(f"/mnt/gptoss/work/train-{case.replace('_', '-')}/run_config.yaml")


@pytest.mark.parametrize("case", CASES)
def test_manifests_match_the_golden_files_and_the_kubernetes_schema(case):
    from gptoss_model.training.plan import plan
    from gptoss_model.training.recipes import recipe

    name, launch = CASES[case]
    assert launch_problems(launch) == []
    plan(recipe(name), launch.nodes * launch.procs_per_node, "h100")  # pre-flight accepts this world size
    docs = render(launch, config_yaml=_config_path(case), name=f"gptoss-{case.replace('_', '-')}-0a1b2c")
    text = manifest_text(docs)
    golden = GOLDEN / f"kubernetes-{case}.yaml"
    if os.environ.get("GPTOSS_UPDATE_GOLDEN"):
        golden.write_text(text)
    assert text == golden.read_text(), f"{golden} differs (GPTOSS_UPDATE_GOLDEN=1 rewrites it)"
    assert list(yaml.safe_load_all(text)) == docs
    for doc in docs:
        assert kubernetes_validate.validate(doc, SCHEMA_VERSION, strict=True) == SCHEMA_VERSION
    service, job = docs
    pod = job["spec"]["template"]["spec"]
    assert job["spec"]["completionMode"] == "Indexed"
    assert job["spec"]["completions"] == job["spec"]["parallelism"] == launch.nodes
    assert service["spec"]["clusterIP"] == "None" and pod["subdomain"] == service["metadata"]["name"]
    container = pod["containers"][0]
    assert container.get("resources", {}).get("limits", {}).get("nvidia.com/gpu") == (launch.gpus_per_node or None)
    assert all("value" not in e for e in container["env"] if e["name"] in launch.env)  # secrets by reference only
    assert pod["volumes"][0]["persistentVolumeClaim"]["claimName"] == launch.checkpoint_volume_claim


def test_the_schema_check_catches_a_misspelt_field():
    _, job = render(CASES["tiny"][1], config_yaml=_config_path("tiny"), name="gptoss-tiny-0a1b2c")
    job["spec"]["completionsMode"] = job["spec"].pop("completionMode")
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(job, SCHEMA_VERSION, strict=True)


def test_pod_zero_alone_serves_the_rendezvous(tmp_path):
    """The pod's shell script, run by sh with a `python` that prints its arguments."""
    _, job = render(CASES["gpt_oss_20b_pretrain"][1], config_yaml=Path("/runs/a b/run_config.yaml"), name="j-1")
    container = job["spec"]["template"]["spec"]["containers"][0]
    (tmp_path / "python").write_text('#!/bin/sh\nfor a in "$@"; do echo "$a"; done\n')
    (tmp_path / "python").chmod(0o755)
    for index, host in (("0", "true"), ("1", "false")):
        out = subprocess.run([*container["command"], *container["args"]], capture_output=True, text=True, check=True,
                             env={"PATH": f"{tmp_path}:/usr/bin:/bin", "JOB_COMPLETION_INDEX": index}).stdout
        args = out.splitlines()
        assert args[:3] == ["-m", "torch.distributed.run", "--nnodes"] and args[3] == "2"
        assert args[args.index("--rdzv-endpoint") + 1] == "j-1-0.j-1:29500"
        assert args[args.index("--rdzv-conf") + 1] == f"is_host={host},read_timeout=900"
        assert args[-3:] == ["-m", "gptoss_model.train", "/runs/a b/run_config.yaml"]


# ------------------------------------------------------------------ against a fake API server
@pytest.fixture
def run_config(tmp_path):
    """A run config whose inputs are on the run volume (the workdir `runs/`), as the pods need."""
    from gptoss_model.recipes import tiny_pretrain_config
    from gptoss_model.training.config import save_yaml

    run_dir = tmp_path / "runs" / "train-abc"
    run_dir.mkdir(parents=True)
    config = run_dir / "run_config.yaml"
    save_yaml(tiny_pretrain_config(data_paths=[str(tmp_path / "runs" / "data" / "text")], dir=str(run_dir)), config)
    return config


def _fake(scenario: Scenario):
    from kubernetes.client import ApiClient, Configuration

    kube = FakeKube(scenario)
    return kube, ApiClient(Configuration(host=kube.url))


def _run(kube_api, config, tmp_path, lines, **kw):
    kube, api = kube_api
    launch = KubernetesLaunch(nodes=2, image=IMAGE, namespace="ml-train", checkpoint_volume_claim="runs")
    return run_job(launch, config, run_dir=config.parent, job_name="gptoss-Tiny_Run", pid_file=tmp_path / "run.pid",
                   on_line=lines.append, api=api, interval=0.05, **kw)


def _deleted(kube: FakeKube, kind: str) -> list[dict]:
    return [q for method, path, q in kube.requests if method == "DELETE" and f"/{kind}/" in path]


RANK_LINES = {0: [f"[default0]: iteration {i} | loss {4 - i * 0.1:.1f}" for i in range(1, 6)],
              1: ["[default1]: warming up", "[default1]: done"]}


@pytest.mark.parametrize("drop", [None, 2], ids=["one-stream", "stream-dropped-and-read-again"])
def test_a_job_that_completes_streams_every_pods_log_and_returns_0(run_config, tmp_path, drop):
    kube, api = kube_api = _fake(Scenario(lines=RANK_LINES, run_s=0.8, drop_log_once_after=drop))
    try:
        lines: list[str] = []
        assert _run(kube_api, run_config, tmp_path, lines) == 0
        assert [x for x in lines if x.startswith("[default0]")] == RANK_LINES[0]  # each line once, in order
        assert [x for x in lines if x.startswith("[default1]")] == RANK_LINES[1]
        assert kube.dropped == (drop is not None)
        (ns, name), = kube.jobs  # the finished Job stays (its pods' logs) until its TTL; the Service is gone
        assert ns == "ml-train" and name.startswith("gptoss-tiny-run-") and kube.services == {}
        sent = yaml.safe_load_all((run_config.parent / "kubernetes.yaml").read_text())
        assert kube.jobs[(ns, name)] == list(sent)[1]  # what was created is the manifest beside the run
        assert not (tmp_path / "run.pid").exists()
    finally:
        kube.close()


@pytest.mark.parametrize("scenario,reason", [
    (Scenario(waiting="ImagePullBackOff", run_s=None), "ImagePullBackOff"),
    (Scenario(unschedulable="0/4 nodes are available: 4 Insufficient nvidia.com/gpu.", run_s=None),
     "Unschedulable: 0/4 nodes are available"),
])
def test_a_pod_that_cannot_start_fails_at_once_permanently_and_is_deleted(run_config, tmp_path, scenario, reason):
    kube, api = kube_api = _fake(scenario)
    try:
        started = time.monotonic()
        with pytest.raises(KubernetesJobRefused, match=reason) as caught:
            _run(kube_api, run_config, tmp_path, [])
        assert isinstance(caught.value, PermanentError) and time.monotonic() - started < 10
        assert kube.jobs == {} and kube.services == {}
        assert _deleted(kube, "jobs")[0]["propagationPolicy"] == "Foreground"
    finally:
        kube.close()


def test_an_exception_in_poll_deletes_the_job_and_the_service(run_config, tmp_path):
    kube, api = kube_api = _fake(Scenario(lines=RANK_LINES, run_s=None))
    calls = []

    def poll():
        calls.append(1)
        if len(calls) == 5:
            raise RuntimeError("the flow run was cancelled")

    try:
        with pytest.raises(RuntimeError, match="cancelled"):
            _run(kube_api, run_config, tmp_path, [], poll=poll)
        assert kube.jobs == {} and kube.services == {} and len(_deleted(kube, "jobs")) == 1
        assert not (tmp_path / "run.pid").exists()
    finally:
        kube.close()


def test_inputs_the_pods_cannot_see_are_refused_before_anything_is_created(tmp_path):
    from gptoss_model.recipes import tiny_pretrain_config
    from gptoss_model.training.config import save_yaml

    config = tmp_path / "runs" / "train-abc" / "run_config.yaml"
    config.parent.mkdir(parents=True)
    save_yaml(tiny_pretrain_config(data_paths=["/somewhere/else/text"]), config)
    kube, api = kube_api = _fake(Scenario())
    try:
        with pytest.raises(KubernetesJobRefused, match="data.data_paths: /somewhere/else/text is outside"):
            _run(kube_api, config, tmp_path, [])
        assert kube.requests == []
    finally:
        kube.close()


@pytest.fixture
def kubeconfig(tmp_path, monkeypatch):
    """The launcher's own way to find a cluster (no `api` passed): a kubeconfig naming the fake."""
    def point_at(kube: FakeKube) -> None:
        monkeypatch.delenv("KUBERNETES_SERVICE_HOST", raising=False)  # never the cluster this may run in
        monkeypatch.setenv("KUBECONFIG", kube.kubeconfig(tmp_path / "kubeconfig"))
    return point_at


def test_kill_from_the_pid_file_deletes_the_job(run_config, tmp_path, kubeconfig):
    from gptoss_model.training.launch import kill_from_pid_file

    kube, api = kube_api = _fake(Scenario(lines=RANK_LINES, run_s=None))
    kubeconfig(kube)
    ended: list[BaseException] = []

    def submit():
        try:
            _run(kube_api, run_config, tmp_path, [])
        except BaseException as e:  # noqa: BLE001 - what the run ended with is the assertion
            ended.append(e)

    thread = threading.Thread(target=submit)
    thread.start()
    try:
        deadline = time.monotonic() + 20
        while not kube.jobs and time.monotonic() < deadline:
            time.sleep(0.05)
        (ns, name), = kube.jobs
        assert (tmp_path / "run.pid").read_text() == f"kubernetes:{ns}/{name}"
        assert kill_from_pid_file(tmp_path / "run.pid") is True
        assert kube.jobs == {} and kube.services == {}
        assert _deleted(kube, "jobs")[0]["propagationPolicy"] == "Foreground"
        thread.join(timeout=20)
        assert len(ended) == 1 and isinstance(ended[0], KubernetesJobRefused), ended
        assert "deleted outside this run" in str(ended[0])
    finally:
        kube.close()


def test_a_failed_rank_s_exit_code_is_classified_by_supervise(run_config, tmp_path, kubeconfig):
    """Rank 1 stopped on a non-finite loss (exit 3): the Job fails, its container's exit code and
    torchrun's report come back, and the error is the permanent one a local run would raise."""
    from gptoss_model.training.launch import supervise
    from gptoss_model.training.loop import NonFiniteLossError

    report = ["[default1]: error: loss is nan at iteration 3", "[1]:", "  exitcode  : 3 (pid: 41)"]
    kube = FakeKube(Scenario(lines={0: RANK_LINES[0], 1: report}, run_s=0.8, exit_codes={1: 1}))
    kubeconfig(kube)
    try:
        launch = KubernetesLaunch(nodes=2, image=IMAGE, namespace="ml-train", checkpoint_volume_claim="runs")
        with pytest.raises(NonFiniteLossError, match="non-finite"):
            supervise(run_config, launch, pid_file=tmp_path / "run.pid", poll=lambda: None, saved=lambda: [4])
        assert kube.services == {}
    finally:
        kube.close()
