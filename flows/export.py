"""Flow: export a `megatron-checkpoint` / `train-checkpoint` as a self-contained `hf-export` (bf16, fp32, MXFP4).

flows/export.py -> tasks/export.py -> gptoss_model/export/

Deployable on a CPU work pool on its own, or called by the pipeline flow.
Run locally:  python -m flows.export megatron-checkpoint/NAME[@VERSION] [bfloat16|float32|mxfp4]
"""
# No `from __future__ import annotations`: Prefect reads the parameter type from the signature,
# also where `serve()` ships the function to another process.
from tasks.export import EXPORT, ExportParams


@EXPORT.flow
def export_flow(params: ExportParams):
    """Stream the megatron checkpoint into a Hugging Face directory, commit it, optionally push it."""
    return EXPORT.task(params)


if __name__ == "__main__":  # also required: export workers are spawned and re-import __main__
    from flows.stage_cli import run_flow_from_command_line

    run_flow_from_command_line(EXPORT, export_flow)
