"""The Slurm launcher on a real cluster: two slurmd "nodes" on this host (tests/infra/slurm_cluster.py).

A 2-node job of the tiny model, submitted from the train flow: its log streams into the run as it
grows, the job is followed to completion and every checkpoint is committed, with the losses of
the same run launched here; cancelling leaves no job in squeue and no rank process."""
from __future__ import annotations

import re
import threading
import time

import psutil
import pytest

from gptoss_model.training.metrics import read_metrics
from tests.infra.slurm_cluster import ensure_installed, start_cluster
from tests.train.conftest import OVERRIDES
from tests.train.test_stage import _stage_log_lines

pytestmark = [pytest.mark.slow, pytest.mark.distributed]
EP2 = {"parallelism.expert_model_parallel_size": 2}


@pytest.fixture(scope="module")
def slurm():
    why = ensure_installed()
    if why:
        pytest.skip(f"no Slurm cluster here: {why}")
    cluster = start_cluster()
    yield cluster
    cluster.stop()


def _params(name, store_inputs, tmp_path, launcher, **overrides):
    from tasks.train import TrainParams

    store, base, data = store_inputs
    return TrainParams(recipe="tiny_pretrain", overrides={**OVERRIDES, **EP2, **overrides}, base_checkpoint=base.spec,
                       dataset=data.spec, name=name, launcher=launcher, workdir=str(tmp_path / "work"),
                       store={"url": store.url})


def _losses(params, store):
    from tasks.train import resolve_run, run_dir

    _, _, identity = resolve_run(params, store)
    return {r["iteration"]: (r["loss"], r["grad_norm"])
            for r in read_metrics(run_dir(params, identity) / "metrics.jsonl") if "loss" in r}


def _rank_processes(marker: str) -> list[psutil.Process]:
    found = []
    for p in psutil.process_iter(["cmdline"]):
        cmd = " ".join(p.info["cmdline"] or [])
        if "gptoss_model.train" in cmd and marker in cmd:
            found.append(p)
    return found


@pytest.mark.prefect
def test_a_two_node_job_trains_streams_and_commits(prefect_harness, slurm, store_inputs, tmp_path, monkeypatch):
    from flows.train import train_flow

    monkeypatch.setenv("SLURM_CONF", str(slurm.conf))
    store = store_inputs[0]
    on_slurm = _params("on-slurm", store_inputs, tmp_path, {"kind": "slurm", "nodes": 2, "procs_per_node": 1,
                                                            "partition": "debug", "time_limit": "15:00"})
    started = time.monotonic()
    with _stage_log_lines() as streamed:
        manifest = train_flow(on_slurm)
    took = time.monotonic() - started
    assert manifest.parameters["iteration"] == 16
    versions = sorted(m.parameters["iteration"] for m in store.list("train-checkpoint") if m.name == "on-slurm")
    assert versions == [4, 8, 12, 16]
    assert any(re.match(r"iteration\s+16 \| loss", line) for line in streamed), streamed[-20:]  # rank 0's lines
    assert slurm.queue() == []

    here = _params("here", store_inputs, tmp_path, {"kind": "local", "nodes": 1, "procs_per_node": 2})
    from tasks.train import run_train

    run_train(here, store)
    assert _losses(on_slurm, store) == _losses(here, store)
    print(f"\n2-node Slurm job: 16 iterations, 4 checkpoints committed in {took:.1f} s; losses bitwise those "
          "of the same run as one local agent with 2 processes")


