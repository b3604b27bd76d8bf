"""Flow: convert an `hf-checkpoint` artifact into a `megatron-checkpoint` (torch_dist), parity-gated.

flows/convert.py -> tasks/convert.py -> gptoss_model/convert/hf_to_megatron.py

Deployable on a CPU work pool on its own, or called by the pipeline flow.
Run locally:  python -m flows.convert hf-checkpoint/openai/gpt-oss-20b [bfloat16|float32] [WORKERS]
"""
from __future__ import annotations

import sys

from prefect import flow

from tasks.convert import ConvertParams, convert_checkpoint


@flow(name="convert")
def convert_flow(params: ConvertParams):
    """Stream the HF checkpoint into a megatron-core distributed checkpoint, check its logits
    against transformers, and commit it (skipped when already committed)."""
    return convert_checkpoint(params)


if __name__ == "__main__":  # also required: conversion workers are spawned and re-import __main__
    args = sys.argv[1:]
    if not args:
        sys.exit("usage: python -m flows.convert hf-checkpoint/NAME[@VERSION] [bfloat16|float32] [WORKERS]")
    manifest = convert_flow(ConvertParams(source=args[0], dtype=args[1] if len(args) > 1 else "bfloat16",
                                          workers=int(args[2]) if len(args) > 2 else 1))
    print(manifest.spec)
