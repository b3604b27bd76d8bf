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

from gptoss_model.errors import PermanentError
from gptoss_model.export.megatron_to_hf import DEFAULT_MAX_SHARD_BYTES, ExportError, export_megatron_to_hf, unfinished_export
from tasks.common import (PlainUrl, StageParams, StageProgress, StoreSettings, load_secret_block,
                          run_logged_stage, stage_task)
from tasks.store import ArtifactStore, InvalidNameError, Manifest, StageResult, parse_artifact_spec
from tasks.store.names import ARTIFACT_NAME_PATTERN, ARTIFACT_SPEC_PATTERN

log = logging.getLogger(__name__)

STAGE = "export"
KIND = "hf-export"
INPUT_KINDS = ("megatron-checkpoint", "train-checkpoint")
HF_KIND = "hf-checkpoint"
CODE_VERSION = "1"


class LineageError(PermanentError, LookupError):
    """The original hf-checkpoint (or an adapter run's base checkpoint) cannot be found from the input's lineage."""


class ExportParams(StageParams):

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


def resolve_source(store: ArtifactStore, spec: str) -> Manifest:
    kind, name, selector = parse_artifact_spec(spec)
    if kind not in INPUT_KINDS:
        raise InvalidNameError(f"export needs one of {INPUT_KINDS}, got {spec!r} (kind {kind!r})")
    return store.resolve(kind, name, selector)


def find_in_lineage(store: ArtifactStore, manifest: Manifest, kind: str = HF_KIND) -> Manifest:
    """The nearest artifact of `kind` an artifact descends from (breadth first over its inputs' manifests)."""
    queue, seen = list(manifest.inputs), set()
    while queue:
        ref = queue.pop(0)
        if (ref.kind, ref.name, ref.version) in seen:
            continue
        seen.add((ref.kind, ref.name, ref.version))
        found = store.get_manifest(ref.kind, ref.name, ref.version)
        if found is None:
            continue
        if found.kind == kind:
            return found
        queue += found.inputs
    hint = "hf_source" if kind == HF_KIND else "base_source"
    raise LineageError(f"{manifest.kind}/{manifest.name}@{manifest.version} does not descend from a "
                       f"{kind} in this store; name one with {hint}")


def find_hf_source(store: ArtifactStore, manifest: Manifest) -> Manifest:
    return find_in_lineage(store, manifest, HF_KIND)


def holds_adapters(store: ArtifactStore, source: Manifest) -> bool:
    """Whether a checkpoint artifact is a LoRA/DoRA run's (adapter-only) checkpoint.

    Converted megatron-checkpoints never are; a train-checkpoint says so in its recorded run
    config, else (committed by other means) its common state is read, which pulls the artifact.
    """
    if source.kind != "train-checkpoint":
        return False
    recorded = (source.parameters or {}).get("config", {})
    if isinstance(recorded, dict) and isinstance(recorded.get("peft"), dict):
        return bool(recorded["peft"].get("method"))
    from gptoss_model.export.adapters import read_peft_config

    return read_peft_config(store.local_path(source)) is not None


def find_adapter_base(store: ArtifactStore, source: Manifest, spec: str | None) -> Manifest | None:
    """The megatron-checkpoint an adapter-only source merges into; None when the source holds no adapters."""
    if not holds_adapters(store, source):
        if spec:
            raise InvalidNameError(f"base_source={spec!r}: {source.spec} holds no LoRA/DoRA adapters")
        return None
    base = store.resolve_spec(spec) if spec else find_in_lineage(store, source, "megatron-checkpoint")
    if base.kind != "megatron-checkpoint":
        raise InvalidNameError(f"base_source must be a megatron-checkpoint, got {base.kind}/{base.name}")
    return base


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


def run_export(params: ExportParams, store: ArtifactStore | None = None) -> StageResult:
    """The whole stage without Prefect's task machinery (tests, the CLI)."""
    store = store or params.store.open()
    source = resolve_source(store, params.source)
    hf = store.resolve_spec(params.hf_source) if params.hf_source else find_hf_source(store, source)
    if hf.kind != HF_KIND:
        raise InvalidNameError(f"hf_source must be an {HF_KIND}, got {hf.kind}/{hf.name}")
    base = find_adapter_base(store, source, params.base_source)
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

    result = run_logged_stage(store, stage=STAGE, code_version=CODE_VERSION, kind=KIND,
                              name=params.name or source.name, params=params.fingerprint_params(),
                              build=build, inputs=[source, hf, *([base] if base else [])], workdir=params.workdir,
                              resumable=True)
    if params.push_to_hub:
        url = push_folder(store.local_path(result.manifest), params.push_to_hub, hub_token(params),
                          params.hub_private, f"gptoss-pipeline export {result.spec}", params.hub_endpoint)
        log.info("pushed %s to the Hub: %s", result.spec, url)
    return result


export_checkpoint = stage_task(run_export, name="export-to-hf",
                               describe=lambda p: f"export {p.source} ({p.weight_format})")

__all__ = ["ExportError", "ExportParams", "LineageError", "export_checkpoint", "run_export"]
