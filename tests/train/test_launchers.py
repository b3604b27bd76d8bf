"""Launchers: bad launch configs are refused before anything starts, naming the field; several
torchrun agents on this host (c10d on 127.0.0.1) train exactly like one agent with as many processes."""
from __future__ import annotations

import os
import threading
from pathlib import Path

import pytest

from gptoss_model.training.launchers import KubernetesLaunch, LocalLaunch, SlurmLaunch, launch_problems

REPO = Path(__file__).resolve().parents[2]

BAD = [
    (LocalLaunch(nodes=0), "launcher.nodes"),
    (LocalLaunch(procs_per_node=0), "launcher.procs_per_node"),
    (LocalLaunch(max_restarts=-1), "launcher.max_restarts"),
    (SlurmLaunch(max_restarts=-2), "launcher.max_restarts: -2: 0 or more"),
    (LocalLaunch(env=["NOT A NAME"]), "launcher.env: 'NOT A NAME'"),
    (LocalLaunch(env=["HF_TOKEN=hf_abc"]), "launcher.env: 'HF_TOKEN' given with a value"),
    (SlurmLaunch(time_limit="two hours"), "launcher.time_limit"),
    (SlurmLaunch(partition="gpu"), "launcher.partition: 'gpu' is not a partition of this cluster"),
    (SlurmLaunch(partition="a b"), "launcher.partition"),
    (SlurmLaunch(procs_per_node=8, gpus_per_node=4), "launcher.gpus_per_node: 4 GPUs for 8 processes"),
    (SlurmLaunch(rdzv_port=80), "launcher.rdzv_port"),
    (SlurmLaunch(env=["AWS_SECRET_ACCESS_KEY=x"]), "launcher.env: 'AWS_SECRET_ACCESS_KEY' given with a value"),
    (KubernetesLaunch(), "launcher.image"),
    (KubernetesLaunch(image="img:1"), "launcher.checkpoint_volume_claim: a ReadWriteMany"),
    (KubernetesLaunch(image="img:1", namespace="ML_Team"), "launcher.namespace: 'ML_Team'"),
    (KubernetesLaunch(image="img:1", procs_per_node=8, gpus_per_node=2), "launcher.gpus_per_node: 2 GPUs for 8"),
    (KubernetesLaunch(image="img:1", rdzv_port=70000), "launcher.rdzv_port"),
    (KubernetesLaunch(image="img:1", env_from_secret="hf", env=["HF_TOKEN=hf_abc"]),
     "launcher.env: 'HF_TOKEN' given with a value"),
    (KubernetesLaunch(image="img:1", env=["HF_TOKEN"]), "launcher.env: ['HF_TOKEN']: each name is taken from"),
    (KubernetesLaunch(image="img:1", checkpoint_volume_claim="Runs PVC"), "launcher.checkpoint_volume_claim"),
    (KubernetesLaunch(image="img:1", node_selector={"gpu type": "h100"}), "launcher.node_selector"),
    (KubernetesLaunch(image="img:1", tolerations=[{"key": "gpu", "effect": "NoWhere"}]),
     "launcher.tolerations[0].effect"),
    (KubernetesLaunch(image="img:1", tolerations=[{"taint": "gpu"}]), "launcher.tolerations[0]: unknown keys"),
    ("ray", "launcher.kind: 'ray' is not a launcher"),
]


@pytest.mark.parametrize("launch,named", BAD, ids=[named.split(":")[0] + f"-{i}" for i, (_, named) in enumerate(BAD)])
def test_a_bad_launch_config_is_refused_naming_the_field(launch, named):
    problems = launch_problems(launch, partitions=["debug"])
    assert any(p.startswith(named) for p in problems), problems


def test_good_launch_configs_pass():
    for launch in (LocalLaunch(), LocalLaunch(nodes=2, env=["NCCL_DEBUG", "HF_TOKEN"]),
                   SlurmLaunch(nodes=2, procs_per_node=8, gpus_per_node=8, partition="debug", time_limit="1-00:00"),
                   KubernetesLaunch(nodes=4, procs_per_node=8, gpus_per_node=8, namespace="ml-train",
                                    image="registry.example.com/gptoss-pipeline:0.1.0", checkpoint_volume_claim="runs",
                                    node_selector={"nvidia.com/gpu.product": "NVIDIA-H100-80GB-HBM3"},
                                    tolerations=[{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}],
                                    env=["HF_TOKEN"], env_from_secret="hf-token")):
        assert launch_problems(launch, partitions=["debug"]) == []


def test_the_train_stage_refuses_a_bad_launcher_before_the_store_is_asked(tmp_path):
    from tasks.train import TrainParams

    with pytest.raises(ValueError, match="launcher.nodes"):
        TrainParams(recipe="tiny_pretrain", name="x", launcher={"kind": "local", "nodes": 0},
                    store={"url": f"file://{tmp_path}/nowhere"})
    with pytest.raises(ValueError, match="launcher"):
        TrainParams(recipe="tiny_pretrain", name="x", launcher={"kind": "ray"})
    with pytest.raises(ValueError, match="launcher.image"):
        TrainParams(recipe="tiny_pretrain", name="x", launcher={"kind": "kubernetes", "nodes": 2})
    params = TrainParams(recipe="tiny_pretrain", name="x", launcher={"kind": "kubernetes", "image": "img:1",
                                                                   "checkpoint_volume_claim": "runs"},
                         store={"url": f"file://{tmp_path}/nowhere"})
    assert isinstance(params.launch(), KubernetesLaunch)


