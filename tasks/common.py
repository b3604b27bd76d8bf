"""Prefect glue shared by every stage: the store from settings or blocks, the stage task
declaration, progress, logs and artifacts in the flow run.

A stage's task module is a params model, a `run_<stage>(params, store)` and one
declaration:

    preprocess_dataset = stage_task(run_preprocess, name="preprocess-dataset",
                                    describe=lambda p: f"preprocess {p.name}")

(see docs/architecture.md, "Adding a stage").
"""
from __future__ import annotations

import contextlib
import contextvars
import logging
import re
import threading
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Annotated, Any, TypeVar

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field

from gptoss_model.errors import PermanentError, is_permanent
from gptoss_model.system.paths import URL_WITHOUT_CREDENTIALS_PATTERN, url_credentials_problem
from tasks.store import ArtifactStore, InputRef, Manifest, ProgressSink, StageResult, run_stage
from gptoss_model.settings import settings

log = logging.getLogger(__name__)

_BOTO_KEYS = ("aws_access_key_id", "aws_secret_access_key", "aws_session_token")
# Our loggers, forwarded into the Prefect run's logs while a stage task runs.
STAGE_LOGGERS = ("gptoss_model", "tasks")


def _refuse_credentials(url):
    if isinstance(url, str) and (problem := url_credentials_problem(url)):
        raise ValueError(problem)
    return url


# A URL stored with a run (parameters, manifests) or shown in its logs: never with user:password@.
# The pattern makes the Prefect server refuse one when the run is created; the validator says why.
PlainUrl = Annotated[str, Field(pattern=URL_WITHOUT_CREDENTIALS_PATTERN), BeforeValidator(_refuse_credentials)]


class StageParams(BaseModel):
    """Parameters of a stage or pipeline. Unknown keys are refused, by the Prefect server when the
    run is created (the schema says additionalProperties: false): a misspelt key or a secret
    pasted as a parameter is never stored in Prefect's database. A refused value is never
    echoed in the error (it may be a password)."""

    model_config = ConfigDict(extra="forbid", hide_input_in_errors=True)


class StoreSettings(StageParams):
    """Where artifacts live. Holds no secret: credentials come from the named
    Prefect Secret block or from boto3's usual chain (environment, profile, role)."""

    url: PlainUrl = Field(default_factory=lambda: settings().store_url,
                          description="fsspec URL of the store root: file://... (default) or s3://bucket/prefix")
    s3_endpoint_url: PlainUrl | None = Field(default_factory=lambda: settings().s3_endpoint_url,
                                        description="S3-compatible endpoint (MinIO, Ceph, moto); None for AWS")
    credentials_block: str | None = Field(
        default=None, description="Name of a Prefect Secret block holding JSON "
        "{aws_access_key_id, aws_secret_access_key[, aws_session_token]}")

    def open(self) -> ArtifactStore:
        creds = None
        if self.credentials_block:
            value = load_secret_block(self.credentials_block, "S3 credentials")
            if not isinstance(value, dict):
                raise SecretBlockError(f"Prefect Secret block {self.credentials_block!r} must hold a JSON object "
                                       f"with keys {', '.join(_BOTO_KEYS[:2])}")
            creds = {k: value[k] for k in _BOTO_KEYS if value.get(k)}
        return ArtifactStore(self.url, s3_endpoint_url=self.s3_endpoint_url, s3_credentials=creds)


def default_workdir(workdir: str | None) -> Path:
    return Path(workdir) if workdir else settings().workdir


# ------------------------------------------------------------------- secrets
class SecretBlockError(PermanentError, ValueError):
    """A named Prefect Secret block that is missing or holds the wrong shape of value."""


def load_secret_block(block: str, what: str):
    """The value of Prefect Secret block `block`; a missing block is named with how to create it."""
    from prefect.blocks.system import Secret

    try:
        return Secret.load(block).get()
    except ValueError as exc:
        if "Unable to find block document" not in str(exc):
            raise
        raise SecretBlockError(
            f"Prefect Secret block {block!r} ({what}) does not exist. Create it with: "
            f"python -c \"from prefect.blocks.system import Secret; Secret(value='...').save('{block}')\", "
            "or leave the parameter unset") from None


# ------------------------------------------------------------------ context
def in_prefect_run() -> bool:
    from prefect.context import FlowRunContext, TaskRunContext

    return FlowRunContext.get() is not None or TaskRunContext.get() is not None


def artifact_key(*parts: str) -> str:
    """A Prefect artifact key (lowercase letters, digits, dashes) from kind/name parts."""
    return re.sub(r"-+", "-", re.sub(r"[^a-z0-9-]", "-", "-".join(parts).lower())).strip("-")[:100]


