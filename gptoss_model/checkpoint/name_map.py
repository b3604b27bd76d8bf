"""Hugging Face <-> megatron-core names and layouts for GPT-OSS: one table + small pure transforms.

Megatron names are those of an unsharded (world-size 1) GPTModel's
state_dict, with *global* layer and expert indices; they are also the keys of
its sharded_state_dict. Loaders map them to local (PP/EP) indices and TP
slices; the converter and exporter use the functions below on single tensors
without any model.

Layouts (the reason this module exists; each was a real bug somewhere):
  * QKV: HF has separate q/k/v; megatron's `linear_qkv` concatenates them
    per query group: [q heads of group 0, k0, v0, q heads of group 1, k1, v1, ...]
    (weights and biases alike). TP splits it by whole query groups.
  * gate/up: HF `gate_up_proj` is [E, hidden, 2*inter] with gate and up
    *interleaved* on the last dim (gate = [..., 0::2], up = [..., 1::2]);
    megatron's per-expert `linear_fc1.weight` is [gate; up] = [2*inter, hidden].
  * down: HF `down_proj` is [E, inter, hidden] (x @ W); megatron's per-expert
    `linear_fc2.weight` is [hidden, inter] (x @ W.T). In the real models the
    per-expert matrix is square (2880x2880): a missing transpose keeps the
    shape and silently ruins the model. Only logits parity catches it.
  * sinks, router, norms, o_proj, embeddings, lm_head: same layout, new name.

Each `Rule` carries its `ParamMapping` (a direct copy, the QKV merge, the
gate/up interleave, the down transpose): the transforms both ways, how TP
splits the tensor and, for MXFP4-stored experts, which stored rows make the
megatron tensor. Loaders, the converter and the exporter call the mapping and
never branch on the tensor's name. The rules' shapes (in config symbols) are
the one source of the HF layout: validation, the tiny test checkpoints and the
benchmark's synthetic checkpoints all derive their tensor lists from them.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Iterator, Mapping

import torch

from gptoss_model.checkpoint import mxfp4 as mx
from gptoss_model.model.config import GptOssModelConfig
from gptoss_model.checkpoint.mappings import (  # noqa: F401  (the transforms are part of this module's API)
    DirectMapping, GateUpMapping, ParamMapping, QKVMapping, TransposeMapping, down_to_fc2, fc1_bias_to_gate_up,
    fc1_to_gate_up, fc2_to_down, gate_up_bias_to_fc1, gate_up_to_fc1, qkv_from_megatron, qkv_to_megatron)


@dataclass(frozen=True)
class Rule:
    hf: tuple[str, ...]  # HF tensor names ({layer}); several = fused into one megatron tensor
    local: str  # megatron name, local layer spec ({layer}, {expert})
    te: str  # megatron name, Transformer Engine layer spec
    mapping: ParamMapping  # the transforms between the two layouts, and the TP split
    hf_shape: tuple[str, ...]  # per HF tensor, dims in config symbols (see _symbols)
    init: str  # family of values it holds (synthetic checkpoints draw from one distribution per family)

    @property
    def tp_dim(self) -> int | None:
        return self.mapping.tp_dim


L = "model.layers.{layer}."
M = "decoder.layers.{layer}."
EXP_LOCAL = M + "mlp.experts.local_experts.{expert}."
EXP_TE = M + "mlp.experts."

# One instance per transform: rules share them, tests may patch them.
REPLICATED = DirectMapping()
ROW_SPLIT = DirectMapping(tp_dim=0)  # vocab-parallel embedding/head, per-head sinks
COLUMN_SPLIT = DirectMapping(tp_dim=1)  # o_proj: row-parallel linear, input dim split
QKV_MERGE = QKVMapping()
GATE_UP_INTERLEAVE = GateUpMapping(bias=False)
GATE_UP_BIAS_INTERLEAVE = GateUpMapping(bias=True)
DOWN_TRANSPOSE = TransposeMapping()
EXPERT_DIRECT = DirectMapping(per_expert=True)

# Megatron TP dims: embedding/lm_head/sinks/qkv by rows (vocab, heads), o_proj by columns.
# Experts are never TP-split: GPT-OSS runs with expert tensor parallel size 1.
# fmt: off
RULES: tuple[Rule, ...] = (
    #     HF name(s)                                                   megatron, local spec                            megatron, TE spec                                   mapping                  HF shape(s)                   init
    Rule(("model.embed_tokens.weight",),                              "embedding.word_embeddings.weight",              "embedding.word_embeddings.weight",                 ROW_SPLIT,               ("V,H",),                     "embedding"),
    Rule((L + "input_layernorm.weight",),                             M + "input_layernorm.weight",                    M + "self_attention.linear_qkv.layer_norm_weight",  REPLICATED,              ("H",),                       "norm"),
    Rule((L + "self_attn.q_proj.weight", L + "self_attn.k_proj.weight",
          L + "self_attn.v_proj.weight"),                             M + "self_attention.linear_qkv.weight",          M + "self_attention.linear_qkv.weight",             QKV_MERGE,               ("NQ,H", "NKV,H", "NKV,H"),   "linear"),
    Rule((L + "self_attn.q_proj.bias", L + "self_attn.k_proj.bias",
          L + "self_attn.v_proj.bias"),                               M + "self_attention.linear_qkv.bias",            M + "self_attention.linear_qkv.bias",               QKV_MERGE,               ("NQ", "NKV", "NKV"),         "bias"),
    Rule((L + "self_attn.sinks",),                                    M + "self_attention.core_attention.softmax_offset", M + "self_attention.core_attention.softmax_offset", ROW_SPLIT,          ("N",),                       "sink"),
    Rule((L + "self_attn.o_proj.weight",),                            M + "self_attention.linear_proj.weight",         M + "self_attention.linear_proj.weight",            COLUMN_SPLIT,            ("H,NQ",),                    "linear"),
    Rule((L + "self_attn.o_proj.bias",),                              M + "self_attention.linear_proj.bias",           M + "self_attention.linear_proj.bias",              REPLICATED,              ("H",),                       "bias"),
    Rule((L + "post_attention_layernorm.weight",),                    M + "pre_mlp_layernorm.weight",                  M + "pre_mlp_layernorm.weight",                     REPLICATED,              ("H",),                       "norm"),
    Rule((L + "mlp.router.weight",),                                  M + "mlp.router.weight",                         M + "mlp.router.weight",                            REPLICATED,              ("E,H",),                     "router"),
    Rule((L + "mlp.router.bias",),                                    M + "mlp.router.bias",                           M + "mlp.router.bias",                              REPLICATED,              ("E",),                       "router_bias"),
    Rule((L + "mlp.experts.gate_up_proj",),                           EXP_LOCAL + "linear_fc1.weight",                 EXP_TE + "linear_fc1.weight{expert}",               GATE_UP_INTERLEAVE,      ("E,H,2I",),                  "linear"),
    Rule((L + "mlp.experts.gate_up_proj_bias",),                      EXP_LOCAL + "linear_fc1.bias",                   EXP_TE + "linear_fc1.bias{expert}",                 GATE_UP_BIAS_INTERLEAVE, ("E,2I",),                    "bias"),
    Rule((L + "mlp.experts.down_proj",),                              EXP_LOCAL + "linear_fc2.weight",                 EXP_TE + "linear_fc2.weight{expert}",               DOWN_TRANSPOSE,          ("E,I,H",),                   "linear"),
    Rule((L + "mlp.experts.down_proj_bias",),                         EXP_LOCAL + "linear_fc2.bias",                   EXP_TE + "linear_fc2.bias{expert}",                 EXPERT_DIRECT,           ("E,H",),                     "bias"),
    Rule(("model.norm.weight",),                                      "decoder.final_layernorm.weight",                "decoder.final_layernorm.weight",                   REPLICATED,              ("H",),                       "norm"),
    Rule(("lm_head.weight",),                                         "output_layer.weight",                           "output_layer.weight",                              ROW_SPLIT,               ("V,H",),                     "linear"),
)
# fmt: on


def _symbols(cfg: GptOssModelConfig) -> dict[str, int]:
    return {
        "V": cfg.vocab_size, "H": cfg.hidden_size, "I": cfg.intermediate_size, "E": cfg.num_experts,
        "N": cfg.num_attention_heads, "NQ": cfg.num_attention_heads * cfg.head_dim,
        "NKV": cfg.num_key_value_heads * cfg.head_dim,
    }


def _dims(spec: str, cfg: GptOssModelConfig) -> tuple[int, ...]:
    sym = _symbols(cfg)
    out = []
    for d in spec.split(","):
        m = re.fullmatch(r"(\d*)([A-Z]+)", d)
        out.append(int(m.group(1) or 1) * sym[m.group(2)])
    return tuple(out)


def _spec_name(rule: Rule, spec: str) -> str:
    if spec not in ("local", "te"):
        raise ValueError(f"layer spec must be 'local' or 'te', got {spec!r}")
    return rule.local if spec == "local" else rule.te


def _pattern(template: str) -> re.Pattern:
    rx = re.escape(template).replace(r"\{layer\}", r"(?P<layer>\d+)").replace(r"\{expert\}", r"(?P<expert>\d+)")
    return re.compile(rx + "$")


_HF_PATTERNS = [(_pattern(h), r, i) for r in RULES for i, h in enumerate(r.hf)]
_MEG_PATTERNS = {s: [(_pattern(_spec_name(r, s)), r) for r in RULES] for s in ("local", "te")}


# ------------------------------------------------------------------- lookups
@dataclass(frozen=True)
class Match:
    rule: Rule
    layer: int | None
    expert: int | None = None
    position: int = 0  # which of rule.hf (0 for q, 1 for k, 2 for v)

    def hf_names(self) -> tuple[str, ...]:
        return tuple(h.format(layer=self.layer) for h in self.rule.hf)

    def megatron_name(self, spec: str = "local", expert: int | None = None) -> str:
        e = self.expert if expert is None else expert
        return _spec_name(self.rule, spec).format(layer=self.layer, expert=e)

    def hf_shapes(self, cfg: GptOssModelConfig) -> tuple[tuple[int, ...], ...]:
        return tuple(_dims(s, cfg) for s in self.rule.hf_shape)


def match_hf(name: str) -> Match | None:
    for rx, rule, pos in _HF_PATTERNS:
        m = rx.match(name)
        if m:
            return Match(rule, int(m["layer"]) if "layer" in m.groupdict() else None, position=pos)
    return None


def match_megatron(name: str, spec: str = "local") -> Match | None:
    for rx, rule in _MEG_PATTERNS[spec]:
        m = rx.match(name)
        if m:
            g = m.groupdict()
            return Match(rule, int(g["layer"]) if "layer" in g else None,
                         int(g["expert"]) if "expert" in g else None)
    return None


def iter_groups(cfg: GptOssModelConfig) -> Iterator[Match]:
    """Every HF tensor group of the model, rule by rule (one Match per rule and layer)."""
    for rule in RULES:
        if "{layer}" in rule.hf[0]:
            for layer in range(cfg.num_layers):
                yield Match(rule, layer)
        else:
            yield Match(rule, None)


def iter_checkpoint_groups(cfg: GptOssModelConfig) -> Iterator[Match]:
    """The same groups layer by layer, as a HF checkpoint stores them: what precedes the layers
    (embedding), every layer's groups in RULES order, then what follows (final norm, head)."""
    layered = [i for i, r in enumerate(RULES) if "{layer}" in r.hf[0]]
    before = [r for i, r in enumerate(RULES) if i < layered[0] and i not in layered]
    after = [r for i, r in enumerate(RULES) if i > layered[0] and i not in layered]
    yield from (Match(r, None) for r in before)
    for layer in range(cfg.num_layers):
        yield from (Match(RULES[i], layer) for i in layered)
    yield from (Match(r, None) for r in after)


