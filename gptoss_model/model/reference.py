"""The numeric reference every gate compares against: transformers' GptOssForCausalLM.

Loaded in eager attention (the implementation that has sinks on CPU) and, for
MXFP4 checkpoints, dequantized by transformers itself, so the reference stays
independent of our own `mxfp4` module.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch


def load_reference_model(path: str | Path, dtype: torch.dtype = torch.float32):
    """transformers' GptOssForCausalLM from an HF directory, in `dtype`, eval mode.

    `Mxfp4Config(dequantize=True)` is passed explicitly for MXFP4 checkpoints:
    without it transformers' quantizer insists on `accelerate` before it decides
    to fall back to dequantizing on CPU.
    """
    from transformers import GptOssForCausalLM, Mxfp4Config

    config = json.loads((Path(path) / "config.json").read_text())
    kwargs = {}
    if (config.get("quantization_config") or {}).get("quant_method") == "mxfp4":
        kwargs["quantization_config"] = Mxfp4Config(dequantize=True)
    model = GptOssForCausalLM.from_pretrained(path, dtype=dtype, attn_implementation="eager", **kwargs)
    return model.eval()
