"""Export stage: `megatron-checkpoint` / `train-checkpoint` (+ the original `hf-checkpoint`) -> `hf-export`.

flows/export.py -> here -> gptoss_model/export/megatron_to_hf.py

The megatron checkpoint (any TP/PP/EP it was saved with) is read one layer at
a time and written as a self-contained Hugging Face directory: config.json
from the model config, tokenizer files and chat template from the original
hf-checkpoint (found through the input's lineage unless named), safetensors
shards + index, in bf16, fp32 or back to MXFP4. A LoRA/DoRA train-checkpoint
(adapter-only) is exported merged into its base, the megatron-checkpoint the
run was trained from (found through its lineage unless named), optionally with
a PEFT adapter directory `peft_adapter/` for the base export. Optionally the committed
export is pushed to the Hugging Face Hub (`upload_folder`; token from a
Prefect Secret block or HF_TOKEN, never logged or stored).

The version is a fingerprint of the inputs' versions and the parameters that
change the bytes (format, shard size), so exporting the same checkpoint the
same way twice is a cache hit (a push is still made when asked).
"""
from __future__ import annotations

import logging
import shutil
from pathlib import Path
from typing import Literal

from pydantic import Field

from gptoss_model.export.megatron_to_hf import DEFAULT_MAX_SHARD_BYTES, ExportError, export_megatron_to_hf, unfinished_export
from tasks.common import PlainUrl, StageParams, StageProgress, StoreSettings, load_secret_block
from tasks.kinds import MEGATRON_KINDS, Kind
from tasks.lineage import LineageError, find_adapter_base, find_in_lineage
from tasks.stage import Input, Stage, StageRun, Version
from tasks.store import StageResult
from tasks.store.names import ARTIFACT_NAME_PATTERN, ARTIFACT_SPEC_PATTERN

log = logging.getLogger(__name__)


class ExportParams(StageParams):
    """Stream a megatron checkpoint into a Hugging Face directory, commit it, optionally push it."""

    source: str = Field(..., pattern=ARTIFACT_SPEC_PATTERN,
                        description="megatron-checkpoint/NAME[@VERSION] or train-checkpoint/NAME[@VERSION]")
    hf_source: str | None = Field(None, pattern=ARTIFACT_SPEC_PATTERN,
                                  description="hf-checkpoint/NAME[@VERSION] for config, tokenizer and chat "
                                  "template; default: the one the source was made from (its lineage)")
    name: str | None = Field(None, pattern=ARTIFACT_NAME_PATTERN,
                             description="output artifact name; default: the source's name")
    weight_format: Literal["bfloat16", "float32", "mxfp4"] = Field(
        "bfloat16", description="bfloat16/float32 everywhere, or mxfp4 experts (re-quantized) with bf16 elsewhere")
    max_shard_bytes: int = Field(DEFAULT_MAX_SHARD_BYTES, gt=0, description="largest safetensors shard")
    workers: int = Field(1, ge=1, le=256, description="processes exporting disjoint groups (embedding, each "
                         "layer, head); the bytes do not depend on it. At most the host's cores are used")
    base_source: str | None = Field(None, pattern=ARTIFACT_SPEC_PATTERN,
                                    description="megatron-checkpoint/NAME[@VERSION] an adapter-only (LoRA/DoRA) "
                                    "source is merged into; default: the one its run was trained from (lineage)")
    peft_adapter: bool = Field(False, description="LoRA/DoRA sources: also write the adapters as a PEFT directory "
                               "peft_adapter/ for the base export (DoRA expert adapters exist only merged)")
    push_to_hub: str | None = Field(None, description="Hub repo id to upload the export to (optional)")
    hub_private: bool = Field(True, description="create the Hub repo private")
    hub_endpoint: PlainUrl | None = Field(None, description="Hub endpoint; default: HF_ENDPOINT or huggingface.co")
    hub_token_block: str | None = Field(None, description="Prefect Secret block holding the Hub token; "
                                        "default: HF_TOKEN from the environment")
    workdir: str | None = Field(None, description="where the staging dir goes; default GPTOSS_WORKDIR / temp")
    store: StoreSettings = Field(default_factory=StoreSettings)

    def fingerprint_params(self) -> dict:
        # peft_adapter only when set: exports made before the option keep their versions
        return {"weight_format": self.weight_format, "max_shard_bytes": self.max_shard_bytes,
                **({"peft_adapter": True} if self.peft_adapter else {})}


