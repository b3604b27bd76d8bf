"""The end-to-end pipeline flow: each stage is its own flow, run here as a subflow.

    download -> hf-checkpoint -> convert (+ its gate) -> megatron-checkpoint [-> verify, above the gate's size]
    preprocess (tokenizer of that hf-checkpoint) -> dataset
    train (megatron-checkpoint + dataset) -> train-checkpoint
    export (train-checkpoint, or the megatron-checkpoint without training) -> hf-export -> verify

preprocess, train and export run when their section is in the parameters. Every
stage is a cache hit when its inputs did not change, so a rerun after a crash
resumes at the first stage without a committed output. A stage runs here, as a subflow,
unless its section names a deployment (`train: {deployment: train/gpu}`): then it runs
there, on that deployment's work pool, and the pipeline waits for it (flows/routing.py).
With `train: {continue_from_latest: true}` each run trains on from the newest
train-checkpoint of its name: continued pretraining on each new dataset version.
"""
from __future__ import annotations

from contextlib import contextmanager
from pathlib import Path

import yaml
from prefect import flow
from prefect.settings import temporary_settings
from pydantic import BaseModel, Field

from flows.convert import convert_flow
from flows.download import download_flow
from flows.export import export_flow
from flows.preprocess import preprocess_flow
from flows.routing import DEPLOYMENT_PATTERN, check_deployments, run_stage_deployment
from flows.train import train_flow
from flows.verify import verify_flow
from tasks.common import StageParams, publish_lineage
from tasks.convert import ConvertParams
from tasks.download import DownloadParams
from tasks.export import ExportParams
from tasks.kinds import Kind
from tasks.preprocess import PreprocessParams
from tasks.store import Manifest
from tasks.store.names import ARTIFACT_NAME_PATTERN, ARTIFACT_SPEC_PATTERN
from tasks.train import TrainParams, continued_base
from tasks.verify import VerifyParams

_FROM_EARLIER = "default: what the earlier stage of this run produced"


class Routable(BaseModel):
    deployment: str | None = Field(None, pattern=DEPLOYMENT_PATTERN, description=(
        "run this stage as that deployment, FLOW/DEPLOYMENT (e.g. train/gpu: its own work pool), and wait "
        "for it; default: in the pipeline's process"))


ROUTABLE = ("download", "convert", "preprocess", "train", "export")  # sections that may name a deployment


class PipelineDownloadParams(DownloadParams, Routable):
    pass


class PipelineConvertParams(ConvertParams, Routable):
    source: str | None = Field(None, pattern=ARTIFACT_SPEC_PATTERN, description=_FROM_EARLIER)


class PipelinePreprocessParams(PreprocessParams, Routable):
    tokenizer: str | None = Field(None, pattern=ARTIFACT_SPEC_PATTERN, description=_FROM_EARLIER)


class PipelineTrainParams(TrainParams, Routable):
    name: str | None = Field(None, pattern=ARTIFACT_NAME_PATTERN, description="default: '<checkpoint name>-<recipe>'")
    continue_from_latest: bool = Field(False, description=(
        "continued pretraining: start from the newest train-checkpoint/<name> (the converted checkpoint the "
        "first time), so each run with new data trains on from the last; unchanged data is a cache hit. "
        "Full-weight recipes only: a LoRA/DoRA run's checkpoints hold adapters, which pre-flight refuses as a base"))


class PipelineExportParams(ExportParams, Routable):
    source: str | None = Field(None, pattern=ARTIFACT_SPEC_PATTERN, description=_FROM_EARLIER)


class PipelineVerifyParams(StageParams):
    after_convert: bool = Field(True, description="verify the conversion when it is too large for convert's "
                                "own gate (layer-wise above whole_model_max_params)")
    after_export: bool = Field(True, description="verify the export against the checkpoint it was made from")
    whole_model_max_params: int = Field(2_000_000_000, ge=0)


class PipelineParams(StageParams):
    download: PipelineDownloadParams = Field(default_factory=PipelineDownloadParams)
    convert: PipelineConvertParams = Field(default_factory=PipelineConvertParams)
    preprocess: PipelinePreprocessParams | None = Field(None, description="tokenise a corpus (omit: no dataset)")
    train: PipelineTrainParams | None = Field(None, description="train a recipe (omit: no training)")
    export: PipelineExportParams | None = Field(None, description="export to HF (omit: no export)")
    verify: PipelineVerifyParams = Field(default_factory=PipelineVerifyParams)

    @classmethod
    def from_yaml(cls, path: str | Path) -> "PipelineParams":
        path = Path(path)
        try:
            data = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as exc:
            raise ValueError(f"{path}: not valid YAML: {exc}") from exc
        try:
            return cls.model_validate(data)
        except ValueError as exc:
            raise ValueError(f"{path}: {exc}") from exc


