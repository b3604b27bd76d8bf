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
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Iterator, Mapping

import torch

from gptoss_model.config import GptOssModelConfig

# Transform kinds (see the functions below).
COPY, QKV, QKV_BIAS, GATE_UP, GATE_UP_BIAS, DOWN, DOWN_BIAS = (
    "copy", "qkv", "qkv_bias", "gate_up", "gate_up_bias", "down", "down_bias")
EXPERT_KINDS = {GATE_UP, GATE_UP_BIAS, DOWN, DOWN_BIAS}


@dataclass(frozen=True)
class Rule:
    hf: tuple[str, ...]  # HF tensor names ({layer}); several = fused into one megatron tensor
    local: str  # megatron name, local layer spec ({layer}, {expert})
    te: str  # megatron name, Transformer Engine layer spec
    kind: str  # transform
    hf_shape: tuple[str, ...]  # per HF tensor, dims in config symbols (see _SYMBOLS)
    tp_dim: int | None  # dim megatron splits across TP ranks (None: replicated)


L = "model.layers.{layer}."
M = "decoder.layers.{layer}."
EXP_LOCAL = M + "mlp.experts.local_experts.{expert}."
EXP_TE = M + "mlp.experts."

# fmt: off
RULES: tuple[Rule, ...] = (
    #     HF name(s)                                                   megatron, local spec                            megatron, TE spec                                   transform     HF shape(s)                   TP dim
    Rule(("model.embed_tokens.weight",),                              "embedding.word_embeddings.weight",              "embedding.word_embeddings.weight",                 COPY,         ("V,H",),                     0),
    Rule((L + "input_layernorm.weight",),                             M + "input_layernorm.weight",                    M + "self_attention.linear_qkv.layer_norm_weight",  COPY,         ("H",),                       None),
    Rule((L + "self_attn.q_proj.weight", L + "self_attn.k_proj.weight",
          L + "self_attn.v_proj.weight"),                             M + "self_attention.linear_qkv.weight",          M + "self_attention.linear_qkv.weight",             QKV,          ("NQ,H", "NKV,H", "NKV,H"),   0),
    Rule((L + "self_attn.q_proj.bias", L + "self_attn.k_proj.bias",
          L + "self_attn.v_proj.bias"),                               M + "self_attention.linear_qkv.bias",            M + "self_attention.linear_qkv.bias",               QKV_BIAS,     ("NQ", "NKV", "NKV"),         0),
    Rule((L + "self_attn.sinks",),                                    M + "self_attention.core_attention.softmax_offset", M + "self_attention.core_attention.softmax_offset", COPY,     ("N",),                       0),
    Rule((L + "self_attn.o_proj.weight",),                            M + "self_attention.linear_proj.weight",         M + "self_attention.linear_proj.weight",            COPY,         ("H,NQ",),                    1),
    Rule((L + "self_attn.o_proj.bias",),                              M + "self_attention.linear_proj.bias",           M + "self_attention.linear_proj.bias",              COPY,         ("H",),                       None),
    Rule((L + "post_attention_layernorm.weight",),                    M + "pre_mlp_layernorm.weight",                  M + "pre_mlp_layernorm.weight",                     COPY,         ("H",),                       None),
    Rule((L + "mlp.router.weight",),                                  M + "mlp.router.weight",                         M + "mlp.router.weight",                            COPY,         ("E,H",),                     None),
    Rule((L + "mlp.router.bias",),                                    M + "mlp.router.bias",                           M + "mlp.router.bias",                              COPY,         ("E",),                       None),
    Rule((L + "mlp.experts.gate_up_proj",),                           EXP_LOCAL + "linear_fc1.weight",                 EXP_TE + "linear_fc1.weight{expert}",               GATE_UP,      ("E,H,2I",),                  None),
    Rule((L + "mlp.experts.gate_up_proj_bias",),                      EXP_LOCAL + "linear_fc1.bias",                   EXP_TE + "linear_fc1.bias{expert}",                 GATE_UP_BIAS, ("E,2I",),                    None),
    Rule((L + "mlp.experts.down_proj",),                              EXP_LOCAL + "linear_fc2.weight",                 EXP_TE + "linear_fc2.weight{expert}",               DOWN,         ("E,I,H",),                   None),
    Rule((L + "mlp.experts.down_proj_bias",),                         EXP_LOCAL + "linear_fc2.bias",                   EXP_TE + "linear_fc2.bias{expert}",                 DOWN_BIAS,    ("E,H",),                     None),
    Rule(("model.norm.weight",),                                      "decoder.final_layernorm.weight",                "decoder.final_layernorm.weight",                   COPY,         ("H",),                       None),
    Rule(("lm_head.weight",),                                         "output_layer.weight",                           "output_layer.weight",                              COPY,         ("V,H",),                     0),
)
# fmt: on
# Experts are never TP-split: GPT-OSS runs with expert tensor parallel size 1.


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
    """Every HF tensor group of the model, in checkpoint order (one Match per rule and layer)."""
    for rule in RULES:
        if "{layer}" in rule.hf[0]:
            for layer in range(cfg.num_layers):
                yield Match(rule, layer)
        else:
            yield Match(rule, None)


def expected_hf_shapes(cfg: GptOssModelConfig) -> dict[str, tuple[int, ...]]:
    """Every tensor a bf16/fp32 HF GPT-OSS checkpoint must hold, with its shape."""
    return {n: s for g in iter_groups(cfg) for n, s in zip(g.hf_names(), g.hf_shapes(cfg))}


