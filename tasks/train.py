"""Train stage: recipe + `megatron-checkpoint` + `dataset` -> `train-checkpoint` versions.

flows/train.py -> here -> gptoss_model/training/ (torchrun -m gptoss_model.train)

The run's identity is a fingerprint of the resolved config (recipe + overrides,
without local paths) and the input artifacts' versions. Its working directory
`{workdir}/train-{identity}` keeps checkpoints across attempts. While torchrun
runs, every checkpoint the trainer completes (the tracker file names it) is
committed as a `train-checkpoint` version (parameters: run identity and
iteration; inputs: base checkpoint and dataset; the recipe is in the manifest's
parameters): one run, several versions, so the stage gives `commits` rather than
`plan`. A retry on another machine first pulls the newest committed version and
resumes from it. The flow's cancellation/failure hooks kill the torchrun process
group through the pid file, found from the parameters alone (`pid_file(params)`):
stopping a run never needs the store.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import re
import shutil
from pathlib import Path
from typing import Annotated, Any

from pydantic import Field, field_validator, model_validator

from gptoss_model.training import launch
from gptoss_model.training.input_digests import DIGESTS_FILE
from gptoss_model.training.config import ConfigError, RunConfig, apply_overrides, save_yaml, to_dict
from gptoss_model.training.launch import TrainingFailed, TrainingRefused
from gptoss_model.training.launchers import (KubernetesLaunch, LocalLaunch, SlurmLaunch, launch_problems,
                                             world_size)
from gptoss_model.training.recipes import RECIPES
from tasks.common import StageParams, StageProgress, StoreSettings, default_workdir, in_prefect_run
from tasks.kinds import Kind
from tasks.stage import Input, ResolvedInputs, Stage, StageRun, Version
from tasks.store import ArtifactStore, Manifest, StageResult
from tasks.store.names import ARTIFACT_NAME_PATTERN, ARTIFACT_SPEC_PATTERN

log = logging.getLogger(__name__)

KIND = Kind.TRAIN_CHECKPOINT
# A train-checkpoint is a base too: continued pretraining starts from the newest one (`continued_base`).
INPUTS = (Input("base_checkpoint", Kind.MEGATRON_CHECKPOINT, Kind.TRAIN_CHECKPOINT), Input("dataset", Kind.DATASET))

__all__ = ["TRAIN", "TrainParams", "TrainingFailed", "TrainingRefused", "pid_file", "run_train", "train_model"]


# A known recipe name or a .yaml/.yml path: the Prefect server refuses anything else at run creation.
RECIPE_PATTERN = rf"^(?:(?:{'|'.join(RECIPES)})(?:_config)?|.+\.ya?ml)$"


class TrainParams(StageParams):
    """Launch torchrun, stream rank 0's log, commit each checkpoint; a retry resumes from the newest."""

    recipe: str = Field(..., pattern=RECIPE_PATTERN,
                        description=f"a recipe ({', '.join(RECIPES)}) or the path of a YAML run config")
    overrides: dict[str, Any] = Field(default_factory=dict, description="dotted config keys, e.g. "
                                      "{'train.train_iters': 100, 'optimizer.lr': 1e-4}")
    base_checkpoint: str | None = Field(None, pattern=ARTIFACT_SPEC_PATTERN, description="megatron-checkpoint/NAME[@VERSION|@REF] "
                                        "or train-checkpoint/NAME[@VERSION|@REF]: initial weights")
    dataset: str | None = Field(None, pattern=ARTIFACT_SPEC_PATTERN, description="dataset/NAME[@VERSION|@REF]: its data_prefixes are trained on")
    name: str = Field(..., pattern=ARTIFACT_NAME_PATTERN, description="output artifact name (train-checkpoint/NAME)")
    nproc_per_node: int = Field(1, ge=1, le=64, description="torchrun processes on this host (without a launcher)")
    launcher: Annotated[LocalLaunch | SlurmLaunch | KubernetesLaunch, Field(discriminator="kind")] | None = Field(
        None, description="where the processes run: {kind: local, nodes, procs_per_node} (default: one node of "
        "nproc_per_node here), {kind: slurm, nodes, procs_per_node, partition, time_limit, ...} "
        "(infra/slurm/train.sbatch) or {kind: kubernetes, nodes, procs_per_node, gpus_per_node, namespace, image, "
        "checkpoint_volume_claim, env_from_secret, ...} (infra/kubernetes/README.md)")
    workdir: str | None = Field(None, description="run directory root (kept across attempts); default GPTOSS_WORKDIR")
    store: StoreSettings = Field(default_factory=StoreSettings)

    @model_validator(mode="after")
    def _launcher_fits(self) -> "TrainParams":
        if self.launcher is not None and (problems := launch_problems(self.launcher)):
            raise ValueError("; ".join(problems))
        return self

    def launch(self) -> LocalLaunch | SlurmLaunch | KubernetesLaunch:
        return self.launcher or LocalLaunch(procs_per_node=self.nproc_per_node)

    @field_validator("recipe", mode="before")
    @classmethod
    def _known_recipe(cls, recipe):
        if isinstance(recipe, str) and recipe.removesuffix("_config") not in RECIPES and not re.search(
                r"\.ya?ml$", recipe):
            raise ValueError(f"recipe {recipe!r}: not a recipe ({', '.join(RECIPES)}) nor a YAML run config "
                             "(a path ending in .yaml)")
        return recipe


