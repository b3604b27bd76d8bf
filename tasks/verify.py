"""Verify stage: a checkpoint (megatron, train or HF export) against its original `hf-checkpoint` -> `verify-report`.

flows/verify.py -> here -> gptoss_model/verify/parity.py (whole model) / gptoss_model/verify/layers.py (layer-wise)

Whole-model mode when the model is small enough to hold twice here
(`whole_model_max_params`): logits on a fixed batch longer than twice the
sliding window, relative max |diff|, cosine, top-1 agreement and a greedy
continuation. Above it, layer-wise mode: one decoder layer at a time from
each side, on the same input, memory about one layer. Gates are relative with
defaults by storage dtype. A failure fails the stage, naming the first failing
layer and tensor; the report (per-layer table, overall numbers) is committed
as the artifact (report.json, report.md, numbers in the manifest) and shown
as a Prefect table artifact, passed or failed.
"""
from __future__ import annotations

import json
import logging
import math
from dataclasses import asdict
from pathlib import Path
from typing import Literal

from pydantic import Field

from gptoss_model.checkpoint import name_map as nm
from gptoss_model.model.config import GptOssModelConfig
from gptoss_model.errors import PermanentError
from gptoss_model.verify.parity import default_tolerance, fixed_batch, verify_whole_model
from gptoss_model.verify.layers import HFSide, MegatronSide, verify_layerwise
from gptoss_model.verify.layers import default_tolerance as default_layer_tolerance
from tasks.common import StageParams, StageProgress, StoreSettings, in_prefect_run
from tasks.kinds import HF_KINDS, MEGATRON_KINDS, Kind
from tasks.lineage import find_adapter_base, find_in_lineage
from tasks.stage import Input, Stage, StageRun, Version
from tasks.store.names import ARTIFACT_SPEC_PATTERN

log = logging.getLogger(__name__)


class VerificationFailed(PermanentError, ValueError):
    """The candidate's numbers are too far from the reference's."""


class VerifyParams(StageParams):
    """Compare logits (whole model) or each layer's outputs (layer-wise) with transformers'; fail on a gap."""

    candidate: str = Field(..., pattern=ARTIFACT_SPEC_PATTERN,
                           description="megatron-checkpoint/..., train-checkpoint/..., hf-export/... or "
                           "hf-checkpoint/... [@VERSION]")
    reference: str | None = Field(None, pattern=ARTIFACT_SPEC_PATTERN,
                                  description="hf-checkpoint/NAME[@VERSION]; default: the candidate's origin")
    mode: Literal["auto", "whole-model", "layer-wise"] = Field("auto", description="auto: whole-model up to "
                                                               "whole_model_max_params, layer-wise above")
    whole_model_max_params: int = Field(2_000_000_000, ge=0)
    batch: int = Field(2, ge=1)
    seq: int | None = Field(None, ge=2, description="default: twice the sliding window + 8")
    max_rel_diff: float | None = Field(None, gt=0, description="override the dtype default (relative)")
    workdir: str | None = None
    store: StoreSettings = Field(default_factory=StoreSettings)

    def fingerprint_params(self) -> dict:
        return self.model_dump(include={"mode", "whole_model_max_params", "batch", "seq", "max_rel_diff"})


def _params_of(cfg: GptOssModelConfig) -> int:
    return sum(math.prod(s) for s in nm.expected_hf_shapes(cfg).values())


def _storage_dtype(kind: str, path: Path) -> str | None:
    """float32, bfloat16 or mxfp4 (experts); None when the checkpoint does not say (a training run's)."""
    if kind in HF_KINDS:
        config = json.loads((path / "config.json").read_text())
        if (config.get("quantization_config") or {}).get("quant_method") == "mxfp4":
            return "mxfp4"
        return config.get("dtype") or config.get("torch_dtype") or "bfloat16"
    report = path / "conversion_report.json"
    return json.loads(report.read_text()).get("dtype") if report.is_file() else None


def _gate(reference_dtype: str | None, candidate_dtype: str | None):
    """(weights rounded to, tolerance): like with like. Where either side may be bf16, both are
    rounded to bf16 (an export's own cast) and held to the fp32 gate; MXFP4 experts cannot be
    matched that way and keep the looser bf16 gate."""
    import torch

    if "mxfp4" in (reference_dtype, candidate_dtype):
        return None, default_tolerance("bfloat16")
    if reference_dtype == candidate_dtype == "float32":
        return None, default_tolerance("float32")
    return torch.bfloat16, default_tolerance("float32")


