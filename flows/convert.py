"""Flow: convert an `hf-checkpoint` artifact into a `megatron-checkpoint` (torch_dist), parity-gated.

flows/convert.py -> tasks/convert.py -> gptoss_model/convert/

Deployable on a CPU work pool on its own, or called by the pipeline flow.
Run locally:  python -m flows.convert hf-checkpoint/openai/gpt-oss-20b [bfloat16|float32] [WORKERS]
"""
# No `from __future__ import annotations`: Prefect reads the parameter type from the signature,
# also where `serve()` ships the function to another process.
from tasks.convert import CONVERT, ConvertParams


@CONVERT.flow
def convert_flow(params: ConvertParams):
    """Stream the HF checkpoint into a megatron-core distributed checkpoint, check its logits
    against transformers, and commit it (skipped when already committed)."""
    return CONVERT.task(params)


if __name__ == "__main__":  # also required: conversion workers are spawned and re-import __main__
    from flows.stage_cli import run_flow_from_command_line

    run_flow_from_command_line(CONVERT, convert_flow)