def resolve_run(params: TrainParams, store: ArtifactStore, *, materialize: bool = True,
                resolved: dict[str, Manifest | None] | None = None):
    """(RunConfig with local input paths, the input manifests, the run identity).

    `materialize=False` skips pulling the inputs (the identity needs only their versions);
    `resolved`: the inputs already resolved (by the stage runner)."""
    from gptoss_model.training.recipes import recipe
    from gptoss_model.train import load_run_config

    run = (recipe(params.recipe) if params.recipe.removesuffix("_config") in RECIPES
           else load_run_config(params.recipe, []))
    run = apply_overrides(run, params.overrides)
    if resolved is None:
        resolved = ResolvedInputs(INPUTS, params, store)
    base, data = resolved["base_checkpoint"], resolved["dataset"]
    inputs = []
    if base is not None:
        inputs.append(base)
        run.checkpoint.pretrained_checkpoint = str(store.local_path(base)) if materialize else base.spec
    if data is not None:
        inputs.append(data)
        prefixes = data.metrics.get("data_prefixes")
        if not prefixes:
            raise ConfigError(f"{data.spec}: its manifest lists no data_prefixes")
        if any(f.path == "sft.json" for f in data.files):  # the packed SFT layout
            run.data.kind = "sft"
        if materialize:
            root = store.local_path(data)
            run.data.data_paths = [str(root / p) for p in prefixes]
    identity_cfg = recorded_config(run)
    identity_cfg["checkpoint"]["pretrained_checkpoint"] = None
    identity_cfg["data"]["data_paths"] = []
    identity_cfg["dir"] = None
    blob = json.dumps({"name": params.name, "config": identity_cfg,
                       "inputs": [(m.kind, m.name, m.version) for m in inputs]}, sort_keys=True)
    return run, inputs, hashlib.sha256(blob.encode()).hexdigest()[:16]


def recorded_config(run: RunConfig) -> dict:
    """The run config as versions fingerprint and record it: without what only says how this attempt
    is run (the stop file a launcher watches, the input digest list the nodes check), so the same
    training is the same version anywhere."""
    config = to_dict(run)
    for how_run in ("stop_file", "input_digests"):
        config["train"].pop(how_run, None)
    return config


def run_dir(params: TrainParams, identity: str) -> Path:
    return default_workdir(params.workdir) / f"train-{identity}"


def pid_file(params: TrainParams) -> Path:
    """Where the running torchrun's pid is kept: from the parameters alone, so the cancellation hook
    finds it without the store (which may be what failed)."""
    return launch.pid_file(default_workdir(params.workdir), params.model_dump_json())


def stop_torchrun(params: TrainParams) -> None:
    """Cancelled or failed: no torchrun or rank may outlive the run (killed by process group)."""
    launch.kill_from_pid_file(pid_file(params))


def continued_base(store: ArtifactStore, name: str, dataset: Manifest | None, first: Manifest) -> Manifest:
    """The base of a continued-pretraining run of train-checkpoint/`name` on `dataset`: the newest
    version of that name (its `latest`), or `first` (the converted checkpoint) before there is one.

    Where the newest version was itself trained on this very dataset, that training is this one
    again: its own base is returned, so the run's identity, hence its versions, are the same and
    a rerun without new data is a cache hit instead of training once more on the same data."""
    from tasks.store import ArtifactNotFound

    try:
        newest = store.resolve(str(KIND), name)
    except ArtifactNotFound:
        return first
    inputs = {i.kind: i for i in newest.inputs}
    trained_on = inputs.get(str(Kind.DATASET))
    if dataset is None or trained_on is None or trained_on.version != dataset.version:
        return newest
    base = inputs.get(str(Kind.TRAIN_CHECKPOINT)) or inputs.get(str(Kind.MEGATRON_CHECKPOINT))
    return store.resolve(base.kind, base.name, base.version) if base is not None else first


