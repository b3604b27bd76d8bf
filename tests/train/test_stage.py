"""The train stage through the artifact store and Prefect: checkpoints committed as
train-checkpoint versions with lineage, a task retry that resumes bitwise (pulling the
newest committed checkpoint), the kill hook leaving no process behind, and a served flow run
cancelled through the Prefect API leaving no torchrun or rank process."""
from __future__ import annotations

import contextlib
import re
import shutil
import threading
import time

import psutil
import pytest

from gptoss_model.training.metrics import read_metrics
from tests.train.conftest import OVERRIDES

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


def _train_with_fast_retry(params, interrupt):
    """The train task in a flow, retrying at once; `interrupt()` runs beside it in a thread."""
    from prefect import flow

    from tasks.train import train_model

    thread = threading.Thread(target=interrupt, daemon=True)
    thread.start()

    @flow
    def train_with_fast_retry(p):
        return train_model.with_options(retry_delay_seconds=0)(p)

    manifest = train_with_fast_retry(params)
    thread.join(timeout=120)
    return manifest


def _first_partial_commit(store, name: str, deadline_s: float = 300) -> bool:
    """Wait until a checkpoint of `name` short of the last (iteration 16) is committed."""
    from tasks.train import KIND

    deadline = time.time() + deadline_s
    while time.time() < deadline:
        if any(m.name == name and m.parameters.get("iteration", 16) < 16 for m in store.list(KIND)):
            return True
        time.sleep(0.1)
    return False


@pytest.mark.prefect
@pytest.mark.slow
def test_retry_resumes_from_the_newest_committed_checkpoint(prefect_harness, store_inputs, tmp_path):
    from tasks.train import KIND, pid_file, resolve_run, run_dir, run_train

    store, base, data = store_inputs
    straight = _params("straight", store_inputs, tmp_path)
    done = run_train(straight, store)
    assert done.manifest.parameters["iteration"] == 16
    versions = sorted((m for m in store.list(KIND) if m.name == "straight"), key=lambda m: m.parameters["iteration"])
    assert [m.parameters["iteration"] for m in versions] == [4, 8, 12, 16]
    assert {(i.kind, i.name, i.version) for i in versions[0].inputs} == {
        (base.kind, base.name, base.version), (data.kind, data.name, data.version)}
    assert versions[0].parameters["config"]["train"]["train_iters"] == 16

    # A damaged local tracker (a disk error, a bad copy): the stage resumes from the store instead.
    from gptoss_model.checkpoint.layout import TRACKER_FILE
    from tasks.train import _pull_newest

    _, _, straight_id = resolve_run(straight, store)
    straight_ckpts = run_dir(straight, straight_id) / "checkpoints"
    (straight_ckpts / TRACKER_FILE).write_text("garbage\x00")
    assert _pull_newest(store, "straight", straight_id, straight_ckpts) == 16
    assert (straight_ckpts / TRACKER_FILE).read_text().strip() == "16"
    assert (straight_ckpts / f"{TRACKER_FILE}.unreadable").read_text() == "garbage\x00"

    crashed = _params("crashed", store_inputs, tmp_path)
    _, _, identity = resolve_run(crashed, store)
    save_dir = run_dir(crashed, identity) / "checkpoints"

    pidf = pid_file(crashed)
    crashed_at = []

    def crash_after_first_commit():
        from gptoss_model.training.launch import kill_from_pid_file

        if _first_partial_commit(store, "crashed"):
            crashed_at.append(max(_losses(crashed, store)))
            kill_from_pid_file(pidf)  # the first attempt dies...
            time.sleep(1)
            shutil.rmtree(save_dir, ignore_errors=True)  # ...and its machine's disk with it

    manifest = _train_with_fast_retry(crashed, crash_after_first_commit)
    assert crashed_at and crashed_at[0] < 16, "the first attempt was not interrupted"
    assert manifest.parameters["iteration"] == 16
    got, want = _losses(crashed, store), _losses(straight, store)
    for it in range(5, 17):
        assert got[it]["loss"] == want[it]["loss"] and got[it]["grad_norm"] == want[it]["grad_norm"], it
    print(f"\nfirst attempt killed after iteration {crashed_at[0]} (a checkpoint committed, local disk "
          f"wiped); the retry's iterations 5-16 are bitwise those of the uninterrupted run")