# ----------------------------------------------------------------- progress
class PrefectProgress(ProgressSink):
    """A Prefect progress artifact, updated at most every few seconds, and at 100% on finish."""

    def __init__(self, min_interval: float = 2.0):
        super().__init__(min_interval=min_interval)
        self._artifact_id = None
        self._render_lock = threading.Lock()  # threads reporting at once create one artifact, not two

    def render(self, force: bool) -> None:
        from prefect.artifacts import create_progress_artifact, update_progress_artifact

        with self._render_lock:
            pct = round(100.0 * self.fraction, 1)
            if self._artifact_id is None:
                self._artifact_id = create_progress_artifact(pct, description=self.text[:200])
            else:
                update_progress_artifact(self._artifact_id, pct, description=self.text[:200])


# The stage task run's one progress sink: its own progress and its store transfers share one artifact.
_stage_sink: contextvars.ContextVar[ProgressSink | None] = contextvars.ContextVar("gptoss_stage_sink", default=None)


@contextlib.contextmanager
def progress_to(sink: ProgressSink):
    """For the duration, every progress sink asked for is `sink`: a stage task run shows one progress
    artifact, the CLI one set of bars. (A module-level function: a stage task pickled to a Dask worker
    refers to it by name; a ContextVar itself cannot be pickled.)"""
    token = _stage_sink.set(sink)
    try:
        yield
    finally:
        _stage_sink.reset(token)


def one_progress_artifact():
    return progress_to(progress_sink())


def progress_sink() -> ProgressSink:
    """The running stage task's sink (one progress artifact per stage run), else a new one."""
    current = _stage_sink.get()
    if current is not None:
        return current
    return PrefectProgress() if in_prefect_run() else ProgressSink()


class StageProgress:
    """The one adapter from a library's `progress(done, total)` callback to a progress sink.

    Library code reports absolute counts, possibly from worker threads, and they go to the
    sink as absolute counts (a store transfer in between may have used the same sink).
    Calls run in a copy of the creating thread's context, so a Prefect progress artifact
    updated from a worker thread still belongs to this task run. `finish()` marks the work
    complete (100%), whatever the last throttled update was.
    """

    def __init__(self, description: str, sink: ProgressSink | None = None):
        self.description = description
        self.sink = sink if sink is not None else progress_sink()
        self._total, self._note = 0, ""
        self._ctx = contextvars.copy_context()

    def _call(self, fn, *args) -> None:
        if self.sink is None:
            return
        try:
            self._ctx.copy().run(fn, *args)
        except Exception as e:  # a progress bar must never fail a 65 GB job
            log.warning("progress reporting failed (%s); continuing without it", type(e).__name__)
            self.sink = None

    def __call__(self, done: int, total: int, note: str = "") -> None:
        """`note`: what the counts mean so far (documents, tokens/s), shown beside the description."""
        self._total, self._note = total, note
        self._call(lambda: self.sink.set(done, total, self.description, note))

    def finish(self) -> None:
        sink = self.sink
        if sink is None:
            return
        self._call(lambda: sink.set(self._total, self._total, self.description, self._note))
        self._call(sink.finish)


# --------------------------------------------------------------- the stage
def run_logged_stage(store: ArtifactStore, *, stage: str, code_version: str, kind: str, name: str,
                     params: Any, build: Callable[..., Any],
                     inputs: Iterable[Manifest | InputRef] = (), **kw) -> StageResult:
    """run_stage plus a keyed markdown artifact describing what was produced or reused."""
    result = run_stage(store, stage=stage, code_version=code_version, kind=kind, name=name, params=params,
                       build=build, inputs=inputs, progress=progress_sink(), **kw)
    log.info("%s: %s (%s)", stage, result.spec, "cache hit" if result.cache_hit else "committed")
    if in_prefect_run():
        from prefect.artifacts import create_markdown_artifact

        create_markdown_artifact(key=artifact_key(kind, name), markdown=manifest_markdown(store, result),
                                 description=f"{stage} output: {result.spec}")
    return result


def manifest_markdown(store: ArtifactStore, result: StageResult) -> str:
    m = result.manifest
    lines = [f"### {m.kind}/{m.name}", "",
             f"- version: `{m.version}` ({'cache hit, nothing recomputed' if result.cache_hit else 'new'})",
             f"- location: `{store.uri(m.kind, m.name, m.version)}`",
             f"- files: {len(m.files)}, {m.total_bytes / 1e6:.1f} MB",
             f"- inputs: {', '.join(f'`{i.kind}/{i.name}@{i.version}`' for i in m.inputs) or 'none'}"]
    if m.metrics:
        lines += ["", "| metric | value |", "|---|---|"] + [f"| {k} | {v} |" for k, v in sorted(m.metrics.items())]
    return "\n".join(lines)


def retry_worthwhile(task, task_run, state) -> bool:  # noqa: ARG001 - Prefect's signature
    """Retry unless the failure is a PermanentError (bad input, failed gate): those fail at once."""
    try:
        exc = state.result(raise_on_failure=False)
    except Exception as e:  # the result could not be read back: judge by what was raised instead
        exc = e
    return not is_permanent(exc)


# A stage's lines that also belong on the pipeline run that started it (the run a user watches).
_KEY_LINE = re.compile(r"committed|cache hit|gate|refused|resum|hung|error|iteration\s+\d*0 \|", re.IGNORECASE)


