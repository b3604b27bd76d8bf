"""Numeric comparison of a converted (or exported) checkpoint against transformers' reference.

A gate, not a hope: the convert stage refuses to commit a checkpoint whose
logits on a fixed batch differ from `GptOssForCausalLM`'s past a tolerance.

Every gate is relative to the reference's scale: max |logit diff| divided by
max |reference logit|, the cosine of the logits, top-1 agreement. An
absolute threshold is wrong for some size: fp32 rounding (~1e-7 per op) is
amplified a few times per layer (measured: ~3x per layer on a hidden-512
6-layer model, 2e-7 relative at one layer, 3e-5 at the logits, with no
routing flip), so a correct deeper or wider model lands above any bare
1e-4 while a real error (a transposed expert, a window off by one, a wrong
yarn setting) is >= 1e-2 relative.

Modes: `verify_whole_model` (both models in memory: logits, cosine, top-1,
greedy continuation) and, for checkpoints that do not fit,
`gptoss_model.verify.layers.verify_layerwise` (one decoder layer at a time).
"""
from __future__ import annotations

import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from gptoss_model.checkpoint.layout import DTYPES, build_model, load_megatron_checkpoint
from gptoss_model.model.config import GptOssModelConfig
from gptoss_model.errors import PermanentError
from gptoss_model.model.parallel import world_of_one
from gptoss_model.model.reference import load_reference_model
from gptoss_model.verify.sides import HFSide, MegatronSide, megatron_logits



class ParityError(PermanentError, ValueError):
    """Logits of the two sides differ past the gate's tolerance."""


@dataclass(frozen=True)
class Tolerance:
    """Whole-model gate: all three must hold."""

    max_rel_logit_diff: float  # max |diff| / max |reference logit|
    min_cosine: float
    min_top1_agreement: float  # fraction of positions whose argmax agrees


# float32: both sides hold the same values and differ by fp32 arithmetic (amplified with depth);
# bfloat16: one side was rounded to bf16 (e.g. a bf16 export checked against an fp32 reference).
DEFAULT_TOLERANCES = {"float32": Tolerance(1e-3, 0.99999, 0.99), "bfloat16": Tolerance(3e-2, 0.999, 0.9)}


def default_tolerance(dtype: str) -> Tolerance:
    return DEFAULT_TOLERANCES["float32" if dtype == "float32" else "bfloat16"]


def logit_measures(got: torch.Tensor, want: torch.Tensor) -> dict:
    """Relative measures of logits `got` against reference `want` ([..., vocab])."""
    got, want = got.double(), want.double()
    diff = (got - want).abs().max().item()
    scale = want.abs().max().item()
    g, w = got.reshape(-1, got.shape[-1]), want.reshape(-1, want.shape[-1])
    cosine = torch.nn.functional.cosine_similarity(g, w, dim=-1).min().item()
    return {"max_abs_logit_diff": diff, "rel_logit_diff": diff / scale if scale else float("inf"),
            "logit_cosine": cosine, "top1_agreement": (g.argmax(-1) == w.argmax(-1)).double().mean().item()}


def gate_failures(measures: dict, tolerance: Tolerance) -> list[str]:
    """What failed, in words (empty when the gate passes)."""
    out = []
    if not measures["rel_logit_diff"] <= tolerance.max_rel_logit_diff:
        out.append(f"max |logit diff| / max |reference logit| = {measures['rel_logit_diff']:.3g} > "
                   f"{tolerance.max_rel_logit_diff:g} (absolute {measures['max_abs_logit_diff']:.3g})")
    if not measures["logit_cosine"] >= tolerance.min_cosine:
        out.append(f"worst per-position logit cosine {measures['logit_cosine']:.7f} < {tolerance.min_cosine}")
    if not measures["top1_agreement"] >= tolerance.min_top1_agreement:
        out.append(f"top-1 agreement {measures['top1_agreement']:.3f} < {tolerance.min_top1_agreement}")
    return out


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
        got = megatron_logits(model, ids)
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
    # max_abs_logit_diff, rel_logit_diff, logit_cosine, top1_agreement: against the same weights
    return {"parity_dtype": dtype, "parity_batch": [batch, seq], **logit_measures(got, want),
            "max_rel_logit_diff": rel / scale if scale else float("inf"),
            "parity_seconds": round(time.time() - started, 3)}