@pytest.mark.slow
def test_kill_hook_leaves_no_torchrun_or_rank_process(store_inputs, tmp_path):
    from flows.train import train_flow
    from tasks.train import TrainingFailed, pid_file, run_train

    params = _params("cancelled", store_inputs, tmp_path, **{"train.train_iters": 1000})
    store = store_inputs[0]
    failure = []
    runner = threading.Thread(target=lambda: failure.append(_capture(run_train, params, store)), daemon=True)
    runner.start()
    pidf = pid_file(params)
    deadline = time.time() + 240
    while not (pidf.is_file() and len(psutil.Process(int(pidf.read_text())).children(recursive=True)) >= 1):
        assert time.time() < deadline and runner.is_alive(), "training did not start"
        time.sleep(0.2)
    time.sleep(3)
    root = psutil.Process(int(pidf.read_text()))
    tree = [root, *root.children(recursive=True)]

    class FlowRun:
        parameters = {"params": params.model_dump()}

    stop_torchrun, = set(train_flow.on_cancellation_hooks) | set(train_flow.on_failure_hooks)  # the flow's one hook
    stop_torchrun(None, FlowRun, None)
    _, alive = psutil.wait_procs(tree, timeout=15)
    assert not alive, f"survivors: {[(p.pid, p.cmdline()[:4]) for p in alive]}"
    runner.join(timeout=30)
    assert failure and isinstance(failure[0], TrainingFailed)
    print(f"\nkilled torchrun {root.pid} and {len(tree) - 1} descendants; none survived")


@contextlib.contextmanager
def _stage_log_lines():
    """The train stage's log lines (INFO and up) while the block runs: the stage's own and the ranks'
    (gptoss_model.training.launch relays those)."""
    import logging

    lines: list[str] = []
    handler = logging.Handler(logging.INFO)
    handler.emit = lambda record: lines.append(record.getMessage())
    loggers = [logging.getLogger(name) for name in ("tasks.train", "gptoss_model.training.launch")]
    levels = [logger.level for logger in loggers]
    for logger in loggers:
        logger.addHandler(handler)
        logger.setLevel(logging.INFO)
    try:
        yield lines
    finally:
        for logger, level in zip(loggers, levels):
            logger.removeHandler(handler)
            logger.setLevel(level)


def _capture(fn, *args):
    """fn's result, or the exception it raised (the test inspects either)."""
    try:
        return fn(*args)
    except Exception as e:  # noqa: BLE001 - the test inspects it
        return e


@pytest.mark.prefect
@pytest.mark.slow
@pytest.mark.timeout(240)
def test_cancelling_the_flow_run_leaves_no_torchrun_or_rank_process(prefect_harness, store_inputs, tmp_path):
    """`prefect flow-run cancel` end to end: the train flow is served by a Prefect runner in
    another process (the runner is what acts on Cancelling), the run is cancelled through the
    client while both torchrun ranks train, and every torchrun/rank PID must be gone. The
    flow run's log must carry rank 0's lines (they come from a reader thread)."""
    from tasks.train import pid_file
    from tests.train.served import cancel_served_run

    params = _params("served", store_inputs, tmp_path, **{"train.train_iters": 1000}).model_copy(
        update={"nproc_per_node": 2})

    def training() -> list[psutil.Process] | None:
        try:
            root = psutil.Process(int(pid_file(params).read_text()))
            ranks = [p for p in root.children() if "gptoss_model.train" in p.cmdline()]  # not their guards
            if len(ranks) == 2 and _losses(params, store_inputs[0]):  # both up and training
                return [root, *root.children(recursive=True)]
        except (psutil.NoSuchProcess, ValueError, FileNotFoundError):
            pass
        return None

    cancelled = cancel_served_run(params, tmp_path, training, deployment="cancel-test")
    assert not cancelled.survivors, f"survivors: {[(p.pid, p.cmdline()[:6]) for p in cancelled.survivors]}"
    assert cancelled.state.is_cancelled(), cancelled.state
    assert any(m.message.startswith("[gptoss train] ") for m in cancelled.logs), "rank 0's log never reached the run"
    print(f"\ntorchrun {cancelled.processes[0].pid} and {len(cancelled.processes) - 1} descendants gone "
          f"{cancelled.seconds_to_gone:.1f} s after Cancelling; flow run {cancelled.state.name}; "
          f"{cancelled.seconds_in_all:.1f} s in all")


