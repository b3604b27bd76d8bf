"""Convert stage: `hf-checkpoint` -> `megatron-checkpoint` (megatron-core torch_dist), with a parity gate.

flows/convert.py -> here -> gptoss_model/convert/hf_to_megatron.py

The input is pulled with `store.local_path` (the version dir itself on a
file:// store; a verified download cache elsewhere), converted tensor by
tensor, by `workers` processes, into the stage's staging dir
(`{workdir}/convert-{version}`, kept when an attempt dies: the next attempt
resumes, rewriting only the chunks that were not finished), then (for models small enough to run
here) loaded back at world size 1 and its logits compared with transformers'
on a fixed batch: over tolerance, the stage fails and nothing is committed.

The version is a fingerprint of the input's version and the parameters
below, so converting the same checkpoint the same way twice is a cache hit.
"""
from __future__ import annotations

import logging
import shutil
from pathlib import Path
from typing import Literal

from pydantic import Field

from gptoss_model.convert.hf_to_megatron import convert_hf_to_megatron
from gptoss_model.verify.parity import ParityError, enforce_parity, parity_check
from tasks.common import StageParams, StageProgress, StoreSettings
from tasks.kinds import Kind
from tasks.stage import Input, Stage, StageRun, Version
from tasks.store.names import ARTIFACT_NAME_PATTERN, ARTIFACT_SPEC_PATTERN

log = logging.getLogger(__name__)

__all__ = ["CONVERT", "ConvertParams", "ParityError", "convert_checkpoint", "run_convert"]


class ConvertParams(StageParams):
    """Convert an hf-checkpoint into a megatron-core torch_dist checkpoint, gated on logit parity."""

    source: str = Field(..., pattern=ARTIFACT_SPEC_PATTERN,
                        description="input artifact: hf-checkpoint/NAME[@VERSION|@REF] (default ref: latest)")
    name: str | None = Field(None, pattern=ARTIFACT_NAME_PATTERN,
                             description="output artifact name; default: the input's name")
    dtype: Literal["bfloat16", "float32"] = Field("bfloat16", description="storage dtype of the weights "
                                                  "(RMSNorm weights stay fp32, as in a megatron bf16 model)")
    parity: bool = Field(True, description="run the logit parity gate (skipped above parity_max_params)")
    parity_max_params: int = Field(2_000_000_000, ge=0, description="largest model the gate runs on here")
    parity_tolerance: float = Field(1e-3, gt=0, description="max |logit diff| / max |reference logit| vs "
                                    "transformers with the same (dtype-rounded) weights; cosine and top-1 "
                                    "agreement are gated too (gptoss_model.verify.parity)")
    workers: int = Field(1, ge=1, le=256, description="processes converting disjoint chunks (embedding, "
                         "each layer, the head); the output is byte-identical for any count")
    workdir: str | None = Field(None, description="where the staging dir goes (kept across attempts, so a "
                                "retry resumes); default GPTOSS_WORKDIR / temp")
    store: StoreSettings = Field(default_factory=StoreSettings)

    def fingerprint_params(self) -> dict:
        """What defines the output: the storage dtype and the gate it had to pass (not `workers`)."""
        return {"dtype": self.dtype, "layer_spec": "local", "parity": self.parity,
                "parity_max_params": self.parity_max_params, "parity_tolerance": self.parity_tolerance}


def plan_convert(run: StageRun[ConvertParams]) -> Version:
    params, store, source = run.params, run.store, run.inputs["source"]

    def build(staging: Path) -> dict:
        hf_dir = store.local_path(source)
        progress = StageProgress(f"convert {source.spec}")
        # The staging dir persists across attempts (resumable stage): chunks an earlier,
        # killed attempt finished are kept, the rest is written now.
        report = convert_hf_to_megatron(hf_dir, staging, dtype=params.dtype, source_sha=source.version,
                                        workers=params.workers, resume=True, progress=progress)
        progress.finish()
        metrics = {**report, "source": source.spec}
        if params.parity and report["params"] <= params.parity_max_params:
            gate = parity_check(staging, hf_dir, dtype=params.dtype)
            metrics.update(gate, parity_tolerance=params.parity_tolerance)
            try:
                enforce_parity(gate, params.parity_tolerance, f"{source.spec} -> {Kind.MEGATRON_CHECKPOINT}")
            except ParityError:
                shutil.rmtree(staging)  # a retry must not resume into a checkpoint that failed its gate
                raise
            log.info("parity gate passed: max |logit diff| %.3g (%.3g of max |logit|), cosine %.7f",
                     gate["max_abs_logit_diff"], gate["rel_logit_diff"], gate["logit_cosine"])
        else:
            metrics["parity_skipped"] = ("disabled" if not params.parity else
                                         f"{report['params']} params > parity_max_params")
        return metrics

    return Version(name=params.name or source.name, identity=params.fingerprint_params(), build=build,
                   inputs=[source], resumable=True)


CONVERT = Stage(name="convert", output=Kind.MEGATRON_CHECKPOINT, params=ConvertParams, code_version="3",
                inputs=(Input("source", Kind.HF_CHECKPOINT),), plan=plan_convert,
                task_name="convert-to-megatron", describe=lambda p: f"convert {p.source} ({p.dtype})",
                cli_args=("source", "dtype", "workers"))
run_convert = CONVERT.run
convert_checkpoint = CONVERT.task