@pytest.mark.prefect
def test_cancelling_the_flow_run_leaves_no_job_and_no_rank(prefect_harness, slurm, store_inputs, tmp_path):
    """`prefect flow-run cancel` of a served train flow run whose 2-node job is training: the runner
    kills the flow run's process and runs its cancellation hook, which scancels the job named in the
    pid file; no job stays in squeue and no rank process on either node."""
    from tasks.train import pid_file
    from tests.train.served import cancel_served_run

    params = _params("cancelled-slurm", store_inputs, tmp_path, {"kind": "slurm", "nodes": 2, "procs_per_node": 1},
                     **{"train.train_iters": 1000, "checkpoint.save_interval": 1000})
    marker = str(tmp_path / "work")

    def training() -> list[psutil.Process] | None:
        try:
            submitted = pid_file(params).read_text().startswith("slurm:")
            ranks = _rank_processes(marker)
            return ranks if submitted and len(ranks) >= 2 and _losses(params, store_inputs[0]) else None
        except FileNotFoundError:  # not submitted, or no step trained yet
            return None

    cancelled = cancel_served_run(params, tmp_path, training, deployment="cancel-slurm",
                                  env={"SLURM_CONF": str(slurm.conf)})
    assert cancelled.state.is_cancelled(), cancelled.state
    assert slurm.queue() == [], slurm.queue()
    assert not cancelled.survivors and not _rank_processes(marker), [p.cmdline()[:4] for p in _rank_processes(marker)]
    assert any(m.message.startswith("[gptoss train] ") for m in cancelled.logs), "rank 0's log never reached the run"
    print(f"\nprefect flow-run cancel: no job in squeue, no rank process {cancelled.seconds_to_gone:.1f} s after "
          f"Cancelling; flow run {cancelled.state.name}")


def test_the_time_limit_signal_saves_requeues_and_resumes_exactly(slurm, store_inputs, tmp_path, monkeypatch):
    """Slurm's signal before the time limit (`--signal=B:USR1@N`, sent here at once with `scancel --batch
    --signal=USR1`, as Slurm's timer would): the ranks save and stop, the job requeues itself, and the
    requeued job resumes from that checkpoint to the end with the losses of an uninterrupted run."""
    import subprocess

    from tasks.train import pid_file, run_train

    monkeypatch.setenv("SLURM_CONF", str(slurm.conf))
    store = store_inputs[0]
    no_saves = {"checkpoint.save_interval": 100}  # the only save before the end is the one the signal asks for
    params = _params("requeued", store_inputs, tmp_path, {"kind": "slurm", "nodes": 2, "procs_per_node": 1,
                                                          "time_limit": "30:00", "save_signal_seconds": 120},
                     **no_saves)
    signalled = {}

    def signal_when_training():
        deadline = time.monotonic() + 240
        while time.monotonic() < deadline:
            try:
                entry = pid_file(params).read_text().strip()
                trained = max(_losses(params, store), default=0)
            except (FileNotFoundError, ValueError):
                entry, trained = "", 0
            if entry.startswith("slurm:") and trained >= 3:
                job = entry.removeprefix("slurm:")
                subprocess.run(["scancel", "--batch", "--signal=USR1", job], check=True,
                               env={**__import__("os").environ, **slurm.env})
                signalled.update(job=job, at=trained)
                break
            time.sleep(0.2)
        # Slurm holds a requeued job ~2 minutes (its BeginTime); the test need not wait them out, but a
        # restart within the second of the requeue is refused ("Job credential revoked": the nodes
        # compare whole seconds) and fails the job: release it 2 s on (a start time in the future would
        # wait for the scheduler's next pass instead, ~40 s here)
        while signalled and time.monotonic() < deadline:
            state = slurm.run("squeue", "-h", "-j", signalled["job"], "-o", "%T %r").split()
            if state[:2] == ["PENDING", "BeginTime"]:
                time.sleep(2)
                slurm.run("scontrol", "update", f"JobId={signalled['job']}", "StartTime=now")
                return
            time.sleep(0.5)

    signaller = threading.Thread(target=signal_when_training, daemon=True)
    signaller.start()
    result = run_train(params, store)
    signaller.join(timeout=10)
    assert signalled, "the job was never signalled"
    assert result.manifest.parameters["iteration"] == 16
    saved = sorted(m.parameters["iteration"] for m in store.list("train-checkpoint") if m.name == "requeued")
    assert len(saved) == 2 and signalled["at"] <= saved[0] < 16 and saved[1] == 16, saved
    log = next((tmp_path / "work").glob("train-*/slurm.log")).read_text()
    assert "requeueing job" in log and "resumed from" in log, log[-3000:]

    straight = _params("requeued-here", store_inputs, tmp_path, {"kind": "local", "nodes": 1, "procs_per_node": 2},
                       **no_saves)
    run_train(straight, store)
    assert _losses(params, store) == _losses(straight, store)
    print(f"\nUSR1 at iteration {signalled['at']}: saved iteration {saved[0]}, requeued, resumed to 16; "
          "losses bitwise those of an uninterrupted run")