@pytest.mark.slow
def test_a_nonfinite_loss_is_a_permanent_failure_of_the_task(store_inputs, tmp_path):
    """Under torchrun the rank's exit code 3 reaches the task only through torchrun's failure
    report; it must become a PermanentError (no retry: the retry would overflow the same way)."""
    from gptoss_model.errors import PermanentError
    from gptoss_model.training.loop import NonFiniteLossError
    from tasks.train import KIND, run_train

    overflow = {"train.train_iters": 6, "checkpoint.save_interval": 1, "scheduler.lr_warmup_iters": 2,
                "scheduler.lr_warmup_init": 0.0, "optimizer.lr": 1e30, "optimizer.min_lr": 1e30,
                "optimizer.weight_decay": 0.0}
    params = _params("overflow", store_inputs, tmp_path, **overflow)
    with pytest.raises(NonFiniteLossError, match=r"non-finite.*committed: \[1, 2\]") as raised:
        run_train(params, store_inputs[0])
    assert isinstance(raised.value, PermanentError)
    store = store_inputs[0]
    assert sorted(m.parameters["iteration"] for m in store.list(KIND) if m.name == "overflow") == [1, 2]


@pytest.mark.prefect
@pytest.mark.slow
@pytest.mark.timeout(400)
def test_a_hung_rank_ends_the_attempt_and_the_retry_resumes(prefect_harness, store_inputs, tmp_path):
    """SIGSTOP one of two ranks after the first committed checkpoint: the watchdog ends the
    attempt within train.hang_timeout + 30 s naming the rank, and the task's retry resumes
    from the newest committed checkpoint to the end."""
    import os
    import signal

    from tasks.train import pid_file

    hang_timeout = 8
    params = _params("hung", store_inputs, tmp_path, **{"train.hang_timeout": hang_timeout}).model_copy(
        update={"nproc_per_node": 2})
    store = store_inputs[0]
    pidf = pid_file(params)
    stopped: dict = {}

    def stop_a_rank_after_the_first_commit():
        if _first_partial_commit(store, "hung"):
            torchrun = psutil.Process(int(pidf.read_text()))
            ranks = sorted((p for p in torchrun.children() if "gptoss_model.train" in " ".join(p.cmdline())),
                           key=lambda p: p.pid)
            os.kill(ranks[-1].pid, signal.SIGSTOP)
            stopped.update(pid=ranks[-1].pid, at=time.monotonic())
            psutil.wait_procs([ranks[-1]], timeout=hang_timeout + 60)
            stopped["gone_after"] = time.monotonic() - stopped["at"]

    with _stage_log_lines() as lines:  # the stage's log, as the run shows it
        manifest = _train_with_fast_retry(params, stop_a_rank_after_the_first_commit)
    text = "\n".join(lines)
    assert stopped, "no rank was stopped"
    print(f"\nrank pid {stopped['pid']} stopped; the attempt ended {stopped['gone_after']:.1f} s later "
          f"(hang_timeout {hang_timeout} s)")
    assert stopped["gone_after"] < hang_timeout + 30
    assert re.search(r"training hung: rank \d on \S+ \(last seen at iteration \d+", text), text[-3000:]
    assert "resumed from" in text
    assert manifest.parameters["iteration"] == 16


@pytest.mark.slow
def test_two_runs_of_the_same_training_one_trains_the_other_waits_and_reuses_it(store_inputs, tmp_path):
    from tasks.train import run_train

    params = _params("twice", store_inputs, tmp_path, **{"train.train_iters": 8})
    store = store_inputs[0]
    results: list = []
    with _stage_log_lines() as lines:
        runs = [threading.Thread(target=lambda: results.append(_capture(run_train, params, store)))
                for _ in range(2)]
        for t in runs:
            t.start()
        for t in runs:
            t.join(timeout=300)
    assert len(results) == 2 and all(not isinstance(r, Exception) for r in results), results
    assert sorted(r.cache_hit for r in results) == [False, True]  # one trained, one reused its commits
    assert results[0].manifest.version == results[1].manifest.version
    assert any("waiting for it to finish" in line for line in lines)
    assert sum(": world 1, " in line and "[gptoss train] " in line for line in lines) == 1  # torchrun started once
    # one agent on this host reads what the store has just verified here: it does not hash it again
    assert not any("inputs verified once per node" in line for line in lines)

