"""Run one pipeline stage as its own deployment (on another work pool) and wait for its result.

The pipeline runs each stage in its own process by default. A section with
`deployment: FLOW/DEPLOYMENT` (e.g. `train: {deployment: train/gpu}`) sends the stage to that
deployment instead: a flow run of it is created as a subflow of the pipeline run (so the UI
nests it, and the stage's key log lines reach the pipeline run), the worker of that
deployment's pool picks it up, and the pipeline waits for it. Its result comes back as the
stage's output artifact (`tasks.common.OUTPUT_ARTIFACT_KEY`, JSON through the API), resolved in
the store, so the pipeline's lineage holds it like any other stage's.

If the pipeline stops while it waits (cancelled: its worker terminates it; or failed), it
cancels the stage's run on the way out; the server's cancellation clean-up does the same for
the subflows of a cancelled run, within its loop interval, should the pipeline's process die
without a chance to.
"""
from __future__ import annotations

import json
import logging
import time

from gptoss_model.errors import PermanentError
from tasks.common import OUTPUT_ARTIFACT_KEY, StageParams
from tasks.kinds import Kind
from tasks.store import Manifest

# FLOW/DEPLOYMENT as `prefect deployment run` takes it (Prefect's flow and deployment names).
DEPLOYMENT_PATTERN = r"^[^/\s]+/[^/\s]+$"


def _log() -> logging.Logger | logging.LoggerAdapter:
    """The pipeline run's logger (its Logs tab), or this module's outside a flow run."""
    from prefect.exceptions import MissingContextError
    from prefect.logging import get_run_logger

    try:
        return get_run_logger()
    except MissingContextError:
        return logging.getLogger(__name__)


class StageDeploymentFailed(PermanentError, RuntimeError):
    """A stage's deployment is not there, or its run did not complete (the message names the run
    and its state; the run had its own retries)."""


def check_deployments(named: dict[str, str]) -> None:
    """Before any stage runs: each section's deployment (`{"train": "train/gpu"}`) is a deployment of
    that stage's flow that the server knows, so a typo fails the pipeline at once, not after the
    stages before it ran for hours."""
    from prefect.client.orchestration import get_client
    from prefect.exceptions import ObjectNotFound

    problems = []
    with get_client(sync_client=True) as client:
        for section, name in named.items():
            if name.split("/")[0] != section:
                problems.append(f"{section}.deployment: {name!r} is not a {section} deployment "
                                f"(FLOW/DEPLOYMENT, FLOW = {section})")
                continue
            try:
                client.read_deployment_by_name(name)
            except ObjectNotFound:
                problems.append(f"{section}.deployment: no deployment {name!r} on this Prefect server "
                                "(`prefect deployment ls` lists them; `prefect deploy` creates them)")
    if problems:
        raise StageDeploymentFailed("; ".join(problems))


def run_stage_deployment(deployment: str, params: StageParams, kind: Kind, *, poll_s: float = 2.0) -> Manifest:
    from prefect.client.orchestration import get_client
    from prefect.deployments import run_deployment
    from prefect.states import Cancelling

    child = run_deployment(deployment, parameters={"params": params.model_dump(mode="json")}, timeout=0,
                           as_subflow=True)
    log = _log()
    log.info("%s: flow run %r created on its deployment's work pool; waiting for it", deployment, child.name)
    with get_client(sync_client=True) as client:
        try:
            while not (state := client.read_flow_run(child.id).state).is_final():
                time.sleep(poll_s)
        except BaseException:  # the pipeline is being stopped: so is the stage it started
            log.warning("%s: cancelling flow run %r, the pipeline is stopping", deployment, child.name)
            client.set_flow_run_state(child.id, Cancelling(message="the pipeline that started it stopped"),
                                      force=True)
            raise
        if not state.is_completed():
            raise StageDeploymentFailed(f"{deployment}: flow run {child.name!r} ({child.id}) ended "
                                        f"{state.name}: {state.message or 'no message'}")
        manifest = _output_of(client, child.id, params, kind, f"{deployment}: flow run {child.name!r}")
    log.info("%s: %s (flow run %r)", deployment, manifest.spec, child.name)
    return manifest


def _output_of(client, flow_run_id, params: StageParams, kind: Kind, where: str) -> Manifest:
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterFlowRunId, ArtifactFilterKey

    artifacts = client.read_artifacts(artifact_filter=ArtifactFilter(
        key=ArtifactFilterKey(any_=[OUTPUT_ARTIFACT_KEY]), flow_run_id=ArtifactFilterFlowRunId(any_=[flow_run_id])))
    if not artifacts:
        raise StageDeploymentFailed(f"{where} completed without publishing its output ({OUTPUT_ARTIFACT_KEY}): "
                                    "is that deployment a gptoss stage flow?")
    data = artifacts[0].data
    try:
        (row,) = json.loads(data) if isinstance(data, str) else data
        produced = (row["kind"], row["name"], row["version"])
    except (ValueError, TypeError, KeyError) as e:
        raise StageDeploymentFailed(f"{where}: its output artifact is not a gptoss stage output ({e})") from None
    if produced[0] != kind:
        raise StageDeploymentFailed(f"{where} produced a {produced[0]} artifact; this stage makes {kind}")
    return params.store.open().resolve(*produced)
