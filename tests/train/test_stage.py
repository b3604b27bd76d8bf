"""The train stage through the artifact store and Prefect: checkpoints committed as
train-checkpoint versions with lineage, a task retry that resumes bitwise (pulling the
newest committed checkpoint), and the kill hook leaving no process behind."""
from __future__ import annotations

import shutil
import threading
import time
from pathlib import Path

import psutil
import pytest

from gptoss_model.training.metrics import read_metrics

OVERRIDES = {"train.train_iters": 16, "checkpoint.save_interval": 4, "train.eval_interval": 0,
             "scheduler.lr_decay_iters": 30}


@pytest.fixture(scope="module")
def store_inputs(train_env, tmp_path_factory):
    from gptoss_model.convert import convert_hf_to_megatron
    from tasks.store import ArtifactStore, run_stage

    store = ArtifactStore((tmp_path_factory.mktemp("store") / "s").as_uri())

    def convert(staging: Path) -> dict:
        report = convert_hf_to_megatron(train_env["ckpt"], staging, dtype="float32")
        return {"params": report["params"]}

    def dataset(staging: Path) -> dict:
        names = []
        for prefix in train_env["prefixes"]:
            for ext in (".bin", ".idx"):
                shutil.copy(prefix + ext, staging / (Path(prefix).name + ext))
            names.append(Path(prefix).name)
        return {"data_prefixes": names}

    base = run_stage(store, stage="convert", code_version="test", kind="megatron-checkpoint", name="tiny",
                     params={}, build=convert).manifest
    data = run_stage(store, stage="preprocess", code_version="test", kind="dataset", name="docs",
                     params={}, build=dataset).manifest
    return store, base, data


def _params(name, store_inputs, tmp_path, **extra):
    from tasks.common import StoreSettings
    from tasks.train import TrainParams

    store, base, data = store_inputs
    return TrainParams(recipe="tiny_pretrain", overrides={**OVERRIDES, **extra}, base_checkpoint=base.spec,
                       dataset=data.spec, name=name, nproc_per_node=1, workdir=str(tmp_path / "work"),
                       store=StoreSettings(url=store.url))


def _losses(params, store):
    from tasks.train import resolve_run, run_dir

    _, _, identity = resolve_run(params, store)
    return {r["iteration"]: r for r in read_metrics(run_dir(params, identity) / "metrics.jsonl") if "loss" in r}


@pytest.mark.prefect
@pytest.mark.slow
def test_retry_resumes_from_the_newest_committed_checkpoint(prefect_harness, store_inputs, tmp_path):
    from prefect import flow

    from tasks.train import KIND, pid_file, resolve_run, run_dir, run_train, train_model

    store, base, data = store_inputs
    straight = _params("straight", store_inputs, tmp_path)
    done = run_train(straight, store)
    assert done.manifest.parameters["iteration"] == 16
    versions = sorted((m for m in store.list(KIND) if m.name == "straight"), key=lambda m: m.parameters["iteration"])
    assert [m.parameters["iteration"] for m in versions] == [4, 8, 12, 16]
    assert {(i.kind, i.name, i.version) for i in versions[0].inputs} == {
        (base.kind, base.name, base.version), (data.kind, data.name, data.version)}
    assert versions[0].parameters["config"]["train"]["train_iters"] == 16

    crashed = _params("crashed", store_inputs, tmp_path)
    _, _, identity = resolve_run(crashed, store)
    save_dir = run_dir(crashed, identity) / "checkpoints"

    pidf = pid_file(crashed, store)
    crashed_at = []

    def crash_after_first_commit():
        from gptoss_model.training.launch import kill_from_pid_file

        deadline = time.time() + 300
        while time.time() < deadline:
            if any(m.name == "crashed" and m.parameters.get("iteration", 16) < 16 for m in store.list(KIND)):
                crashed_at.append(max(_losses(crashed, store)))
                kill_from_pid_file(pidf)  # the first attempt dies...
                time.sleep(1)
                shutil.rmtree(save_dir, ignore_errors=True)  # ...and its machine's disk with it
                return
            time.sleep(0.1)

    killer = threading.Thread(target=crash_after_first_commit, daemon=True)
    killer.start()

    @flow
    def train_with_fast_retry(params):
        return train_model.with_options(retry_delay_seconds=0)(params)

    manifest = train_with_fast_retry(crashed)
    killer.join()
    assert crashed_at and crashed_at[0] < 16, "the first attempt was not interrupted"
    assert manifest.parameters["iteration"] == 16
    got, want = _losses(crashed, store), _losses(straight, store)
    for it in range(5, 17):
        assert got[it]["loss"] == want[it]["loss"] and got[it]["grad_norm"] == want[it]["grad_norm"], it
    print(f"\nfirst attempt killed after iteration {crashed_at[0]} (a checkpoint committed, local disk "
          f"wiped); the retry's iterations 5-16 are bitwise those of the uninterrupted run")


@pytest.mark.slow
def test_kill_hook_leaves_no_torchrun_or_rank_process(store_inputs, tmp_path):
    from flows.train import stop_torchrun
    from tasks.train import TrainingFailed, pid_file, run_train

    params = _params("cancelled", store_inputs, tmp_path, **{"train.train_iters": 1000})
    store = store_inputs[0]
    failure = []
    runner = threading.Thread(target=lambda: failure.append(_capture(run_train, params, store)), daemon=True)
    runner.start()
    pidf = pid_file(params, store)
    deadline = time.time() + 240
    while not (pidf.is_file() and len(psutil.Process(int(pidf.read_text())).children(recursive=True)) >= 1):
        assert time.time() < deadline and runner.is_alive(), "training did not start"
        time.sleep(0.2)
    time.sleep(3)
    root = psutil.Process(int(pidf.read_text()))
    tree = [root, *root.children(recursive=True)]

    class FlowRun:
        parameters = {"params": params.model_dump()}

    stop_torchrun(None, FlowRun, None)
    _, alive = psutil.wait_procs(tree, timeout=15)
    assert not alive, f"survivors: {[(p.pid, p.cmdline()[:4]) for p in alive]}"
    runner.join(timeout=30)
    assert failure and isinstance(failure[0], TrainingFailed)
    print(f"\nkilled torchrun {root.pid} and {len(tree) - 1} descendants; none survived")


def _capture(fn, *args):
    try:
        fn(*args)
    except Exception as e:  # noqa: BLE001 - the test inspects it
        return e
    return None
