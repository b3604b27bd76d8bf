"""A pipeline stage, declared once, and the runner that derives everything else from it.

A stage module declares what its stage takes and makes:

    CONVERT = Stage(
        name="convert", output=Kind.MEGATRON_CHECKPOINT, params=ConvertParams, code_version="3",
        inputs=(Input("source", Kind.HF_CHECKPOINT),), plan=plan_convert,
        describe=lambda p: f"convert {p.source} ({p.dtype})", cli_args=("source", "dtype", "workers"))

and `plan(run) -> Version` says what the one version this run produces is: its name,
what defines it, and how to build it. From that the runner derives:

- `stage.run(params, store)`: the inputs resolved (one resolver: a wrong kind or a missing
  artifact is an `InputError` naming the parameter), the version fingerprinted, committed
  once, a cache hit when committed already (tests and the CLI call this, no Prefect);
- `stage.task`: the Prefect task (retries for transient failures only, a run name, library
  logs in the run, one progress artifact, a keyed artifact naming what was produced);
- `@stage.flow`: the Prefect flow, named `stage.name`, on a one-line function in flows/<name>.py;
- `gptoss <name>` and `python -m flows.<name>`: command lines built from the params model.

A stage whose run commits several versions (train: one per checkpoint) gives `commits(run)`
instead of `plan`: it calls `run.commit(version)` for each and returns the last. A stage whose
workers write straight into the store (preprocess on Dask) says so on its `Version`.
"""
from __future__ import annotations

import functools
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Generic, TypeVar

from pydantic import BaseModel

from tasks.common import run_logged_stage, stage_task
from tasks.kinds import Kind
from tasks.store import ArtifactStore, InvalidNameError, Manifest, StageResult, parse_artifact_spec

P = TypeVar("P", bound=BaseModel)


class InputError(InvalidNameError):
    """A parameter names an artifact this stage cannot take (another kind, a malformed spec)."""


@dataclass(frozen=True)
class Input:
    """A parameter holding an input artifact's spec, and the kinds it may name."""

    param: str
    kinds: tuple[Kind, ...]

    def __init__(self, param: str, *kinds: Kind):
        object.__setattr__(self, "param", param)
        object.__setattr__(self, "kinds", tuple(kinds))


def resolve_input(store: ArtifactStore, param: str, spec: str, kinds: Sequence[Kind]) -> Manifest:
    """The committed version `spec` names (the `latest` ref when it names none), of one of `kinds`."""
    try:
        kind, name, selector = parse_artifact_spec(spec)
    except InvalidNameError as e:
        raise InputError(f"{param}={spec!r}: {e}") from None
    if kind not in kinds:
        raise InputError(f"{param}={spec!r}: expected {' or '.join(map(str, kinds))}, not a {kind} artifact")
    return store.resolve(kind, name, selector)


class ResolvedInputs(Mapping):
    """The declared inputs by parameter name, each resolved when first read (a stage may refuse its
    parameters before the store is asked): the manifest, or None where the parameter is unset."""

    def __init__(self, declared: Sequence[Input], params: BaseModel, store: ArtifactStore):
        self._declared = {i.param: i for i in declared}
        self._params, self._store, self._resolved = params, store, {}

    def __getitem__(self, param: str) -> Manifest | None:
        if param not in self._resolved:
            spec = getattr(self._params, self._declared[param].param)
            self._resolved[param] = (resolve_input(self._store, param, spec, self._declared[param].kinds)
                                     if spec else None)
        return self._resolved[param]

    def __iter__(self):
        return iter(self._declared)

    def __len__(self) -> int:
        return len(self._declared)


@dataclass(frozen=True)
class Version:
    """One version a stage commits: `build(staging_dir) -> metrics` runs only when it is new.

    `identity` is what defines the output besides the code version and the inputs (it is
    fingerprinted into the version and recorded as the manifest's parameters)."""

    name: str
    identity: Any
    build: Callable[..., Any]
    inputs: Sequence[Manifest] = ()
    resumable: bool = False        # the staging dir survives a failed attempt; the next one resumes in it
    writes_to_store: bool = False  # build(staging, version_prefix) -> (metrics, files it put in the store)
    after: Callable[[StageResult], None] | None = None  # on the committed (or cached) result: push, clean up


