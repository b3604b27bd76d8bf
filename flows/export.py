"""Flow: export a `megatron-checkpoint` / `train-checkpoint` as a self-contained `hf-export` (bf16, fp32, MXFP4).

flows/export.py -> tasks/export.py -> gptoss_model/export/megatron_to_hf.py
Run locally:  python -m flows.export megatron-checkpoint/NAME[@VERSION] [bfloat16|float32|mxfp4]
"""
from __future__ import annotations

import sys

from prefect import flow

from tasks.export import ExportParams, export_checkpoint


@flow(name="export")
def export_flow(params: ExportParams):
    """Stream the megatron checkpoint into a Hugging Face directory, commit it, optionally push it."""
    return export_checkpoint(params)


if __name__ == "__main__":
    args = sys.argv[1:]
    if not args:
        sys.exit("usage: python -m flows.export megatron-checkpoint/NAME[@VERSION] [bfloat16|float32|mxfp4]")
    manifest = export_flow(ExportParams(source=args[0], weight_format=args[1] if len(args) > 1 else "bfloat16"))
    print(manifest.spec)
