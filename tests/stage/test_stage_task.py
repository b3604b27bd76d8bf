"""The stage shape every stage's Prefect task shares (tasks/common.py): retries only for
transient failures, progress at 100% on success, keyed artifacts, library logs in the run."""
from __future__ import annotations

import asyncio
import logging
import time
from pathlib import Path

import pytest
from pydantic import BaseModel

from gptoss_model.errors import PermanentError
from tasks.common import StageProgress, run_logged_stage, stage_task
from tasks.store import ArtifactStore

pytestmark = pytest.mark.prefect
library_log = logging.getLogger("gptoss_model.probe")


class ProbeParams(BaseModel):
    store: str
    fail_with: str | None = None  # "permanent", "transient" or None
    tag: str = "a"


ATTEMPTS: list[str] = []


class ProbeInputError(PermanentError, ValueError):
    pass


def run_probe(params: ProbeParams):
    ATTEMPTS.append(params.tag)
    if params.fail_with == "permanent":
        raise ProbeInputError(f"probe {params.tag}: bad input")
    if params.fail_with == "transient":
        raise ConnectionResetError(f"probe {params.tag}: connection dropped")

    def build(staging: Path) -> dict:
        progress = StageProgress(f"probe {params.tag}")
        if params.tag.startswith("threads"):  # copy threads reporting at once, as downloads do
            import threading

            together = threading.Barrier(8)

            def report(i: int) -> None:
                together.wait()
                progress(i + 1, 100)

            workers = [threading.Thread(target=report, args=(i,)) for i in range(8)]
            for w in workers:
                w.start()
            for w in workers:
                w.join()
        for done in range(0, 101, 7):  # throttled updates: the last one (98) alone would not reach 100
            progress(done, 100)
        progress.finish()
        library_log.info("probe %s built its output", params.tag)
        (staging / "out.txt").write_text(params.tag)
        return {"tag": params.tag}

    return run_logged_stage(ArtifactStore(params.store), stage="probe", code_version="1", kind="probe-output",
                            name=f"probe/{params.tag}", params={"tag": params.tag}, build=build)


probe_task = stage_task(run_probe, name="probe-stage", retries=2, retry_delay_seconds=(0, 0),
                        describe=lambda p: f"probe {p.tag}")


def _flow():
    from prefect import flow

    @flow(name="probe-flow")
    def probe_flow(params: ProbeParams):
        return probe_task(params)

    return probe_flow


def test_permanent_errors_fail_at_once_transient_ones_are_retried(prefect_harness, tmp_path):
    flow = _flow()
    store = (tmp_path / "store").as_uri()
    ATTEMPTS.clear()
    state = flow(ProbeParams(store=store, fail_with="permanent", tag="p"), return_state=True)
    assert state.is_failed() and ATTEMPTS == ["p"]
    ATTEMPTS.clear()
    state = flow(ProbeParams(store=store, fail_with="transient", tag="t"), return_state=True)
    assert state.is_failed() and ATTEMPTS == ["t", "t", "t"]  # 1 + retries=2


@pytest.mark.parametrize("tag", ["ok", "threads"])
def test_progress_artifact_logs_and_keyed_artifact(prefect_harness, tmp_path, tag):
    """One progress artifact per stage run, at 100% when it completes, also when threads report
    at once (the first reports raced to create it: a second artifact, the first left below 100%)."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import LogFilter, LogFilterFlowRunId

    flow = _flow()
    state = flow(ProbeParams(store=(tmp_path / "store").as_uri(), tag=tag), return_state=True)
    manifest = state.result()
    assert manifest.metrics["tag"] == tag
    run_id = state.state_details.flow_run_id

    async def fetch():
        from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterFlowRunId

        async with get_client() as client:
            logs = await client.read_logs(LogFilter(flow_run_id=LogFilterFlowRunId(any_=[run_id])))
            arts = await client.read_artifacts(
                artifact_filter=ArtifactFilter(flow_run_id=ArtifactFilterFlowRunId(any_=[run_id])))
            return logs, arts

    from prefect.logging.handlers import APILogHandler

    APILogHandler().flush()  # logs reach the server in batches
    deadline = time.monotonic() + 20
    while True:
        logs, arts = asyncio.run(fetch())
        messages = [entry.message for entry in logs]
        if any("committed" in m for m in messages) or time.monotonic() > deadline:
            break
        time.sleep(0.5)
    assert any(f"probe {tag} built its output" in m for m in messages), messages
    assert any("committed" in m and f"probe-output/probe/{tag}@" in m for m in messages), messages
    progress = [a for a in arts if a.type == "progress"]
    assert len(progress) == 1 and float(progress[0].data) == 100.0, [a.data for a in progress]
    keyed = [a for a in arts if a.type == "markdown"]
    assert [a.key for a in keyed] == [f"probe-output-probe-{tag}"]