def _committed(store: ArtifactStore, name: str, identity: str) -> list:
    return sorted((m for m in store.list(KIND) if m.name == name and m.parameters.get("run") == identity),
                  key=lambda m: m.parameters["iteration"])


def _pull_newest(store: ArtifactStore, name: str, identity: str, save_dir: Path) -> int | None:
    """Put the newest committed checkpoint of this run into save_dir (a retry elsewhere)."""
    from gptoss_model.checkpoint.layout import TRACKER_FILE
    from gptoss_model.training.checkpoint import CheckpointError, latest_iteration

    tracker = save_dir / TRACKER_FILE
    if tracker.is_file():
        try:
            return latest_iteration(save_dir)
        except CheckpointError as e:  # the local copy is damaged; the store holds what was committed
            aside = tracker.with_name(f"{TRACKER_FILE}.unreadable")
            tracker.replace(aside)
            log.warning("%s; moved it to %s and resuming from the newest committed checkpoint instead", e, aside)
    done = _committed(store, name, identity)
    if not done:
        return None
    newest = done[-1]
    store.download(newest, save_dir)
    log.info("resuming from committed %s (iteration %d)", newest.spec, newest.parameters["iteration"])
    return newest.parameters["iteration"]


def train_commits(run: StageRun[TrainParams]) -> StageResult:
    """Launch, watch, commit each checkpoint; the newest committed version is the result.

    A run already trained to its last iteration is a cache hit: its versions are found by the run
    identity recorded in their parameters (each version also fingerprints the resolved config)."""
    params, store = run.params, run.store
    planned, _, identity = resolve_run(params, store, materialize=False, resolved=run.inputs)
    if hit := _trained_already(store, params.name, identity, planned.train.train_iters):
        return hit
    home = run_dir(params, identity)
    with _run_dir_held(home):
        # Another run of the same identity may have finished while this one waited.
        return (_trained_already(store, params.name, identity, planned.train.train_iters)
                or _train(run, identity))


def _trained_already(store: ArtifactStore, name: str, identity: str, train_iters: int) -> StageResult | None:
    done = _committed(store, name, identity)
    if done and done[-1].parameters["iteration"] >= train_iters:  # nothing left to train
        log.info("train: %s (cache hit: trained to iteration %d)", done[-1].spec, done[-1].parameters["iteration"])
        return StageResult(done[-1], cache_hit=True)
    return None


@contextlib.contextmanager
def _run_dir_held(home: Path):
    """One run at a time in a run dir: a second run of the same identity waits, then reuses what
    the first committed. The lock (`.train-ID.lock`) also tells `gptoss artifacts gc` the dir is live."""
    from gptoss_model.system.paths import try_lock, work_dir_lock

    home.mkdir(parents=True, exist_ok=True)
    lock = work_dir_lock(home)
    fd = try_lock(lock)
    if fd is None:
        log.info("another run of the same training holds %s; waiting for it to finish", home)
        fd = try_lock(lock, blocking=True)
    try:
        yield
    finally:
        os.close(fd)


