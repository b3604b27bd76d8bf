"""The HF <-> megatron name table and layout transforms, as pure functions (no model)."""

from __future__ import annotations

import math

import pytest
import torch

from gptoss_model.checkpoint import name_map as nm
from gptoss_model.model.config import gpt_oss_20b, gpt_oss_120b, tiny


def _random_hf(cfg, seed=0):
    g = torch.Generator().manual_seed(seed)
    return {n: torch.randn(*s, generator=g) for n, s in nm.expected_hf_shapes(cfg).items()}


@pytest.mark.parametrize("make,tensors,params", [(gpt_oss_20b, 411, 20_914_757_184),
                                                  (gpt_oss_120b, 615, 116_829_156_672)])
def test_table_covers_every_tensor_of_the_real_checkpoints(make, tensors, params):
    shapes = nm.expected_hf_shapes(make())
    assert len(shapes) == tensors
    assert sum(math.prod(s) for s in shapes.values()) == params


@pytest.mark.parametrize("spec", ["local", "te"])
def test_round_trip_every_group(spec):
    cfg = tiny()
    hf = _random_hf(cfg)
    meg = {}
    for group in nm.iter_groups(cfg):
        out = dict(nm.hf_to_megatron({n: hf[n] for n in group.hf_names()}, cfg, spec))
        meg.update(out)
        back = dict(nm.megatron_to_hf(out, cfg, spec))
        assert set(back) == set(group.hf_names())
        for n in back:
            assert torch.equal(back[n], hf[n]), n
    per_layer_experts = 4 * cfg.num_experts
    assert len(meg) == 3 + cfg.num_layers * (9 + per_layer_experts)
    for name in meg:  # every megatron name parses back to its rule
        assert nm.match_megatron(name, spec) is not None, name


def test_gate_up_is_deinterleaved_into_gate_then_up():
    cfg = tiny()
    gate_up = torch.randn(cfg.hidden_size, 2 * cfg.intermediate_size)  # one expert, HF layout
    bias = torch.randn(2 * cfg.intermediate_size)
    x = torch.randn(5, cfg.hidden_size)
    hf_out = x @ gate_up + bias  # HF: gate = [..., ::2], up = [..., 1::2]
    fc1 = nm.gate_up_to_fc1(gate_up)
    assert fc1.shape == (2 * cfg.intermediate_size, cfg.hidden_size)
    meg_out = x @ fc1.T + nm.gate_up_bias_to_fc1(bias)  # megatron: chunk(2) -> gate, up
    gate, up = meg_out.chunk(2, dim=-1)
    torch.testing.assert_close(gate, hf_out[..., 0::2])
    torch.testing.assert_close(up, hf_out[..., 1::2])


def test_down_proj_orientation_on_a_square_matrix():
    """Square like the real 2880x2880: shape cannot tell; the product can."""
    down = torch.randn(16, 16)
    x = torch.randn(3, 16)
    fc2 = nm.down_to_fc2(down)
    torch.testing.assert_close(x @ fc2.T, x @ down)  # megatron Linear: x @ W.T
    assert not torch.allclose(x @ down.T, x @ down)


def test_qkv_is_grouped_per_query_group():
    cfg = tiny()  # 4 q heads, 2 kv groups, head_dim 16
    d, hpg = cfg.head_dim, cfg.heads_per_group
    q = torch.arange(4 * d).float()
    k = 1000 + torch.arange(2 * d).float()
    v = 2000 + torch.arange(2 * d).float()
    qkv = nm.qkv_to_megatron(q, k, v, hpg, d)
    expected = torch.cat([q[:2 * d], k[:d], v[:d], q[2 * d:], k[d:], v[d:]])
    assert torch.equal(qkv, expected)


def test_names_by_spec():
    m = nm.match_hf("model.layers.3.input_layernorm.weight")
    assert m.megatron_name("local") == "decoder.layers.3.input_layernorm.weight"
    assert m.megatron_name("te") == "decoder.layers.3.self_attention.linear_qkv.layer_norm_weight"
    e = nm.match_hf("model.layers.1.mlp.experts.down_proj")
    assert e.megatron_name("local", 5) == "decoder.layers.1.mlp.experts.local_experts.5.linear_fc2.weight"
    assert e.megatron_name("te", 5) == "decoder.layers.1.mlp.experts.linear_fc2.weight5"
    s = nm.match_hf("model.layers.0.self_attn.sinks")
    assert s.megatron_name() == "decoder.layers.0.self_attention.core_attention.softmax_offset"
    assert nm.match_hf("model.layers.0.self_attn.rotary_emb.inv_freq") is None


