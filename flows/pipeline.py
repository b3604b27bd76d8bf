"""The end-to-end pipeline flow: each stage is its own flow, run here as a subflow.

Stages land one issue at a time; today the chain is
download -> hf-checkpoint -> convert (with its logit parity gate) -> megatron-checkpoint.
Every stage is a cache hit when its inputs did not change, so a rerun after a
crash resumes at the first stage without a committed output.
"""
from __future__ import annotations

from pathlib import Path

import yaml
from prefect import flow
from pydantic import BaseModel, Field

from flows.convert import convert_flow
from flows.download import download_flow
from tasks.common import publish_lineage
from tasks.convert import ConvertParams
from tasks.download import DownloadParams
from tasks.store.names import ARTIFACT_SPEC_PATTERN


class PipelineConvertParams(ConvertParams):
    source: str | None = Field(None, pattern=ARTIFACT_SPEC_PATTERN,
                               description="default: the version the download stage produced")


class PipelineParams(BaseModel):
    download: DownloadParams = Field(default_factory=DownloadParams)
    convert: PipelineConvertParams = Field(default_factory=PipelineConvertParams)

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


@flow(name="gptoss-pipeline")
def gptoss_pipeline(params: PipelineParams | None = None) -> dict[str, str]:
    """Run every stage in order and return the artifact spec each produced."""
    params = params or PipelineParams()
    checkpoint = download_flow(params.download)
    convert = ConvertParams.model_validate(
        {**params.convert.model_dump(), "source": params.convert.source or checkpoint.spec})
    megatron = convert_flow(convert)
    publish_lineage([checkpoint, megatron])
    return {"hf-checkpoint": checkpoint.spec, "megatron-checkpoint": megatron.spec}
