"""Layer-wise verification: one decoder layer at a time from each side, same input, outputs compared.

    report = verify_layerwise(reference=HFSide("/ckpt/gpt-oss-120b"),
                              candidate=MegatronSide("/ckpt/megatron", cfg))

For checkpoints that do not fit in memory (a 120B on a 24 GiB machine): the
reference side is transformers' own `GptOssDecoderLayer` built from the HF
checkpoint, the candidate side gptoss_model's megatron-core `TransformerLayer`
built from a megatron checkpoint (or a second HF checkpoint). For each layer,
the reference layer is built, run on the reference's hidden states and freed,
then the candidate layer is built, run on the *same* input and freed: memory
is one layer of weights (fp32) plus activations, whatever the model size, and
an error in one layer is not smeared over the next ones.

Each layer is compared per op: the attention block's output, the MLP block's
output and the layer output (the residual stream), each as max |diff| relative
to max |reference| and as cosine; plus the embedding rows and the head's
logits. The router is compared too: how many tokens chose a different expert
set, and the smallest gap between the k-th and (k+1)-th router logit of the
reference (a near-tie there lets float noise flip an expert). With
`force_routing=True` the candidate uses the reference's expert choice (and its
own logits for the weights), which isolates routing flips from real errors.

Both sides compute in fp32 from their stored values; the reference's weights
(not its norms) are rounded to the candidate's storage dtype first, so a
correct bf16 conversion compares equal up to fp32 arithmetic noise.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field

import torch

from gptoss_model.system.resources import peak_rss_mb
from gptoss_model.verify.sides import HFSide, MegatronSide, Side


# ------------------------------------------------------------------ measures
def compare(got: torch.Tensor, want: torch.Tensor) -> dict:
    """max |diff|, that relative to max |want|, and cosine of the flattened tensors."""
    got, want = got.double().flatten(), want.double().flatten()
    diff = (got - want).abs().max().item()
    scale = want.abs().max().item()
    denom = got.norm().item() * want.norm().item()
    return {"max_abs_diff": diff, "max_rel_diff": diff / scale if scale else (0.0 if diff == 0 else math.inf),
            "cosine": (got @ want).item() / denom if denom else (1.0 if diff == 0 else 0.0)}


@dataclass
class LayerTolerance:
    """A tensor passes when max |diff| / max |reference| <= max_rel_diff and cosine >= min_cosine."""

    max_rel_diff: float
    min_cosine: float


# fp32 arithmetic on identical stored values: ~1e-6 relative per layer; a transposed expert,
# a window off by one or a wrong yarn setting are >= 1e-2. bf16 sides compare values that differ
# by bf16 rounding (e.g. an export against the fp32 checkpoint it came from).
DEFAULT_LAYER_TOLERANCES = {"float32": LayerTolerance(1e-4, 0.99999), "bfloat16": LayerTolerance(2e-2, 0.999)}


@dataclass
class LayerReport:
    rows: list[dict] = field(default_factory=list)  # one per (block, tensor)
    first_failure: dict | None = None
    seconds: float = 0.0
    peak_rss_mb: float = 0.0
    block_seconds: dict[str, float] = field(default_factory=dict)  # both sides' load and forward, per block

    @property
    def passed(self) -> bool:
        return self.first_failure is None

    def table(self) -> str:
        head = "| block | tensor | max abs diff | rel diff | cosine | routing flips | min top-k gap | ok |"
        lines = [head, "|---|---|---|---|---|---|---|---|"]
        for r in self.rows:
            lines.append(f"| {r['block']} | {r['tensor']} | {r['max_abs_diff']:.3g} | {r['max_rel_diff']:.3g} | "
                         f"{r['cosine']:.7f} | {r.get('routing_flips', '')} | "
                         f"{'' if r.get('min_topk_gap') is None else format(r['min_topk_gap'], '.3g')} | "
                         f"{'yes' if r['ok'] else 'NO'} |")
        return "\n".join(lines)

    def to_dict(self) -> dict:
        return {"passed": self.passed, "first_failure": self.first_failure, "rows": self.rows,
                "seconds": self.seconds, "peak_rss_mb": self.peak_rss_mb, "block_seconds": self.block_seconds}


# ----------------------------------------------------------------- the run
def _routing_flips(ref: dict, cand: dict) -> int:
    want = torch.zeros_like(ref["router_logits"], dtype=torch.bool).scatter_(1, ref["experts"], True)
    if "routing_map" in cand:
        got = cand["routing_map"]
    else:
        got = torch.zeros_like(want).scatter_(1, cand["experts"], True)
    return int((want != got).any(dim=1).sum())


def _min_topk_gap(logits: torch.Tensor, k: int) -> float | None:
    if logits.shape[1] <= k:
        return None
    top = logits.topk(k + 1, dim=1).values
    return (top[:, k - 1] - top[:, k]).min().item()



@torch.no_grad()
def verify_layerwise(reference: Side, candidate: Side, ids: torch.Tensor, *,
                     tolerance: LayerTolerance, force_routing: bool = False, stop_at_first_failure: bool = False,
                     chained: bool = False, progress=None) -> LayerReport:
    """Compare `candidate` with `reference` block by block on token batch `ids` [b, s].

    Each layer of both sides gets the reference's hidden states, unless `chained`: then the
    candidate runs on its own stream, as in a whole-model forward, and the table shows how
    per-layer differences grow with depth.
    """
    started = time.time()
    report = LayerReport()
    cfg = reference.cfg

    def record(block: str, tensor: str, got: torch.Tensor, want: torch.Tensor, **extra) -> bool:
        row = {"block": block, "tensor": tensor, **compare(got, want), **extra}
        row["ok"] = row["max_rel_diff"] <= tolerance.max_rel_diff and row["cosine"] >= tolerance.min_cosine
        report.rows.append(row)
        if not row["ok"] and report.first_failure is None:
            report.first_failure = {"block": block, "tensor": tensor, "max_rel_diff": row["max_rel_diff"],
                                    "cosine": row["cosine"]}
        return row["ok"]

    total = cfg.num_layers + 2
    x = reference.embed(ids)
    y = candidate.embed(ids)
    record("embedding", "word_embeddings", y, x)
    y = y if chained else x
    reference.prepare(ids, x)
    candidate.prepare(ids, x)
    if progress is not None:
        progress(1, total)
    report.block_seconds["embedding"] = round(time.time() - started, 3)
    for i in range(cfg.num_layers):
        layer_started = time.time()
        ref = reference.layer(i, x)
        cand = candidate.layer(i, y if chained else x, forced_experts=ref["experts"] if force_routing else None)
        extra = {"routing_flips": _routing_flips(ref, cand),
                 "min_topk_gap": _min_topk_gap(ref["router_logits"], cfg.experts_per_token)}
        block = f"layer {i} ({cfg.layer_types[i].split('_')[0]})"
        ok = record(block, "attention", cand["attention"], ref["attention"])
        ok &= record(block, "router_logits", cand["router_logits"], ref["router_logits"])
        ok &= record(block, "mlp", cand["mlp"], ref["mlp"], **extra)
        ok &= record(block, "output", cand["output"], ref["output"])
        x = ref["output"]  # the next layer of both sides starts from the reference's stream
        y = cand["output"] if chained else x
        del ref, cand
        report.block_seconds[block] = round(time.time() - layer_started, 3)
        if progress is not None:
            progress(i + 2, total)
        if not ok and stop_at_first_failure:
            break
    else:
        head_started = time.time()
        record("head", "logits", candidate.head(y), reference.head(x))
        report.block_seconds["head"] = round(time.time() - head_started, 3)
        if progress is not None:
            progress(total, total)
    report.seconds = round(time.time() - started, 3)
    report.peak_rss_mb = peak_rss_mb()
    return report


def default_tolerance(dtype: str) -> LayerTolerance:
    return DEFAULT_LAYER_TOLERANCES["float32" if dtype == "float32" else "bfloat16"]


__all__ = ["HFSide", "MegatronSide", "LayerReport", "LayerTolerance", "compare", "default_tolerance",
           "verify_layerwise", "DEFAULT_LAYER_TOLERANCES"]