# ---------------------------------------------------------------- transforms
# Each works on any contiguous slice of query groups / on one expert, so a
# loader can transform just what a rank owns.
def qkv_to_megatron(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, heads_per_group: int,
                    head_dim: int) -> torch.Tensor:
    """[q; k; v] (grouped-query heads, weight or bias) -> per-group [q.., k, v] rows."""
    groups = k.shape[0] // head_dim
    rest = q.shape[1:]
    q = q.reshape(groups, heads_per_group * head_dim, *rest)
    k = k.reshape(groups, head_dim, *rest)
    v = v.reshape(groups, head_dim, *rest)
    return torch.cat([q, k, v], dim=1).reshape(-1, *rest)


def qkv_from_megatron(qkv: torch.Tensor, heads_per_group: int, head_dim: int):
    rest = qkv.shape[1:]
    per_group = (heads_per_group + 2) * head_dim
    g = qkv.reshape(qkv.shape[0] // per_group, per_group, *rest)
    q, k, v = torch.split(g, [heads_per_group * head_dim, head_dim, head_dim], dim=1)
    return q.reshape(-1, *rest), k.reshape(-1, *rest), v.reshape(-1, *rest)


def gate_up_to_fc1(gate_up: torch.Tensor) -> torch.Tensor:
    """One expert: HF [hidden, 2*inter] (gate/up interleaved) -> megatron fc1 [2*inter, hidden] = [gate; up]."""
    return torch.cat([gate_up[..., 0::2], gate_up[..., 1::2]], dim=-1).transpose(-1, -2).contiguous()


def fc1_to_gate_up(fc1: torch.Tensor) -> torch.Tensor:
    gate, up = fc1.chunk(2, dim=-2)
    return torch.stack([gate, up], dim=-2).flatten(-3, -2).transpose(-1, -2).contiguous()


def gate_up_bias_to_fc1(bias: torch.Tensor) -> torch.Tensor:
    """One expert: HF [2*inter] interleaved -> megatron [gate; up]."""
    return torch.cat([bias[..., 0::2], bias[..., 1::2]], dim=-1)


def fc1_bias_to_gate_up(bias: torch.Tensor) -> torch.Tensor:
    gate, up = bias.chunk(2, dim=-1)
    return torch.stack([gate, up], dim=-1).flatten(-2)


def down_to_fc2(down: torch.Tensor) -> torch.Tensor:
    """One expert: HF [inter, hidden] (x @ W) -> megatron fc2 [hidden, inter] (x @ W.T)."""
    return down.transpose(-1, -2).contiguous()


def fc2_to_down(fc2: torch.Tensor) -> torch.Tensor:
    return fc2.transpose(-1, -2).contiguous()


_EXPERT_TO_MEGATRON = {GATE_UP: gate_up_to_fc1, GATE_UP_BIAS: gate_up_bias_to_fc1,
                       DOWN: down_to_fc2, DOWN_BIAS: lambda t: t}
_EXPERT_TO_HF = {GATE_UP: fc1_to_gate_up, GATE_UP_BIAS: fc1_bias_to_gate_up,
                 DOWN: fc2_to_down, DOWN_BIAS: lambda t: t}


# MXFP4 stores each expert's weight as [out, in] rows (the transpose of HF's bf16 layout), so
# megatron's tensor is just a selection of stored rows: fc1 = [gate; up] = even rows, then odd
# rows; fc2 = all rows. A loader can dequantize straight into megatron layout, no transposes.
_MEGATRON_ROWS_OF_STORED = {GATE_UP: (slice(0, None, 2), slice(1, None, 2)), DOWN: (slice(None),)}


def megatron_rows_of_stored(kind: str) -> tuple[slice, ...] | None:
    """Row slices of an expert's stored [out, in] MXFP4 weight that make its megatron tensor, in order."""
    return _MEGATRON_ROWS_OF_STORED.get(kind)


def expert_to_megatron(kind: str, hf_expert_slice: torch.Tensor) -> torch.Tensor:
    """One expert's slice of a stacked HF expert tensor -> that expert's megatron tensor."""
    return _EXPERT_TO_MEGATRON[kind](hf_expert_slice)


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
    kind = first.rule.kind
    if kind in (QKV, QKV_BIAS):
        return [(first.megatron_name(spec), qkv_to_megatron(*t, cfg.heads_per_group, cfg.head_dim))]
    if kind in EXPERT_KINDS:
        return [(first.megatron_name(spec, e), expert_to_megatron(kind, t[0][e])) for e in range(t[0].shape[0])]
    return [(first.megatron_name(spec), t[0])]


def megatron_to_hf(meg_tensors: Mapping[str, torch.Tensor], cfg: GptOssModelConfig,
                   spec: str = "local") -> list[tuple[str, torch.Tensor]]:
    """Unsharded megatron tensors of one group (for experts: all E of a layer) -> [(HF name, tensor)]."""
    first = match_megatron(next(iter(meg_tensors)), spec)
    if first is None:
        raise KeyError(f"not a GPT-OSS megatron name: {next(iter(meg_tensors))!r}")
    kind = first.rule.kind
    names = first.hf_names()
    if kind in (QKV, QKV_BIAS):
        qkv = meg_tensors[first.megatron_name(spec)]
        return list(zip(names, qkv_from_megatron(qkv, cfg.heads_per_group, cfg.head_dim)))
    if kind in EXPERT_KINDS:
        want = [first.megatron_name(spec, e) for e in range(cfg.num_experts)]
        missing = [n for n in want if n not in meg_tensors]
        if missing:
            raise KeyError(f"{names[0]} stacks all {cfg.num_experts} experts; missing {missing[:3]}...")
        return [(names[0], torch.stack([_EXPERT_TO_HF[kind](meg_tensors[n]) for n in want]))]
    return [(names[0], meg_tensors[first.megatron_name(spec)])]