def _train(stage_run: StageRun[TrainParams], identity: str) -> StageResult:
    from gptoss_model.checkpoint.layout import TRACKER_FILE, iter_dir_name
    from gptoss_model.training.metrics import read_metrics
    from gptoss_model.training.preflight import preflight

    params, store = stage_run.params, stage_run.store
    run, inputs, _ = resolve_run(params, store, resolved=stage_run.inputs)
    home = run_dir(params, identity)
    run.dir = str(home)
    run.checkpoint.save = str(home / "checkpoints")
    run.checkpoint.load = None
    launch_config = params.launch()
    if isinstance(launch_config, SlurmLaunch):  # its time-limit signal becomes a save and a requeue
        run.train.stop_file = str(home / "save-and-stop")
    save_dir = run.save_dir()
    save_dir.mkdir(parents=True, exist_ok=True)
    _pull_newest(store, params.name, identity, save_dir)
    if launch_config.nodes > 1 or not isinstance(launch_config, LocalLaunch):
        # other nodes read what this host verified: each checks its own view once (a lone agent here
        # reads the very files the store has just verified, so hashing them again would be work twice)
        run.train.input_digests = str(_write_input_digests(store, inputs, home / DIGESTS_FILE))
    world = world_size(launch_config)
    print(preflight(run, world, local_world_size=launch_config.procs_per_node))  # before launch
    config_yaml = home / "run_config.yaml"
    save_yaml(run, config_yaml)
    progress = StageProgress(f"train {params.name} ({run.train.train_iters} iterations)")
    state = {"committed": {m.parameters["iteration"] for m in _committed(store, params.name, identity)},
             "last": None}

    def commit(iteration: int) -> StageResult:
        def build(staging: Path) -> dict:
            shutil.copytree(save_dir / iter_dir_name(iteration), staging / iter_dir_name(iteration))
            (staging / TRACKER_FILE).write_text(str(iteration))
            recs = [r for r in read_metrics(run.metrics_path()) if r["iteration"] <= iteration and "loss" in r]
            return {"iteration": iteration, "loss": recs[-1]["loss"] if recs else None,
                    "consumed_samples": iteration * run.train.global_batch_size, "recipe": params.recipe}

        return stage_run.commit(Version(name=params.name, build=build, inputs=inputs, identity={
            "run": identity, "iteration": iteration, "config": recorded_config(run) | {"dir": None}}))

    def watch() -> None:
        tracker = save_dir / TRACKER_FILE
        if tracker.is_file():
            # Every iter dir up to the tracker's iteration is complete (the tracker moves only
            # after a save finished); commit each, also those two polls apart.
            latest = int(tracker.read_text().strip())
            saved = sorted(int(d.name[5:]) for d in save_dir.glob("iter_*") if d.name[5:].isdigit())
            for it in (i for i in saved if i <= latest and i not in state["committed"]):
                state["last"] = commit(it)
                state["committed"].add(it)
        if run.metrics_path().is_file():
            recs = [r for r in read_metrics(run.metrics_path()) if "loss" in r]
            if recs:
                progress(recs[-1]["iteration"], run.train.train_iters)

    launch.supervise(config_yaml, launch_config, pid_file=pid_file(params), poll=watch,
                     saved=lambda: sorted(state["committed"]), job_name=f"gptoss-{params.name}"[:64])
    recs = [r for r in read_metrics(run.metrics_path()) if "loss" in r] if run.metrics_path().is_file() else []
    reached = recs[-1]["iteration"] if recs else 0
    if reached < run.train.train_iters:  # torchrun exits 0 when its ranks were terminated by a signal
        raise TrainingFailed(f"training stopped at iteration {reached} of {run.train.train_iters}; "
                             f"checkpoints committed: {sorted(state['committed'])}")
    progress.finish()
    publish_metrics(run)
    if state["last"] is None:  # everything was already committed (a rerun)
        done = _committed(store, params.name, identity)
        if not done:
            raise ConfigError("training finished without a checkpoint: set checkpoint.save_final=true")
        return StageResult(done[-1], cache_hit=True)
    return state["last"]


def _write_input_digests(store: ArtifactStore, inputs: list[Manifest], path: Path) -> Path:
    """The inputs' files as every node will read them, with their manifests' sha256: each node checks
    them once before training (training/input_digests.py)."""
    from gptoss_model.training.input_digests import InputFile, write_digests

    write_digests(path, (InputFile(str(store.local_path(m) / f.path), f.size, f.sha256, m.spec)
                         for m in inputs for f in m.files))
    return path


def publish_metrics(run: RunConfig) -> None:
    """A metrics table and a loss-curve picture (markdown with an embedded PNG) on the run."""
    if not in_prefect_run() or not run.metrics_path().is_file():
        return
    import base64
    import io

    from prefect.artifacts import create_markdown_artifact, create_table_artifact

    from gptoss_model.training.metrics import read_metrics

    recs = read_metrics(run.metrics_path())
    train = [r for r in recs if "loss" in r]
    create_table_artifact(key="train-metrics", description=f"{run.name}: per-step metrics", table=[
        {k: (round(v, 6) if isinstance(v, float) else v) for k, v in r.items()} for r in train])
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        log.warning("matplotlib is not installed: no loss-curve picture")
        return
    fig, ax = plt.subplots(figsize=(6, 3.5))
    ax.plot([r["iteration"] for r in train], [r["loss"] for r in train], label="train")
    val = [r for r in recs if "val_loss" in r]
    if val:
        ax.plot([r["iteration"] for r in val], [r["val_loss"] for r in val], "o-", label="validation")
    ax.set_xlabel("iteration")
    ax.set_ylabel("loss")
    ax.legend()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100, bbox_inches="tight")
    plt.close(fig)
    png = base64.b64encode(buf.getvalue()).decode()
    create_markdown_artifact(key="train-loss-curve", description=f"{run.name}: loss curve",
                             markdown=f"### {run.name}: loss\n\n![loss curve](data:image/png;base64,{png})")


TRAIN = Stage(name="train", output=KIND, params=TrainParams, code_version="1", inputs=INPUTS,
              commits=train_commits, describe=lambda p: f"train {p.name} ({p.recipe})", on_stop=stop_torchrun,
              cli_args=("recipe", "name", "base_checkpoint", "dataset"))
run_train = TRAIN.run
train_model = TRAIN.task