def test_single_expert_tensor_fans_out():
    cfg = tiny()
    t = torch.randn(cfg.num_experts, cfg.intermediate_size, cfg.hidden_size)
    out = nm.hf_to_megatron({"model.layers.2.mlp.experts.down_proj": t}, cfg)
    assert [n for n, _ in out] == [f"decoder.layers.2.mlp.experts.local_experts.{e}.linear_fc2.weight"
                                   for e in range(cfg.num_experts)]
    assert all(v.shape == (cfg.hidden_size, cfg.intermediate_size) for _, v in out)
    with pytest.raises(KeyError, match="whole group"):
        nm.hf_to_megatron({"model.layers.0.self_attn.q_proj.weight": torch.zeros(64, 64)}, cfg)


@pytest.mark.parametrize("tp_size", [2, 4])
def test_each_tp_rank_reads_exactly_its_slice_of_the_unsharded_tensor(tp_size):
    """What a rank reads through its rule's `tp_slices`, transformed, is its slice of the megatron tensor
    (QKV: whole query groups from q, k and v; o_proj: input columns; embedding/head/sinks: rows)."""
    cfg = tiny().replace(num_layers=1, num_key_value_heads=4, num_attention_heads=8)
    hf = _random_hf(cfg)
    split = 0
    for group in nm.iter_groups(cfg):
        mapping = group.rule.mapping
        if mapping.per_expert:
            continue
        (name, full), = nm.hf_to_megatron({n: hf[n] for n in group.hf_names()}, cfg)
        dim = mapping.tp_dim
        for rank in range(tp_size):
            local_shape = list(full.shape)
            if dim is not None:
                local_shape[dim] //= tp_size
            slices = mapping.tp_slices(cfg, tuple(local_shape), rank, tp_size)
            parts = []
            for n, where in zip(group.hf_names(), slices):
                t = hf[n]
                if "rows" in where:
                    t = t[where["rows"][0]:where["rows"][1]]
                if "cols" in where:
                    t = t[:, where["cols"][0]:where["cols"][1]]
                parts.append(t)
            got = mapping.to_megatron(parts, cfg)
            want = full if dim is None else full.chunk(tp_size, dim=dim)[rank]
            assert torch.equal(got, want), (name, rank)
        split += dim is not None
    assert split == 6  # embedding, qkv weight and bias, sinks, o_proj weight, lm_head


def test_stored_shapes_follow_the_rules_and_mxfp4_layout():
    cfg = gpt_oss_20b()
    plain, mx4 = nm.expected_stored_shapes(cfg, mxfp4=False), nm.expected_stored_shapes(cfg, mxfp4=True)
    assert plain == nm.expected_hf_shapes(cfg)
    assert mx4["model.layers.0.mlp.experts.gate_up_proj_blocks"] == (32, 5760, 90, 16)  # [E, out, in/32, 16]
    assert mx4["model.layers.0.mlp.experts.down_proj_scales"] == (32, 2880, 90)
    assert "model.layers.0.mlp.experts.gate_up_proj" not in mx4
    assert mx4["model.layers.0.mlp.experts.gate_up_proj_bias"] == (32, 5760)  # biases stay plain
    assert len(mx4) == len(plain) + 2 * cfg.num_layers
    for name, shape in plain.items():
        if name + "_blocks" in mx4:
            assert nm.hf_shape_of_mxfp4(mx4[name + "_blocks"]) == shape
    # checkpoint order: embedding first, then layer by layer, then the final norm and the head
    names = list(plain)
    assert names[0] == "model.embed_tokens.weight" and names[-2:] == ["model.norm.weight", "lm_head.weight"]
    layers = [int(n.split(".")[2]) for n in names[1:-2]]
    assert layers == sorted(layers)
