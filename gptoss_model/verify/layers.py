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

import json
import math
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from gptoss_model.model.config import GptOssModelConfig
from gptoss_model.convert.writer import MAPPED_BYTES_LIMIT
from gptoss_model.system.resources import peak_rss_mb


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


# --------------------------------------------------------------- the sides
def _flat(x: torch.Tensor) -> torch.Tensor:
    return x.reshape(-1, x.shape[-1])


class HFSide:
    """transformers' GPT-OSS modules, built one at a time from a HF checkpoint directory."""

    def __init__(self, hf_dir: str | Path, round_to: torch.dtype | None = None,
                 compute_dtype: torch.dtype = torch.float32):
        from transformers import GptOssConfig

        from gptoss_model.checkpoint.load_hf import HFCheckpoint

        self.hf_dir = Path(hf_dir)
        self.cfg = GptOssModelConfig.from_hf_config(self.hf_dir)
        # Mapped safetensors pages count in RSS: drop the mappings every 64 MiB read, so memory
        # stays one layer whatever the checkpoint size.
        self.ckpt = HFCheckpoint(self.hf_dir, self.cfg, max_mapped_bytes=MAPPED_BYTES_LIMIT)
        raw = json.loads((self.hf_dir / "config.json").read_text())
        raw.pop("quantization_config", None)
        self.hf_config = GptOssConfig(**{k: v for k, v in raw.items() if k not in ("architectures", "model_type")})
        self.hf_config._attn_implementation = "eager"
        self.round_to = round_to
        self.compute_dtype = compute_dtype
        self.name = f"transformers ({self.hf_dir.name})"

    def _read(self, name: str) -> torch.Tensor:
        t = self.ckpt.read(name)
        # The candidate stores weights (not norms) in `round_to`; MXFP4 values and tensors stored
        # in that dtype already are exact there (and rounding a 2 GB expert tensor costs 3 GB).
        exact = self.ckpt.is_mxfp4(name) or t.dtype == self.round_to
        if self.round_to is not None and self.round_to != torch.float32 and "norm" not in name and not exact:
            t = t.to(self.round_to)
        return t.to(self.compute_dtype)

    def embed(self, ids: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.embedding(ids, self._read("model.embed_tokens.weight"))

    def prepare(self, ids: torch.Tensor, hidden: torch.Tensor) -> None:
        from transformers.masking_utils import create_causal_mask, create_sliding_window_causal_mask
        from transformers.models.gpt_oss.modeling_gpt_oss import GptOssRotaryEmbedding

        pos = torch.arange(ids.shape[1]).unsqueeze(0)
        kw = {"config": self.hf_config, "inputs_embeds": hidden, "attention_mask": None, "cache": None}
        self.masks = {"full_attention": create_causal_mask(**kw),
                      "sliding_attention": create_sliding_window_causal_mask(**kw)}
        self.position_embeddings = GptOssRotaryEmbedding(self.hf_config)(hidden.float(), pos)
        self.position_embeddings = tuple(t.to(self.compute_dtype) for t in self.position_embeddings)
        self.position_ids = pos

    def layer(self, i: int, x: torch.Tensor, forced_experts: torch.Tensor | None = None) -> dict:
        """x [b, s, h] -> attention, mlp, output [b, s, h], router logits and chosen experts [b*s, k]."""
        from transformers.models.gpt_oss.modeling_gpt_oss import GptOssDecoderLayer

        with torch.device("meta"):
            layer = GptOssDecoderLayer(self.hf_config, i)
        prefix = f"model.layers.{i}."
        layer.load_state_dict({k: self._read(prefix + k) for k in layer.state_dict()}, strict=True, assign=True)
        layer.eval()
        attn, _ = layer.self_attn(hidden_states=layer.input_layernorm(x),
                                  attention_mask=self.masks[self.hf_config.layer_types[i]],
                                  position_embeddings=self.position_embeddings, position_ids=self.position_ids)
        x2 = x + attn
        h2 = _flat(layer.post_attention_layernorm(x2))
        logits, scores, experts = layer.mlp.router(h2)
        if forced_experts is not None:
            experts = forced_experts
            scores = torch.softmax(logits.gather(1, experts), dim=1)
        mlp = layer.mlp.experts(h2, experts, scores).reshape(x.shape)
        del layer
        self.ckpt.close()
        return {"attention": attn, "mlp": mlp, "output": x2 + mlp, "router_logits": logits, "experts": experts}

    def head(self, x: torch.Tensor) -> torch.Tensor:
        from transformers.models.gpt_oss.modeling_gpt_oss import GptOssRMSNorm

        norm = GptOssRMSNorm(self.cfg.hidden_size, eps=self.cfg.rms_norm_eps).to(self.compute_dtype)
        norm.weight.data = self._read("model.norm.weight")
        return norm(x) @ self._read("lm_head.weight").T

    def close(self) -> None:
        self.ckpt.close()


class MegatronSide:
    """gptoss_model's megatron-core modules (world 1, local spec, fp32), one layer materialised at a time.

    `cfg` builds the modules (a different one than the checkpoint's gives a deliberately wrong
    model, e.g. for testing that the gate bites); weights come from a megatron checkpoint.
    """

    def __init__(self, megatron_path: str | Path, cfg: GptOssModelConfig,
                 compute_dtype: torch.dtype = torch.float32, base_megatron_path: str | Path | None = None):
        """`base_megatron_path`: `megatron_path` is an adapter-only LoRA/DoRA checkpoint; its adapters
        are merged (fp32) into this base's weights as they are read."""
        from gptoss_model.checkpoint.layout import compute_device
        from gptoss_model.checkpoint.megatron_reader import MegatronCheckpointReader

        self.cfg = cfg
        self.compute_dtype = compute_dtype
        if base_megatron_path is not None:
            from gptoss_model.export.adapters import AdapterExportError, AdaptedReader, open_adapted, read_peft_config

            peft = read_peft_config(megatron_path)
            if peft is None:
                raise AdapterExportError(f"{megatron_path}: a base checkpoint was given but it holds no adapters")
            self.reader = AdaptedReader(*open_adapted(megatron_path, base_megatron_path, cfg, peft), peft)
        else:
            self.reader = MegatronCheckpointReader(megatron_path, cfg)
        self.name = f"megatron ({self.reader.iter_dir.parent.name}/{self.reader.iter_dir.name})"
        self.device = compute_device()  # one layer at a time there; results come back to the CPU
        self._world = None

    def __enter__(self) -> "MegatronSide":
        from gptoss_model.checkpoint.layout import build_model
        from gptoss_model.model.parallel import world_of_one

        self.reader.__enter__()
        self._world = world_of_one("layer-wise verification")
        self._world.__enter__()
        self.model = build_model(self.cfg, self.compute_dtype, device="meta")
        # The rotary module keeps buffers computed at construction: build it for real from a
        # one-layer model of the same attention config (its other sizes are irrelevant here).
        small = self.cfg.replace(num_layers=1, num_experts=self.cfg.experts_per_token, vocab_size=64,
                                 layer_types=(self.cfg.layer_types[0],))
        self.rotary = build_model(small, torch.float32, device=self.device).rotary_pos_emb
        return self

    def __exit__(self, *exc) -> None:
        if self._world is not None:
            self._world.__exit__(*exc)
            self._world = None

    @property
    def storage_dtype(self) -> torch.dtype:
        return self.reader.stored_dtype("output_layer.weight")

    def _materialise(self, module: torch.nn.Module, prefix: str) -> torch.nn.Module:
        module.to_empty(device=self.device)
        with torch.no_grad():
            # One parameter read at a time: the stored copy of a whole layer is never held
            # beside its fp32 parameters.
            for n, p in module.named_parameters():
                p.copy_(self.reader.read([prefix + n])[prefix + n])
        return module.eval()

    def embed(self, ids: torch.Tensor) -> torch.Tensor:
        w = self.reader.read(["embedding.word_embeddings.weight"])["embedding.word_embeddings.weight"]
        return torch.nn.functional.embedding(ids, w.to(self.compute_dtype))  # on the CPU: one lookup

    def prepare(self, ids: torch.Tensor, hidden: torch.Tensor) -> None:
        emb, _ = self.rotary(ids.shape[1])
        self.rotary_pos_emb = emb

    def layer(self, i: int, x: torch.Tensor, forced_experts: torch.Tensor | None = None) -> dict:
        layer = self._materialise(self.model.decoder.layers[i], f"decoder.layers.{i}.")
        b, s, h = x.shape
        xs = x.transpose(0, 1).contiguous().to(self.device)  # megatron: [s, b, h]
        if forced_experts is not None:
            forced_experts = forced_experts.to(self.device)
        captured = {}
        router = layer.mlp.router
        own_routing = router.routing

        def routing(logits, *args, **kwargs):
            flat = logits.reshape(-1, self.cfg.num_experts)
            captured["logits"] = flat
            if forced_experts is None:
                probs, routing_map = own_routing(logits, *args, **kwargs)
            else:  # the reference's choice, in megatron's token order [s, b]
                idx = forced_experts.reshape(b, s, -1).transpose(0, 1).reshape(s * b, -1)
                routing_map = torch.zeros_like(flat, dtype=torch.bool).scatter_(1, idx, True)
                probs = torch.zeros_like(flat).scatter_(1, idx, torch.softmax(flat.gather(1, idx), dim=1))
            captured["map"] = routing_map
            return probs, routing_map

        router.routing = routing
        try:
            attn, attn_bias = layer.self_attention(layer.input_layernorm(xs), attention_mask=None,
                                                   rotary_pos_emb=self.rotary_pos_emb)
            attn = attn + attn_bias if attn_bias is not None else attn
            x2 = xs + attn
            mlp, mlp_bias = layer.mlp(layer.pre_mlp_layernorm(x2))
            mlp = mlp + mlp_bias if mlp_bias is not None else mlp
        finally:
            del router.routing
        out = {"attention": attn.transpose(0, 1), "mlp": mlp.transpose(0, 1), "output": (x2 + mlp).transpose(0, 1),
               "router_logits": captured["logits"].reshape(s, b, -1).transpose(0, 1).reshape(b * s, -1),
               "routing_map": captured["map"].reshape(s, b, -1).transpose(0, 1).reshape(b * s, -1)}
        layer.to("meta")
        return {k: v.cpu() for k, v in out.items()}

    def head(self, x: torch.Tensor) -> torch.Tensor:
        norm = self._materialise(self.model.decoder.final_layernorm, "decoder.final_layernorm.")
        w = self.reader.read(["output_layer.weight"])["output_layer.weight"].to(self.device, self.compute_dtype)
        out = norm(x.to(self.device)) @ w.T
        norm.to("meta")
        return out.cpu()

    def close(self) -> None:
        pass


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
def verify_layerwise(reference: HFSide, candidate, ids: torch.Tensor, *,
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