@dataclass
class StageRun(Generic[P]):
    """One run of a stage: its params, the store, and the inputs its declaration named."""

    stage: "Stage[P]"
    params: P
    store: ArtifactStore
    inputs: Mapping[str, Manifest | None]
    options: dict[str, Any] = field(default_factory=dict)  # what a caller passes besides params (a progress callback)

    def commit(self, version: Version) -> StageResult:
        result = run_logged_stage(
            self.store, stage=self.stage.name, code_version=self.stage.code_version, kind=str(self.stage.output),
            name=version.name, params=version.identity, build=version.build, inputs=version.inputs,
            workdir=getattr(self.params, "workdir", None), resumable=version.resumable,
            writes_to_store=version.writes_to_store)
        if version.after is not None:
            version.after(result)
        return result


@dataclass(frozen=True, eq=False)
class Stage(Generic[P]):
    name: str                          # the flow, deployment and `gptoss` subcommand
    output: Kind
    params: type[P]
    code_version: str                  # bump when what lands in the artifact changes for the same inputs
    describe: Callable[[P], str]       # the task run's name: what this run does
    plan: Callable[[StageRun[P]], Version] | None = None
    commits: Callable[[StageRun[P]], StageResult] | None = None
    inputs: tuple[Input, ...] = ()
    task_name: str | None = None       # default: the stage name
    retries: int = 2
    retry_delay_seconds: tuple[float, ...] = (30, 120)
    cli_args: tuple[str, ...] = ()     # params fields taken as positional arguments, in order
    on_stop: Callable[[P], None] | None = None  # the flow was cancelled, failed or crashed: stop what it started
    report: Callable[[Manifest], tuple[str, list[dict]]] | None = None  # (title, rows) the CLI shows as a table

    def __post_init__(self):
        if (self.plan is None) == (self.commits is None):
            raise TypeError(f"stage {self.name}: give exactly one of plan (one version) or commits (several)")
        fields = self.params.model_fields
        for declared in [i.param for i in self.inputs] + list(self.cli_args):
            if declared not in fields:
                raise TypeError(f"stage {self.name}: {self.params.__name__} has no field {declared!r}")

    @property
    def summary(self) -> str:
        return (self.params.__doc__ or self.name).strip().split("\n")[0]

    def run(self, params: P, store: ArtifactStore | None = None, **options) -> StageResult:
        """The whole stage in this process, without Prefect's task machinery (tests, the CLI)."""
        store = store or params.store.open()
        run = StageRun(self, params, store, ResolvedInputs(self.inputs, params, store), options)
        if self.commits is not None:
            return self.commits(run)
        return run.commit(self.plan(run))

    @functools.cached_property
    def task(self):
        """The Prefect task: `task(params) -> Manifest`."""
        return stage_task(self.run, name=self.task_name or self.name, describe=self.describe,
                          retries=self.retries, retry_delay_seconds=self.retry_delay_seconds)

    def flow(self, fn: Callable[[P], Manifest]):
        """Decorate a flow file's function as this stage's Prefect flow (named after the stage, with its
        stop hooks). The function stays in the flow file, so deployments, `serve()` and Prefect's
        entrypoint loading find it where they look: `flows/<stage>.py:<stage>_flow`."""
        from prefect import flow

        hooks = [self._stop_hook] if self.on_stop is not None else []
        return flow(fn, name=self.name, on_cancellation=hooks, on_failure=hooks, on_crashed=hooks)

    def _stop_hook(self, flow, flow_run, state) -> None:  # noqa: ARG002 - Prefect's hook signature
        self.on_stop(self.params.model_validate(flow_run.parameters["params"]))