LAYOUTS = {"tp2_sp": ["parallelism.tensor_model_parallel_size=2", "parallelism.sequence_parallel=true"],
           "ep2": ["parallelism.expert_model_parallel_size=2"]}


@pytest.mark.distributed
@pytest.mark.slow
@pytest.mark.parametrize("layout", LAYOUTS)
def test_two_agents_train_exactly_like_one_agent_with_two_processes(train_env, tmp_path, layout):
    from gptoss_model.training.config import apply_overrides, load_yaml, save_yaml
    from gptoss_model.training.launch import launch
    from gptoss_model.training.metrics import read_metrics

    steps = 8
    got = {}
    digests = _input_digests(train_env, tmp_path / "inputs.sha256.json")
    for nodes, procs in ((1, 2), (2, 1)):
        run_dir = tmp_path / f"{nodes}x{procs}"
        config = tmp_path / f"{nodes}x{procs}.yaml"
        save_yaml(apply_overrides(load_yaml(train_env["config"]), [
            f"dir={run_dir}", f"train.train_iters={steps}", "train.eval_interval=0", "checkpoint.save_interval=0",
            "checkpoint.save_final=false", f"train.input_digests={digests}", *LAYOUTS[layout]]), config)
        lines: list[str] = []
        rc = launch(config, nproc_per_node=procs, nnodes=nodes, pid_file=tmp_path / f"{nodes}x{procs}.pid",
                    on_line=lines.append, env={"PYTHONPATH": str(REPO), "PYTHONWARNINGS": "ignore"}, cwd=REPO)
        assert rc == 0, "\n".join(lines[-40:])
        got[nodes] = [(r["iteration"], r["loss"], r["grad_norm"]) for r in read_metrics(run_dir / "metrics.jsonl")
                      if "loss" in r]
        # lines carry the global rank, so rank 0 (which speaks for the run) is one process on any node
        assert any(line.startswith("[default0]:") for line in lines), lines[-20:]
        assert any(line.startswith("[default1]:") for line in lines), lines[-20:]
        # the first process of each node hashed the inputs, once per node: 2 agents, 2 checks; 1 agent, 1
        checked = [line for line in lines if "inputs verified once per node" in line]
        assert len(checked) == 1 and f"{nodes} node(s) x " in checked[0], checked or lines[-20:]
    assert len(got[2]) == steps and got[2] == got[1], (got[1], got[2])
    print(f"\n{layout}: 2 agents x 1 process == 1 agent x 2 processes over {steps} steps, bitwise "
          f"(last loss {got[2][-1][1]:.8f})")
    assert os.environ.get("TORCHELASTIC_LOG_LINE_PREFIX_TEMPLATE") is None  # set for the children only


def _input_digests(train_env, path: Path, *, spoil: str | None = None) -> Path:
    """The digest list of the tiny dataset and checkpoint, as the train stage writes it; `spoil`
    (a file name) gets a wrong sha256, as a node whose shared copy went stale would see it."""
    import hashlib

    from gptoss_model.training.input_digests import InputFile, write_digests

    files = [Path(p + ext) for p in train_env["prefixes"] for ext in (".bin", ".idx")]
    files += sorted(f for f in Path(train_env["ckpt"]).iterdir() if f.is_file())
    write_digests(path, (InputFile(str(f), f.stat().st_size, "0" * 64 if f.name == spoil else
                                   hashlib.sha256(f.read_bytes()).hexdigest(), "test/inputs@v1") for f in files))
    return path


@pytest.mark.distributed
def test_every_node_refuses_inputs_that_differ_from_their_manifests(train_env, tmp_path):
    """Both agents' first process hashes the inputs before building the model; the mismatch is
    permanent (exit EXIT_PERMANENT) and rank 0 names every node's bad file."""
    from gptoss_model.training.config import apply_overrides, load_yaml, save_yaml
    from gptoss_model.training.exit_codes import EXIT_PERMANENT
    from gptoss_model.training.launch import launch

    spoiled = Path(train_env["prefixes"][0] + ".bin").name
    digests = _input_digests(train_env, tmp_path / "inputs.sha256.json", spoil=spoiled)
    config = tmp_path / "run.yaml"
    save_yaml(apply_overrides(load_yaml(train_env["config"]), [f"dir={tmp_path / 'run'}",
                                                                f"train.input_digests={digests}"]), config)
    lines: list[str] = []
    rc = launch(config, nproc_per_node=1, nnodes=2, pid_file=tmp_path / "run.pid", on_line=lines.append,
                env={"PYTHONPATH": str(REPO), "PYTHONWARNINGS": "ignore"}, cwd=REPO)
    error = next((line for line in lines if "error: inputs differ" in line), None)
    assert rc != 0 and error is not None, lines[-30:]
    assert error.startswith("[default0]:") and "on 2 of 2 node(s)" in error, error
    assert "node 0 (" in error and "node 1 (" in error and f"{spoiled} (test/inputs@v1): sha256" in error, error
    assert any(f"exitcode  : {EXIT_PERMANENT}" in line for line in lines), lines[-30:]
    assert not (tmp_path / "run" / "metrics.jsonl").exists()  # refused before training
    print(f"\n{error.split('error: ', 1)[1]}")