def _root_flow_run_id(ctx) -> str | None:
    """The outermost flow run, when the stage runs inside another (a pipeline); else None."""
    if ctx is None:
        return None
    try:
        from prefect.runtime import flow_run

        root = flow_run.get_root_flow_run_id()
    except Exception:  # noqa: BLE001 - no API to ask: the stage's own logs still hold everything
        return None
    return root if root and str(root) != str(ctx.task_run.flow_run_id) else None


def _key_lines_to(flow_run_id: str):
    from prefect.logging.handlers import APILogHandler

    class KeyLinesTo(APILogHandler):
        """Copies of a stage's key lines (commits, cache hits, gates, errors, every 10th
        training iteration) on the pipeline's run, so its Logs tab tells the story."""

        def emit(self, record: logging.LogRecord) -> None:
            if record.levelno < logging.WARNING and not _KEY_LINE.search(record.getMessage()):
                return
            copy = logging.makeLogRecord(record.__dict__)
            copy.flow_run_id, copy.task_run_id = flow_run_id, None
            super().emit(copy)

    return KeyLinesTo()


@contextlib.contextmanager
def run_logs_forwarded():
    """Our library's and tasks' log records also go to the Prefect run's logs (the UI), for the duration."""
    from prefect.context import TaskRunContext
    from prefect.logging.handlers import APILogHandler

    ctx = TaskRunContext.get()
    run_ids = {"flow_run_id": ctx.task_run.flow_run_id, "task_run_id": ctx.task_run.id} if ctx else {}

    class RunLogHandler(APILogHandler):
        """Also for records from the stage's own threads (a log reader, transfer workers),
        which carry no Prefect context: they belong to this task run too."""

        def emit(self, record: logging.LogRecord) -> None:
            for key, value in run_ids.items():
                if getattr(record, key, None) is None:
                    setattr(record, key, value)
            super().emit(record)

    handlers = [RunLogHandler()]
    root = _root_flow_run_id(ctx)
    if root is not None:
        handlers.append(_key_lines_to(root))
    loggers = [logging.getLogger(n) for n in STAGE_LOGGERS]
    saved = [(lg, lg.level) for lg in loggers]
    for lg in loggers:
        for handler in handlers:
            lg.addHandler(handler)
        if lg.getEffectiveLevel() > logging.INFO:
            lg.setLevel(logging.INFO)
    try:
        yield
    finally:
        for lg, level in saved:
            for handler in handlers:
                lg.removeHandler(handler)
            lg.setLevel(level)


P = TypeVar("P", bound=BaseModel)


def stage_task(run: Callable[[P], StageResult], *, name: str, describe: Callable[[P], str],
               retries: int = 2, retry_delay_seconds: Iterable[float] = (30, 120),
               timeout_seconds: float | None = None):
    """Declare a stage's Prefect task: `task(params) -> Manifest` (a cache hit when committed).

    Retries back off on transient failures and never repeat a PermanentError; the task
    run is named `describe(params)`; our loggers reach the run's logs.
    """
    from prefect import task

    def run_name() -> str:
        from prefect.runtime import task_run

        return describe(task_run.parameters["params"])

    def stage(params: P) -> Manifest:
        with one_progress_artifact(), run_logs_forwarded():
            manifest = run(params).manifest
        publish_output(manifest)
        return manifest

    stage.__name__ = stage.__qualname__ = name.replace("-", "_")
    stage.__doc__ = f"Prefect task for {run.__module__}.{run.__name__}: {(run.__doc__ or '').strip()}"
    return task(stage, name=name, retries=retries, retry_delay_seconds=list(retry_delay_seconds),
                retry_condition_fn=retry_worthwhile, task_run_name=run_name, timeout_seconds=timeout_seconds)


# The keyed artifact naming what a stage run produced: how a pipeline that ran the stage as a
# deployment elsewhere learns its result (read back as JSON through the API, never unpickled).
OUTPUT_ARTIFACT_KEY = "gptoss-stage-output"


def publish_output(manifest: Manifest) -> None:
    if not in_prefect_run():
        return
    from prefect.artifacts import create_table_artifact

    create_table_artifact(key=OUTPUT_ARTIFACT_KEY, table=[{"kind": manifest.kind, "name": manifest.name,
                                                           "version": manifest.version}],
                          description=f"this stage run's output: {manifest.spec}")


def publish_lineage(manifests: Iterable[Manifest], key: str = "gptoss-pipeline-lineage") -> None:
    """A keyed table artifact on the calling flow run: what each stage produced, from what."""
    if not in_prefect_run():
        return
    from prefect.artifacts import create_table_artifact

    rows = [{"artifact": f"{m.kind}/{m.name}", "version": m.version, "stage": m.producer.stage,
             "files": len(m.files), "MB": round(m.total_bytes / 1e6, 1), "created": m.created_at,
             "inputs": ", ".join(f"{i.kind}/{i.name}@{i.version}" for i in m.inputs) or "-"}
            for m in manifests]
    create_table_artifact(key=key, table=rows, description="artifacts of this pipeline run and their lineage")
