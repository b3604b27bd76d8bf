"""Cancel a train flow run the way a user does: the flow is served by a Prefect runner in another
process (the runner is what acts on Cancelling), a run is created through the API, and once the
caller's `ready()` sees it training, the run is set to Cancelling as `prefect flow-run cancel` does."""
from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import psutil

REPO = Path(__file__).resolve().parents[2]


@dataclass
class Cancelled:
    state: object                      # the flow run's final state
    logs: list                         # the flow run's log records
    processes: list[psutil.Process]    # what ready() returned: every one must be gone
    survivors: list[psutil.Process] = field(default_factory=list)
    seconds_to_gone: float = 0.0       # from Cancelling until the last of `processes` exited
    seconds_in_all: float = 0.0


def cancel_served_run(params, tmp_path: Path, ready: Callable[[], list[psutil.Process] | None], *,
                      deployment: str, env: dict | None = None, ready_within_s: float = 180) -> Cancelled:
    from prefect.client.orchestration import get_client
    from prefect.deployments import run_deployment
    from prefect.settings import PREFECT_API_URL
    from prefect.states import Cancelling

    child_env = {**os.environ, "PREFECT_API_URL": PREFECT_API_URL.value(), "PREFECT_RUNNER_POLL_FREQUENCY": "1",
                 "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1", **(env or {})}
    started = time.monotonic()
    runner_log = tmp_path / f"runner-{deployment}.log"
    runner = subprocess.Popen(
        [sys.executable, "-c", f"from flows.train import train_flow; train_flow.serve(name={deployment!r})"],
        cwd=REPO, env=child_env, stdout=runner_log.open("w"), stderr=subprocess.STDOUT, start_new_session=True)
    processes: list[psutil.Process] = []
    try:
        deadline = time.monotonic() + 60
        while True:
            assert runner.poll() is None, "the runner died"
            try:
                flow_run = run_deployment(f"train/{deployment}", parameters={"params": params.model_dump(mode="json")},
                                          timeout=0)
                break
            except Exception:  # noqa: BLE001 - the deployment is not registered yet
                assert time.monotonic() < deadline, "the served deployment never appeared"
                time.sleep(1)
        deadline = time.monotonic() + ready_within_s
        while not (processes := ready() or []):
            assert time.monotonic() < deadline, "the run never started training"
            time.sleep(0.5)
        with get_client(sync_client=True) as client:
            # streaming is part of what is tested: cancel only once rank 0's lines reach the run while it
            # trains (a kill right after the first step could land before the flow process read or sent them)
            while not _rank0_lines(client, flow_run.id):
                assert time.monotonic() < deadline, "rank 0's log never reached the run while it trained"
                time.sleep(0.5)
            training = time.monotonic()
            client.set_flow_run_state(flow_run.id, Cancelling(), force=True)  # what `prefect flow-run cancel` does
            _, alive = psutil.wait_procs(processes, timeout=60)
            gone = time.monotonic()
            deadline = time.monotonic() + 60
            while not (state := client.read_flow_run(flow_run.id).state).is_final():
                assert time.monotonic() < deadline, f"flow run stuck in {state.name}"
                time.sleep(1)
            logs = _all_logs(client, flow_run.id)
        return Cancelled(state, logs, processes, alive, gone - training, time.monotonic() - started)
    finally:
        print(f"runner log (tail):\n{runner_log.read_text()[-6000:]}")
        os.killpg(runner.pid, signal.SIGTERM)
        try:
            runner.wait(timeout=15)
        except subprocess.TimeoutExpired:
            os.killpg(runner.pid, signal.SIGKILL)
            runner.wait()
        for p in processes:  # only where the caller's assertions will fail
            with contextlib.suppress(psutil.NoSuchProcess):
                p.kill()


def _all_logs(client, flow_run_id) -> list:
    from prefect.client.schemas.filters import LogFilter, LogFilterFlowRunId

    logs: list = []
    while page := client.read_logs(LogFilter(flow_run_id=LogFilterFlowRunId(any_=[flow_run_id])), offset=len(logs)):
        logs += page
    return logs


def _rank0_lines(client, flow_run_id) -> list:
    return [m for m in _all_logs(client, flow_run_id) if m.message.startswith("[gptoss train] ")]
