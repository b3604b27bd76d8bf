"""Numeric comparison of a converted (or exported) checkpoint against transformers' reference.

A gate, not a hope: the convert stage refuses to commit a checkpoint whose
logits on a fixed batch differ from `GptOssForCausalLM`'s past a tolerance.
The verify stage grows here (whole-model and layer-wise modes).
"""
from __future__ import annotations

import time
from pathlib import Path

import torch

from gptoss_model.checkpoint_layout import build_model, load_megatron_checkpoint
from gptoss_model.config import GptOssModelConfig
from gptoss_model.errors import PermanentError
from gptoss_model.parallel import world_of_one
from gptoss_model.reference import load_reference_model

DTYPES = {"bfloat16": torch.bfloat16, "float32": torch.float32}


class ParityError(PermanentError, ValueError):
    """Logits of the two sides differ past the gate's tolerance."""


def fixed_batch(vocab_size: int, batch: int = 2, seq: int = 32, seed: int = 1234) -> torch.Tensor:
    """The same token ids on every machine and run; id 0 (pad) never appears."""
    g = torch.Generator().manual_seed(seed)
    return torch.randint(1, vocab_size, (batch, seq), generator=g)


@torch.no_grad()
def parity_check(megatron_dir: str | Path, hf_dir: str | Path, dtype: str = "float32",
                 batch: int = 2, seq: int = 32) -> dict:
    """Logits of the converted checkpoint vs transformers' GptOssForCausalLM, at world 1, in fp32.

    `dtype` is the checkpoint's storage dtype. The megatron model computes in fp32 (the
    stored values, upcast), so the gate measures the conversion, not bf16 arithmetic:
      * max_abs_logit_diff: against the reference whose weights are rounded to `dtype`
        exactly as the converter rounds them (norm weights stay fp32, as in a megatron
        bf16 model), so the same numbers go in and it is ~1e-6 when the conversion is right;
      * max_rel_logit_diff: against the full-precision fp32 reference, divided by
        max |reference logit| (the cost of storing in `dtype`; 0-ish for float32).
    """
    cfg = GptOssModelConfig.from_hf_config(hf_dir)
    ids = fixed_batch(cfg.vocab_size, batch, seq)
    started = time.time()
    with world_of_one("the parity check"):
        model = load_megatron_checkpoint(build_model(cfg, torch.float32), megatron_dir).eval()
        pos = torch.arange(ids.shape[1]).expand_as(ids)
        got = model(ids, pos, None).float()
        del model
    ref_model = load_reference_model(hf_dir, dtype=torch.float32)
    want_full = ref_model(ids).logits.float()
    if DTYPES[dtype] != torch.float32:
        # megatron keeps RMSNorm weights in fp32 in a bf16 model, so they are stored in fp32.
        for name, p in ref_model.named_parameters():
            if "norm" not in name:
                p.data = p.data.to(DTYPES[dtype]).float()
        want = ref_model(ids).logits.float()
    else:
        want = want_full
    del ref_model
    scale = want_full.abs().max().item()
    rel = (got - want_full).abs().max().item()
    return {"parity_dtype": dtype, "parity_batch": [batch, seq],
            "max_abs_logit_diff": (got - want).abs().max().item(),
            "max_rel_logit_diff": rel / scale if scale else float("inf"),
            "parity_seconds": round(time.time() - started, 3)}


def enforce_parity(gate: dict, tolerance: float, what: str) -> None:
    """Raise ParityError naming `what` when the parity check's logits differ past `tolerance`."""
    if not gate["max_abs_logit_diff"] <= tolerance:
        raise ParityError(
            f"parity gate failed for {what} ({gate['parity_dtype']}): max |logit diff| "
            f"{gate['max_abs_logit_diff']:.3g} > {tolerance:g} "
            f"(relative to fp32 weights: {gate['max_rel_logit_diff']:.3g})")