def _with(model: BaseModel, target: type[BaseModel], **defaults) -> BaseModel:
    """`model` as the stage's own params type, with the fields it left unset taken from `defaults`
    (and without the pipeline's own, such as `deployment`)."""
    data = {k: v for k, v in model.model_dump().items() if k in target.model_fields}
    data.update({k: v for k, v in defaults.items() if data.get(k) is None})
    return target.model_validate(data)


def _stage(stage_flow, section: BaseModel, params: StageParams, kind: Kind) -> Manifest:
    """The stage here, as a subflow, or as the deployment its section names."""
    deployment = getattr(section, "deployment", None)
    return stage_flow(params) if deployment is None else run_stage_deployment(deployment, params, kind)


@contextmanager
def _stages_in_this_process():
    """The stages run here as subflows of the pipeline, in its process: the pipeline run's own
    heartbeat already tells the server whether that process lives. A subflow's heartbeat thread
    sleeps in 1 s steps and Prefect joins it as the subflow ends, ~0.7 s per stage: 5 of the 7 s
    of a six-stage run that is all cache hits (benchmarks/cached_rerun.py). Run as their own
    deployments, the stage flows keep their heartbeats."""
    with temporary_settings(updates={"flows.heartbeat_frequency": None}):
        yield


@flow(name="gptoss-pipeline")
def gptoss_pipeline(params: PipelineParams | None = None) -> dict[str, str]:
    """Run every configured stage in order and return the artifact spec each produced."""
    params = params or PipelineParams()
    routed = {section: getattr(params, section).deployment for section in ROUTABLE
              if getattr(getattr(params, section), "deployment", None)}
    if routed:
        check_deployments(routed)
    with _stages_in_this_process():
        produced = _run_stages(params)
    publish_lineage(produced.values())
    return {str(what): manifest.spec for what, manifest in produced.items()}


def _run_stages(params: PipelineParams) -> dict:
    produced = {Kind.HF_CHECKPOINT: _stage(download_flow, params.download, _with(params.download, DownloadParams),
                                           Kind.HF_CHECKPOINT)}
    hf = produced[Kind.HF_CHECKPOINT].spec
    megatron = _stage(convert_flow, params.convert, _with(params.convert, ConvertParams, source=hf),
                      Kind.MEGATRON_CHECKPOINT)
    produced[Kind.MEGATRON_CHECKPOINT] = megatron
    verify_options = {"whole_model_max_params": params.verify.whole_model_max_params}
    if params.verify.after_convert and "parity_skipped" in megatron.metrics and params.convert.parity:
        produced[f"{Kind.VERIFY_REPORT} (convert)"] = verify_flow(VerifyParams(candidate=megatron.spec, reference=hf,
                                                                       store=params.convert.store, **verify_options))
    trained = None
    if params.preprocess is not None:
        produced[Kind.DATASET] = _stage(preprocess_flow, params.preprocess,
                                        _with(params.preprocess, PreprocessParams, tokenizer=hf), Kind.DATASET)
    if params.train is not None:
        name = params.train.name or f"{megatron.name}-{Path(params.train.recipe).stem}"
        dataset = produced.get(Kind.DATASET)
        base = (continued_base(params.train.store.open(), name, dataset, megatron)
                if params.train.continue_from_latest else megatron)
        trained = _stage(train_flow, params.train, _with(
            params.train, TrainParams, name=name, base_checkpoint=base.spec,
            dataset=dataset.spec if dataset is not None else None), Kind.TRAIN_CHECKPOINT)
        produced[Kind.TRAIN_CHECKPOINT] = trained
    if params.export is not None:
        source = trained or megatron
        export = _stage(export_flow, params.export, _with(params.export, ExportParams, source=source.spec, hf_source=hf),
                        Kind.HF_EXPORT)
        produced[Kind.HF_EXPORT] = export
        if params.verify.after_export:
            produced[f"{Kind.VERIFY_REPORT} (export)"] = verify_flow(VerifyParams(
                candidate=source.spec, reference=export.spec, store=params.export.store, **verify_options))
    return produced