@pytest.mark.prefect
def test_a_node_losing_its_rank_fails_the_job_and_the_retry_resumes_exactly(prefect_harness, slurm, store_inputs,
                                                                             tmp_path, monkeypatch):
    """One slurmd node's rank killed after a checkpoint was committed: the job fails, the train task's
    retry submits it again, and it resumes from the newest committed checkpoint with exact losses."""
    import signal

    from tests.train.test_stage import _train_with_fast_retry

    monkeypatch.setenv("SLURM_CONF", str(slurm.conf))
    store = store_inputs[0]
    lost = _params("slurm-lost-node", store_inputs, tmp_path, {"kind": "slurm", "nodes": 2, "procs_per_node": 1})
    killed = {}

    def kill_a_rank_of_the_second_node():
        deadline = time.monotonic() + 240
        while time.monotonic() < deadline:
            if any(m.name == "slurm-lost-node" for m in store.list("train-checkpoint")):
                for p in _rank_processes(str(tmp_path / "work")):
                    try:
                        if p.environ().get("RANK") == "1" and p.name() != "gptoss-guard":
                            killed.update(pid=p.pid, iteration=max(_losses(lost, store), default=0))
                            p.send_signal(signal.SIGKILL)
                            return
                    except psutil.Error:
                        continue
            time.sleep(0.1)

    manifest = _train_with_fast_retry(lost, kill_a_rank_of_the_second_node)
    assert killed and killed["iteration"] < 16, killed
    assert manifest.parameters["iteration"] == 16
    here = _params("slurm-lost-node-here", store_inputs, tmp_path, {"kind": "local", "nodes": 1, "procs_per_node": 2})
    from tasks.train import run_train

    run_train(here, store)
    assert _losses(lost, store) == _losses(here, store)
    assert slurm.queue() == []
    print(f"\nrank 1 (node n2) killed at iteration {killed['iteration']}: the job failed, the task's retry "
          "resubmitted it and it resumed to 16 with the losses of an uninterrupted run")


def test_a_job_that_cannot_start_fails_at_once_with_the_schedulers_reason(slurm, store_inputs, tmp_path,
                                                                          monkeypatch):
    """The partition exists (pre-flight's sinfo lists it) but is down: the job would pend forever.
    The launcher reads Slurm's reason, cancels the job and fails permanently, in seconds."""
    from gptoss_model.errors import is_permanent
    from gptoss_model.training.slurm import SlurmJobRefused
    from tasks.train import run_train

    monkeypatch.setenv("SLURM_CONF", str(slurm.conf))
    params = _params("never-starts", store_inputs, tmp_path, {"kind": "slurm", "nodes": 2, "procs_per_node": 1,
                                                              "partition": "debug"})
    slurm.run("scontrol", "update", "PartitionName=debug", "State=DOWN")
    try:
        started = time.monotonic()
        with pytest.raises(SlurmJobRefused, match="cannot start: PartitionDown") as refused:
            run_train(params, store_inputs[0])
        took = time.monotonic() - started
    finally:
        slurm.run("scontrol", "update", "PartitionName=debug", "State=UP")
    assert is_permanent(refused.value)
    assert slurm.queue() == [], slurm.queue()  # cancelled, not left pending
    assert took < 60, took
    print(f"\npartition down: {refused.value} ({took:.2f} s from the stage call), the job cancelled")