def enforce_parity(gate: dict, tolerance: float | Tolerance, what: str) -> None:
    """Raise ParityError naming `what` when the parity check's logits fail the gate.

    A float `tolerance` bounds max |logit diff| / max |reference logit| (cosine and top-1
    keep their fp32 defaults); a Tolerance sets all three.
    """
    if not isinstance(tolerance, Tolerance):
        tolerance = Tolerance(tolerance, DEFAULT_TOLERANCES["float32"].min_cosine,
                              DEFAULT_TOLERANCES["float32"].min_top1_agreement)
    failed = gate_failures(gate, tolerance)
    if failed:
        raise ParityError(f"parity gate failed for {what} ({gate['parity_dtype']} storage, same weights as "
                          f"the reference): " + "; ".join(failed))


# --------------------------------------------------------------- whole model
def greedy_tokens(lm, prompt: torch.Tensor, new_tokens: int) -> torch.Tensor:
    """Greedy continuation by full recomputation (both sides alike; no KV-cache differences)."""
    ids = prompt
    for _ in range(new_tokens):
        ids = torch.cat([ids, lm(ids)[:, -1].argmax(-1, keepdim=True)], dim=1)
    return ids[:, prompt.shape[1]:]


@torch.no_grad()
def verify_whole_model(reference_hf_dir: str | Path, candidate: str | Path, *, candidate_kind: str,
                       tolerance: Tolerance, batch: int = 2, seq: int | None = None,
                       continuation_tokens: int = 8, base_megatron_path: str | Path | None = None,
                       round_to: torch.dtype | None = None) -> dict:
    """Logits of `candidate` (a "megatron" checkpoint dir or an "hf" dir) vs the HF reference, in fp32.

    `seq` defaults to twice the sliding window plus 8, so windowed layers see keys fall out of
    the window. Returns the measures, the greedy continuations' agreement and `failures` (empty
    when the gate passes). `base_megatron_path`: the candidate is an adapter-only LoRA/DoRA
    checkpoint, run with its adapters on this base. `round_to`: both sides' weights rounded to
    this dtype first (comparing a bf16 export with the fp32 checkpoint it came from like with like).
    """
    cfg = GptOssModelConfig.from_hf_config(reference_hf_dir)
    seq = seq or 2 * cfg.sliding_window + 8
    ids = fixed_batch(cfg.vocab_size, batch, seq)
    started = time.time()
    with HFSide(reference_hf_dir, round_to=round_to) as ref:
        want = ref.logits(ids)
        want_cont = greedy_tokens(ref.logits, ids[:, : seq // 2], continuation_tokens)
    with world_of_one("whole-model verification"):
        cand = (MegatronSide(candidate, cfg, base_megatron_path=base_megatron_path, round_to=round_to)
                if candidate_kind == "megatron" else HFSide(candidate, round_to=round_to))
        with cand:
            got = cand.logits(ids)
            got_cont = greedy_tokens(cand.logits, ids[:, : seq // 2], continuation_tokens)
    measures = logit_measures(got, want)
    same = (got_cont == want_cont).all(dim=0).long()
    agree = int(same.cumprod(0).sum()) if continuation_tokens else 0
    out = {"mode": "whole-model", "batch": [batch, seq], **measures,
           "greedy_tokens": continuation_tokens, "greedy_agreeing_prefix": agree,
           "greedy_reference": want_cont.tolist(), "greedy_candidate": got_cont.tolist(),
           "tolerance": asdict(tolerance), "weights_rounded_to": str(round_to).removeprefix("torch.") if round_to else None,
           "seconds": round(time.time() - started, 3)}
    out["failures"] = gate_failures(measures, tolerance)
    return out