def _rank_process(marker: str, rank: int):
    import psutil

    for p in psutil.process_iter(["cmdline"]):
        cmd = " ".join(p.info["cmdline"] or [])
        if "gptoss_model.train" in cmd and marker in cmd and "torch.distributed.run" not in cmd:
            try:
                if p.environ().get("RANK") == str(rank) and p.name() != "gptoss-guard":
                    return p
            except Exception:  # noqa: BLE001 - gone meanwhile
                continue
    return None


@pytest.fixture(scope="module")
def uninterrupted_2x1(store_inputs, tmp_path_factory):
    """Losses of the 2-agent EP2 run of the train stage, uninterrupted."""
    from tasks.train import run_train

    straight = _two_agent_params(store_inputs, tmp_path_factory.mktemp("straight"), "straight-2x1")
    run_train(straight, store_inputs[0])
    return _stage_losses(straight, store_inputs[0])


def _two_agent_params(store_inputs, workdir: Path, name: str, max_restarts: int = 0):
    from tasks.train import TrainParams
    from tests.train.conftest import OVERRIDES

    store, base, data = store_inputs
    return TrainParams(recipe="tiny_pretrain", overrides={**OVERRIDES, "parallelism.expert_model_parallel_size": 2},
                       base_checkpoint=base.spec, dataset=data.spec, name=name, workdir=str(workdir / name),
                       launcher={"kind": "local", "nodes": 2, "procs_per_node": 1, "max_restarts": max_restarts},
                       store={"url": store.url})


def _stage_losses(params, store) -> dict:
    from gptoss_model.training.metrics import read_metrics
    from tasks.train import resolve_run, run_dir

    _, _, identity = resolve_run(params, store)
    return {r["iteration"]: (r["loss"], r["grad_norm"]) for r in read_metrics(
        run_dir(params, identity) / "metrics.jsonl") if "loss" in r}  # the last record of an iteration wins


@pytest.mark.prefect
@pytest.mark.distributed
@pytest.mark.slow
@pytest.mark.parametrize("max_restarts", [0, 1], ids=["task-retry", "torchrun-restart"])
def test_a_node_losing_its_rank_resumes_exactly(prefect_harness, store_inputs, uninterrupted_2x1, tmp_path,
                                                max_restarts):
    """Two agents: the second node's rank is killed after a checkpoint was committed. With
    max_restarts=0 the train task's retry starts both nodes again; with max_restarts=1 torchrun
    restarts both nodes' workers in place (a new rendezvous round) within the same attempt. Either
    way training resumes from the newest complete checkpoint and every loss equals an uninterrupted
    run's."""
    import signal
    import time

    from tasks.train import run_train
    from tests.train.test_stage import _stage_log_lines, _train_with_fast_retry

    store = store_inputs[0]
    name = f"lost-node-{max_restarts}"
    lost = _two_agent_params(store_inputs, tmp_path, name, max_restarts)
    killed = {}

    def kill_second_node_rank():
        deadline = time.monotonic() + 240
        while time.monotonic() < deadline:
            committed = [m for m in store.list("train-checkpoint") if m.name == name]
            if committed and (rank := _rank_process(str(tmp_path / name), 1)) is not None:
                killed.update(pid=rank.pid, iteration=max(_stage_losses(lost, store), default=0))
                rank.send_signal(signal.SIGKILL)
                return
            time.sleep(0.1)

    if max_restarts:
        killer = threading.Thread(target=kill_second_node_rank, daemon=True)
        killer.start()
        with _stage_log_lines() as lines:
            manifest = run_train(lost, store).manifest  # one attempt: torchrun's restart, not a task retry
        killer.join(timeout=60)
        assert sum("inputs verified once per node" in line for line in lines) == 2, "not restarted in place"
    else:
        manifest = _train_with_fast_retry(lost, kill_second_node_rank)
    assert killed, "the rank was never killed"
    assert manifest.parameters["iteration"] == 16 and killed["iteration"] < 16
    assert _stage_losses(lost, store) == uninterrupted_2x1
    how = ("torchrun restarted both nodes' workers in place" if max_restarts
           else "the task's retry started both nodes again")
    print(f"\nrank 1 (the second agent) killed at iteration {killed['iteration']}: {how}, resuming from the "
          "newest complete checkpoint; iterations 1-16 bitwise those of the uninterrupted run")