def expected_hf_shapes(cfg: GptOssModelConfig) -> dict[str, tuple[int, ...]]:
    """Every tensor a bf16/fp32 HF GPT-OSS checkpoint must hold, with its shape (checkpoint order)."""
    return {n: s for g in iter_checkpoint_groups(cfg) for n, s in zip(g.hf_names(), g.hf_shapes(cfg))}


# -------------------------------------------------------------- MXFP4 storage
# openai/gpt-oss-* store the expert weights (the mappings with `stored_rows`) as MXFP4: per
# expert, the transpose of the HF bf16 matrix ([out, in] rows), each row as groups of 32 FP4
# values, 16 bytes of blocks and one E8M0 scale byte per group.
def is_mxfp4_stored(rule: Rule) -> bool:
    """Whether openai's checkpoints store this rule's HF tensor as MXFP4 blocks/scales."""
    return rule.mapping.stored_rows is not None


def mxfp4_stored_shapes(hf_shape: tuple[int, ...]) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """HF bf16 [E, in, out] -> the (blocks [E, out, in/32, 16], scales [E, out, in/32]) it is stored as."""
    e, in_features, out_features = hf_shape
    groups = -(-in_features // mx.GROUP)
    return (e, out_features, groups, mx.BLOCK_BYTES), (e, out_features, groups)


def hf_shape_of_mxfp4(blocks_shape: tuple[int, ...]) -> tuple[int, ...]:
    """The logical HF bf16 shape [E, in, out] of MXFP4 blocks [E, out, G, 16]."""
    e, out_features, groups, block_bytes = blocks_shape
    return (e, groups * block_bytes * 2, out_features)


def expected_stored_shapes(cfg: GptOssModelConfig, *, mxfp4: bool) -> dict[str, tuple[int, ...]]:
    """Every tensor as the checkpoint file holds it, in checkpoint order; with `mxfp4` the expert
    weights appear as their `_blocks`/`_scales` pairs, as in openai/gpt-oss-*."""
    out: dict[str, tuple[int, ...]] = {}
    for g in iter_checkpoint_groups(cfg):
        for name, shape in zip(g.hf_names(), g.hf_shapes(cfg)):
            if mxfp4 and is_mxfp4_stored(g.rule):
                blocks, scales = mx.mxfp4_pair_names(name)
                out[blocks], out[scales] = mxfp4_stored_shapes(shape)
            else:
                out[name] = shape
    return out


def init_of(hf_name: str) -> str:
    """The value family (`Rule.init`) of a HF tensor name, or of its MXFP4 blocks/scales."""
    m = match_hf(mx.logical_name(hf_name))
    if m is None:
        raise KeyError(f"not a GPT-OSS tensor name: {hf_name!r}")
    return m.rule.init


# --------------------------------------------------- whole-group conversions
def hf_to_megatron(hf_tensors: Mapping[str, torch.Tensor], cfg: GptOssModelConfig,
                   spec: str = "local") -> list[tuple[str, torch.Tensor]]:
    """The HF tensors of one group (1 name, or q/k/v of one layer) -> [(megatron name, tensor)].

    Unsharded, global indices. Stacked expert tensors fan out to one entry per expert.
    """
    first = match_hf(next(iter(hf_tensors)))
    if first is None:
        raise KeyError(f"not a GPT-OSS tensor name: {next(iter(hf_tensors))!r}")
    names = first.hf_names()
    missing = [n for n in names if n not in hf_tensors]
    if missing:
        raise KeyError(f"{names[0]} needs the whole group {list(names)}; missing {missing}")
    t = [hf_tensors[n] for n in names]
    mapping = first.rule.mapping
    if mapping.per_expert:
        return [(first.megatron_name(spec, e), mapping.to_megatron([x[e] for x in t], cfg))
                for e in range(t[0].shape[0])]
    return [(first.megatron_name(spec), mapping.to_megatron(t, cfg))]


def megatron_to_hf(meg_tensors: Mapping[str, torch.Tensor], cfg: GptOssModelConfig,
                   spec: str = "local") -> list[tuple[str, torch.Tensor]]:
    """Unsharded megatron tensors of one group (for experts: all E of a layer) -> [(HF name, tensor)]."""
    first = match_megatron(next(iter(meg_tensors)), spec)
    if first is None:
        raise KeyError(f"not a GPT-OSS megatron name: {next(iter(meg_tensors))!r}")
    mapping = first.rule.mapping
    names = first.hf_names()
    if mapping.per_expert:
        want = [first.megatron_name(spec, e) for e in range(cfg.num_experts)]
        missing = [n for n in want if n not in meg_tensors]
        if missing:
            raise KeyError(f"{names[0]} stacks all {cfg.num_experts} experts; missing {missing[:3]}...")
        per_expert = [mapping.to_hf(meg_tensors[n], cfg) for n in want]
        return [(name, torch.stack([parts[i] for parts in per_expert])) for i, name in enumerate(names)]
    return list(zip(names, mapping.to_hf(meg_tensors[first.megatron_name(spec)], cfg)))