def hub_token(params: ExportParams) -> str | None:
    if params.hub_token_block:
        return str(load_secret_block(params.hub_token_block, "Hugging Face Hub token"))
    return None  # huggingface_hub then reads HF_TOKEN (or the saved login) itself


def push_folder(folder: Path, repo_id: str, token: str | None, private: bool, message: str,
                endpoint: str | None = None) -> str:
    """Create the repo if needed and upload the directory as one commit; returns the commit URL."""
    from huggingface_hub import HfApi

    from gptoss_model.hub.download import hub_endpoint

    url = hub_endpoint(endpoint)
    api = HfApi(endpoint=url, token=token)
    try:
        api.create_repo(repo_id, private=private, exist_ok=True)
        # The store's own bookkeeping is not part of a Hugging Face checkpoint.
        info = api.upload_folder(repo_id=repo_id, folder_path=str(folder), commit_message=message,
                                 ignore_patterns=["MANIFEST.json", ".*"])
    except Exception as e:  # noqa: BLE001 - httpx/requests errors name neither the endpoint nor the repo
        if isinstance(e, (ConnectionError, TimeoutError)) or type(e).__module__.split(".")[0] in ("httpx",
                                                                                                    "httpcore"):
            raise HubUnreachable(f"pushing {repo_id} to the Hub at {url}: {type(e).__name__}: {e}") from e
        raise
    return str(getattr(info, "commit_url", info))


class HubUnreachable(ConnectionError):
    """The Hub endpoint could not be reached while pushing (transient: the task retries)."""


def plan_export(run: StageRun[ExportParams]) -> Version:
    params, store, source = run.params, run.store, run.inputs["source"]
    hf = run.inputs["hf_source"] or find_in_lineage(store, source, Kind.HF_CHECKPOINT, hint="hf_source")
    base = find_adapter_base(store, source, run.inputs["base_source"])
    if params.peft_adapter and base is None:
        raise ExportError(f"peft_adapter: {source.spec} holds no LoRA/DoRA adapters")

    def build(staging: Path) -> dict:
        # The staging dir persists across attempts (resumable stage): groups an earlier, crashed attempt
        # finished are kept. Anything else there (an attempt that finished but never committed) is redone.
        if not unfinished_export(staging):
            shutil.rmtree(staging)
        progress = StageProgress(f"export {source.spec} ({params.weight_format})")
        report = export_megatron_to_hf(store.local_path(source), staging, config=store.local_path(hf),
                                       weight_format=params.weight_format, max_shard_bytes=params.max_shard_bytes,
                                       base_megatron_path=store.local_path(base) if base else None,
                                       peft_adapter=params.peft_adapter, workers=params.workers,
                                       progress=progress)
        progress.finish()
        return {**report, "source": source.spec, "hf_source": hf.spec,
                **({"base_source": base.spec} if base else {})}

    def push(result: StageResult) -> None:
        if params.push_to_hub:
            url = push_folder(store.local_path(result.manifest), params.push_to_hub, hub_token(params),
                              params.hub_private, f"gptoss-pipeline export {result.spec}", params.hub_endpoint)
            log.info("pushed %s to the Hub: %s", result.spec, url)

    return Version(name=params.name or source.name, identity=params.fingerprint_params(), build=build,
                   inputs=[source, hf, *([base] if base else [])], resumable=True, after=push)


EXPORT = Stage(name="export", output=Kind.HF_EXPORT, params=ExportParams, code_version="1",
               inputs=(Input("source", *MEGATRON_KINDS), Input("hf_source", Kind.HF_CHECKPOINT),
                       Input("base_source", Kind.MEGATRON_CHECKPOINT)),
               plan=plan_export, task_name="export-to-hf",
               describe=lambda p: f"export {p.source} ({p.weight_format})", cli_args=("source", "weight_format"))
run_export = EXPORT.run
export_checkpoint = EXPORT.task

__all__ = ["EXPORT", "ExportError", "ExportParams", "LineageError", "export_checkpoint", "run_export"]
