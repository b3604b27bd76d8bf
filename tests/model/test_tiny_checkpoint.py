"""gptoss_model.checkpoint.tiny: the directories load in transformers and are reproducible."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors import safe_open

from gptoss_model.checkpoint import mxfp4 as mx
from gptoss_model.model.reference import load_reference_model
from gptoss_model.checkpoint.tiny import (
    SPECIAL_TOKENS,
    TINY_HF_CONFIG,
    TINY_MXFP4_INTERMEDIATE_SIZE,
    hf_tensor_names,
    write_tiny_checkpoint,
)

transformers = pytest.importorskip("transformers")

VARIANTS = {
    "fp32": {"dtype": "float32"},
    "bf16": {"dtype": "bfloat16"},
    "mxfp4": {"dtype": "bfloat16", "mxfp4": True},
}


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory):
    root = tmp_path_factory.mktemp("tiny")
    return {name: write_tiny_checkpoint(root / name, **kw) for name, kw in VARIANTS.items()}


def _read_all(path) -> dict[str, torch.Tensor]:
    out = {}
    for f in sorted(path.glob("*.safetensors")):
        with safe_open(str(f), "pt") as fh:
            out.update({k: fh.get_tensor(k) for k in fh.keys()})
    return out


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_layout(ckpts, variant):
    path = ckpts[variant]
    cfg = json.loads((path / "config.json").read_text())
    assert cfg["model_type"] == "gpt_oss" and cfg["architectures"] == ["GptOssForCausalLM"]
    for key, value in TINY_HF_CONFIG.items():
        if key != "intermediate_size":
            assert cfg[key] == value, key
    is_mx = variant == "mxfp4"
    assert cfg["intermediate_size"] == (TINY_MXFP4_INTERMEDIATE_SIZE if is_mx else 48)
    index = json.loads((path / "model.safetensors.index.json").read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert shards == ["model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors"]
    tensors = _read_all(path)
    names = hf_tensor_names(cfg, mxfp4=is_mx)
    assert sorted(tensors) == sorted(names) == sorted(index["weight_map"])
    assert len(names) == 3 + cfg["num_hidden_layers"] * (19 if is_mx else 17)
    assert index["metadata"]["total_size"] == sum(t.numel() * t.element_size() for t in tensors.values())
    e, h, i = cfg["num_local_experts"], cfg["hidden_size"], cfg["intermediate_size"]
    p = "model.layers.0.mlp.experts."
    if is_mx:
        # exactly the openai/gpt-oss layout: rows = output features
        assert cfg["quantization_config"]["quant_method"] == "mxfp4"
        assert tensors[p + "gate_up_proj_blocks"].shape == (e, 2 * i, h // 32, 16)
        assert tensors[p + "gate_up_proj_scales"].shape == (e, 2 * i, h // 32)
        assert tensors[p + "down_proj_blocks"].shape == (e, h, i // 32, 16)
        assert tensors[p + "down_proj_scales"].dtype == torch.uint8
    else:
        assert "quantization_config" not in cfg
        assert tensors[p + "gate_up_proj"].shape == (e, h, 2 * i)
        assert tensors[p + "down_proj"].shape == (e, i, h)
    want = torch.float32 if variant == "fp32" else torch.bfloat16
    assert tensors["model.layers.0.self_attn.sinks"].dtype == want
    # randomised, not the ones/zeros a model init would give
    for name in ("model.norm.weight", "model.layers.1.self_attn.sinks", "model.layers.1.mlp.router.bias",
                 p + "down_proj_bias", "model.layers.2.self_attn.o_proj.bias"):
        t = tensors[name].float()
        assert t.std() > 0 and not torch.equal(t, torch.ones_like(t)), name


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_transformers_loads_and_runs(ckpts, variant):
    model = load_reference_model(ckpts[variant])
    assert model.config._attn_implementation == "eager"
    assert all(p.dtype == torch.float32 for p in model.parameters())
    files = _read_all(ckpts[variant])
    state = model.state_dict()
    for name, t in files.items():  # every file tensor landed, unchanged
        if not mx.is_mxfp4_pair(name):
            assert torch.equal(state[name], t.float()), name
    ids = torch.tensor([[5, 17, 300, 42, 7, 9, 100, 250, 3, 11, 12]])  # > sliding window of 8
    with torch.no_grad():
        logits = model(ids).logits
    assert logits.shape == (1, ids.shape[1], TINY_HF_CONFIG["vocab_size"])
    assert torch.isfinite(logits).all() and 0.05 < logits.std() < 20


def test_mxfp4_dequantized_by_transformers_equals_ours(ckpts):
    model = load_reference_model(ckpts["mxfp4"])  # transformers' own Mxfp4 dequantize path
    files = _read_all(ckpts["mxfp4"])
    state = model.state_dict()
    pairs, _ = mx.group_mxfp4_names(files)
    assert len(pairs) == 2 * TINY_HF_CONFIG["num_hidden_layers"]
    for logical, (b, s) in pairs.items():
        ours = mx.dequantize(files[b], files[s], torch.float32).transpose(1, 2)  # file rows -> HF [E, in, out]
        assert torch.equal(ours, state[logical]), logical
    # The default-dtype path (the config's bf16) agrees bit for bit as well. (Without an
    # explicit Mxfp4Config(dequantize=True) transformers first demands `accelerate`.)
    plain = transformers.AutoModelForCausalLM.from_pretrained(
        ckpts["mxfp4"], quantization_config=transformers.Mxfp4Config(dequantize=True)
    ).state_dict()
    for logical, (b, s) in pairs.items():
        assert plain[logical].dtype == torch.bfloat16
        ours = mx.dequantize(files[b], files[s], torch.bfloat16).transpose(1, 2)
        assert torch.equal(ours.view(torch.int16), plain[logical].contiguous().view(torch.int16)), logical


def test_mxfp4_matches_float_variant_up_to_quantization(tmp_path):
    # Same seed, same sizes: the MXFP4 experts are the float draws quantized, so
    # this also pins the orientation of the (non-square) expert matrices.
    flt = _read_all(write_tiny_checkpoint(tmp_path / "f", intermediate_size=96))
    q = _read_all(write_tiny_checkpoint(tmp_path / "q", mxfp4=True, dtype="float32"))
    for proj in ("gate_up_proj", "down_proj"):
        name = f"model.layers.2.mlp.experts.{proj}"
        deq = mx.dequantize(q[name + "_blocks"], q[name + "_scales"], torch.float32).transpose(1, 2)
        ref = flt[name]
        cos = torch.nn.functional.cosine_similarity(deq.flatten(), ref.flatten(), dim=0)
        assert deq.shape == ref.shape and cos > 0.98, (proj, cos)
    assert torch.equal(flt["model.layers.2.self_attn.sinks"], q["model.layers.2.self_attn.sinks"])


def test_tokenizer_and_chat_template(ckpts):
    tok = transformers.AutoTokenizer.from_pretrained(ckpts["bf16"])
    assert tok.eos_token == tok.pad_token == "<|endoftext|>"
    cfg = json.loads((ckpts["bf16"] / "config.json").read_text())
    assert cfg["eos_token_id"] == cfg["pad_token_id"] == tok.eos_token_id
    assert len(tok) <= TINY_HF_CONFIG["vocab_size"]
    assert all(tok.convert_tokens_to_ids(t) < len(tok) for t in SPECIAL_TOKENS)
    msgs = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "What is the capital of France?"},
        {"role": "assistant", "content": "Paris."},
        {"role": "user", "content": "And Germany?"},
        {"role": "assistant", "content": "Berlin."},
    ]
    text = tok.apply_chat_template(msgs, tokenize=False)
    assert text == (
        "<|start|>system<|message|>Be brief.<|end|>"
        "<|start|>user<|message|>What is the capital of France?<|end|>"
        "<|start|>assistant<|channel|>final<|message|>Paris.<|end|>"
        "<|start|>user<|message|>And Germany?<|end|>"
        "<|start|>assistant<|channel|>final<|message|>Berlin.<|return|>"
    )
    prompt = tok.apply_chat_template(msgs[:2], tokenize=False, add_generation_prompt=True)
    assert prompt.endswith("<|end|><|start|>assistant")
    ids = tok(text)["input_ids"]
    assert max(ids) < TINY_HF_CONFIG["vocab_size"]
    assert tok.convert_ids_to_tokens(ids[0]) == "<|start|>"  # special tokens stay whole
    assert tok.decode(ids) == text
    assert tok.decode(tok("unseen wörds ✓ 12345")["input_ids"]) == "unseen wörds ✓ 12345"  # byte-level


def test_same_seed_bitwise_identical(tmp_path, ckpts):
    again = write_tiny_checkpoint(tmp_path / "again", **VARIANTS["mxfp4"])
    files = sorted(f.name for f in ckpts["mxfp4"].iterdir())
    assert files == sorted(f.name for f in again.iterdir())
    for name in files:
        assert (again / name).read_bytes() == (ckpts["mxfp4"] / name).read_bytes(), name
    other = write_tiny_checkpoint(tmp_path / "other", seed=1, **VARIANTS["mxfp4"])
    shard = "model-00001-of-00002.safetensors"
    assert (other / shard).read_bytes() != (again / shard).read_bytes()


@pytest.mark.parametrize("num_shards", [3, 7])
def test_shard_counts(tmp_path, num_shards):
    path = write_tiny_checkpoint(tmp_path / "s", num_shards=num_shards, num_hidden_layers=2)
    index = json.loads((path / "model.safetensors.index.json").read_text())
    files = sorted(set(index["weight_map"].values()))
    assert files == [f"model-{k:05d}-of-{num_shards:05d}.safetensors" for k in range(1, num_shards + 1)]
    assert sorted(f.name for f in path.glob("*.safetensors")) == files


def test_single_shard_and_overrides(tmp_path):
    path = write_tiny_checkpoint(tmp_path / "one", num_shards=1, num_hidden_layers=2, hidden_size=32, head_dim=8)
    assert (path / "model.safetensors").exists() and not (path / "model.safetensors.index.json").exists()
    cfg = json.loads((path / "config.json").read_text())
    assert cfg["layer_types"] == ["sliding_attention", "full_attention"]
    model = load_reference_model(path)
    assert model.config.num_hidden_layers == 2 and model.config.hidden_size == 32
    with pytest.raises(ValueError):
        write_tiny_checkpoint(tmp_path / "bad", mxfp4=True, intermediate_size=48)
    with pytest.raises(TypeError):
        write_tiny_checkpoint(tmp_path / "bad2", no_such_field=1)