def _whole_model(params, ref_dir, cand_dir, kind, ref_dtype, cand_dtype, base_dir=None) -> dict:
    round_to, tolerance = _gate(ref_dtype, cand_dtype)
    if params.max_rel_diff:
        tolerance = type(tolerance)(params.max_rel_diff, tolerance.min_cosine, tolerance.min_top1_agreement)
    out = verify_whole_model(ref_dir, cand_dir, candidate_kind="megatron" if kind in MEGATRON_KINDS else "hf",
                             tolerance=tolerance, batch=params.batch, seq=params.seq, base_megatron_path=base_dir,
                             round_to=round_to)
    out["first_failure"] = {"block": "logits", "tensor": "logits", "why": out["failures"]} if out["failures"] else None
    out["rows"] = [{"block": "model", "tensor": "logits", **{k: out[k] for k in (
        "max_abs_logit_diff", "rel_logit_diff", "logit_cosine", "top1_agreement")}}]
    return out


def _layer_wise(params, ref_dir, cand_dir, kind, cfg, progress, base_dir=None) -> dict:
    tolerance = default_layer_tolerance("float32")  # the reference is rounded to the candidate's storage
    if params.max_rel_diff:
        tolerance = type(tolerance)(params.max_rel_diff, tolerance.min_cosine)
    seq = params.seq or 2 * cfg.sliding_window + 8
    ids = fixed_batch(cfg.vocab_size, params.batch, seq)
    reference = HFSide(ref_dir)
    if kind in MEGATRON_KINDS:
        with MegatronSide(cand_dir, cfg, base_megatron_path=base_dir) as candidate:
            reference.round_to = candidate.storage_dtype
            report = verify_layerwise(reference, candidate, ids, tolerance=tolerance, progress=progress)
    else:
        candidate = HFSide(cand_dir)
        reference.round_to = candidate.ckpt.read("lm_head.weight").dtype
        report = verify_layerwise(reference, candidate, ids, tolerance=tolerance, progress=progress)
    return {"mode": "layer-wise", "batch": [params.batch, seq], "tolerance": asdict(tolerance),
            **report.to_dict(), "table": report.table()}


def _publish_table(result: dict, what: str) -> None:
    if not in_prefect_run():
        return
    from prefect.artifacts import create_table_artifact

    rows = [{k: (f"{v:.4g}" if isinstance(v, float) else v) for k, v in r.items()} for r in result["rows"]]
    status = "passed" if result["first_failure"] is None else f"FAILED at {result['first_failure']}"
    create_table_artifact(table=rows, description=f"verify {what} ({result['mode']}): {status}"[:500])


def plan_verify(run: StageRun[VerifyParams]) -> Version:
    params, store, candidate = run.params, run.store, run.inputs["candidate"]
    kind = candidate.kind
    reference = run.inputs["reference"] or find_in_lineage(store, candidate, Kind.HF_CHECKPOINT, hint="reference")
    # an adapter-only LoRA/DoRA train-checkpoint runs on the base it was trained from
    base = find_adapter_base(store, candidate) if kind in MEGATRON_KINDS else None

    def build(staging: Path) -> dict:
        ref_dir, cand_dir = store.local_path(reference), store.local_path(candidate)
        base_path = store.local_path(base) if base is not None else None
        cfg = GptOssModelConfig.from_hf_config(ref_dir)
        mode = params.mode
        if mode == "auto":
            mode = "whole-model" if _params_of(cfg) <= params.whole_model_max_params else "layer-wise"
        progress = StageProgress(f"verify {candidate.spec} ({mode})")
        if mode == "whole-model":
            # an adapter checkpoint's weights are stored as its base's are
            cand_dtype = _storage_dtype(kind, base_path if base_path is not None else cand_dir)
            result = _whole_model(params, ref_dir, cand_dir, kind, _storage_dtype(reference.kind, ref_dir),
                                  cand_dtype, base_path)
        else:
            result = _layer_wise(params, ref_dir, cand_dir, kind, cfg, progress, base_path)
        progress.finish()
        result.update(candidate=candidate.spec, reference=reference.spec)
        (staging / "report.json").write_text(json.dumps(result, indent=1, default=str) + "\n")
        (staging / "report.md").write_text(f"# verify {candidate.spec} vs {reference.spec}\n\n"
                                           + result.get("table", "") + "\n")
        _publish_table(result, candidate.spec)
        if result["first_failure"] is not None:
            raise VerificationFailed(f"{candidate.spec} differs from {reference.spec} ({mode}): first failure "
                                     f"{result['first_failure']}")
        return {k: v for k, v in result.items() if k != "table"}  # the per-layer rows are in the manifest too

    return Version(name=candidate.name, identity=params.fingerprint_params(), build=build,
                   inputs=[candidate, reference, *([base] if base is not None else [])])


VERIFY = Stage(name="verify", output=Kind.VERIFY_REPORT, params=VerifyParams, code_version="1",
               inputs=(Input("candidate", *MEGATRON_KINDS, *HF_KINDS), Input("reference", *HF_KINDS)),
               plan=plan_verify, task_name="verify-checkpoint",
               describe=lambda p: f"verify {p.candidate} ({p.mode})", cli_args=("candidate", "mode"))
run_verify = VERIFY.run
verify_checkpoint = VERIFY.task

__all__ = ["VERIFY", "VerificationFailed", "VerifyParams", "run_verify", "verify_checkpoint"]
