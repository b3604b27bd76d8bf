"""Tiny random GPT-OSS Hugging Face checkpoints, for tests and the demo pipeline.

``write_tiny_checkpoint(path)`` lays out a directory the way openai/gpt-oss-*
(MXFP4) or a bf16/fp32 re-save of it looks: config.json, sharded safetensors
plus index, generation_config.json, tokenizer files and a Harmony-like chat
template, so the converters and the data pipeline exercise the real code paths
in seconds. Every weight is random but deterministic in ``seed``: sinks,
biases and norm weights are randomised too (ones/zeros would hide mistakes in
parity tests) and scaled so activations stay O(1).

Differences from the real checkpoints that matter:
  * The tokenizer is a byte-level BPE trained on a built-in paragraph (ids fit
    ``vocab_size``), special tokens at ids 0..8 instead of 199998+.
  * MXFP4 needs every expert input dim to be a multiple of 32, so the MXFP4
    variant uses ``intermediate_size`` 96 unless overridden (48 cannot be
    stored; 96 keeps the expert matrices non-square).
"""

from __future__ import annotations

import dataclasses
import json
import math
import pathlib

import torch
from safetensors.torch import save_file

from gptoss_model.checkpoint import mxfp4 as _mx  # aliased: `mxfp4` is also a keyword argument below
from gptoss_model.checkpoint import name_map as nm
from gptoss_model.model.config import GptOssModelConfig

__all__ = [
    "TINY_HF_CONFIG",
    "TINY_MXFP4_INTERMEDIATE_SIZE",
    "MXFP4_MODULES_TO_NOT_CONVERT",
    "SPECIAL_TOKENS",
    "CHAT_TEMPLATE",
    "write_tiny_checkpoint",
    "hf_tensor_names",
    "build_tokenizer",
    "num_params",
]

# The single source of the tiny sizes; the model's ``tiny`` preset mirrors it.
# Field names are transformers 5.x GptOssConfig's (``rope_parameters`` carries
# rope_theta; the real repo's legacy ``rope_scaling``/``rope_theta`` are
# converted to this by transformers on load).
TINY_HF_CONFIG: dict = {
    "hidden_size": 64,
    "intermediate_size": 48,  # non-square on purpose: catches transposed experts
    "num_hidden_layers": 4,
    "num_local_experts": 8,
    "num_experts_per_tok": 4,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "head_dim": 16,
    "vocab_size": 512,
    "sliding_window": 8,
    "layer_types": ["sliding_attention", "full_attention"] * 2,
    "rope_parameters": {
        "rope_type": "yarn",
        "factor": 32.0,
        "original_max_position_embeddings": 32,
        "beta_fast": 32.0,
        "beta_slow": 1.0,
        "truncate": False,
        "rope_theta": 150000.0,
    },
    "max_position_embeddings": 1024,  # original 32 x yarn factor 32, as in the real models
    "swiglu_limit": 7.0,
    "rms_norm_eps": 1e-5,
    "attention_bias": True,
    "tie_word_embeddings": False,
}

TINY_MXFP4_INTERMEDIATE_SIZE = 96

# As in openai/gpt-oss-20b's config.json: only the experts are MXFP4.
MXFP4_MODULES_TO_NOT_CONVERT = [
    "model.layers.*.self_attn",
    "model.layers.*.mlp.router",
    "model.embed_tokens",
    "lm_head",
]

# Harmony's special tokens (subset); order = token id.
SPECIAL_TOKENS = [
    "<|endoftext|>",
    "<|startoftext|>",
    "<|start|>",
    "<|end|>",
    "<|message|>",
    "<|channel|>",
    "<|return|>",
    "<|call|>",
    "<|constrain|>",
]
EOS_TOKEN = PAD_TOKEN = "<|endoftext|>"
BOS_TOKEN = "<|startoftext|>"

# Harmony-shaped: earlier assistant turns close with <|end|>, the last one
# with <|return|> (as openai's template renders training conversations).
CHAT_TEMPLATE = (
    "{%- for message in messages -%}"
    "{%- if message['role'] == 'assistant' -%}"
    "<|start|>assistant<|channel|>final<|message|>{{ message['content'] }}"
    "{{- '<|return|>' if loop.last else '<|end|>' -}}"
    "{%- else -%}"
    "<|start|>{{ message['role'] }}<|message|>{{ message['content'] }}<|end|>"
    "{%- endif -%}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}<|start|>assistant{%- endif -%}"
)

_TRAIN_TEXT = """\
The quick brown fox jumps over the lazy dog. A tiny model learns the shape of
language from a handful of sentences, and a tokenizer learns which letters
like to travel together. Paris is the capital of France; Berlin is the
capital of Germany; Rome is the capital of Italy. Numbers such as 0 1 2 3 4 5
6 7 8 9 10 100 1000 appear in text, as do questions: what is the answer? The
user asks and the assistant answers. Mixture of experts models route every
token to a few experts, and attention with sinks lets a head attend to nothing.
Training, fine tuning and evaluation run as flows over versioned artifacts.
"""


def _merged_config(mxfp4_on: bool, overrides: dict) -> dict:
    cfg = json.loads(json.dumps(TINY_HF_CONFIG))  # deep copy
    if mxfp4_on and "intermediate_size" not in overrides:
        cfg["intermediate_size"] = TINY_MXFP4_INTERMEDIATE_SIZE
    cfg.update(overrides)
    if "layer_types" not in overrides:
        cfg["layer_types"] = [
            "sliding_attention" if i % 2 == 0 else "full_attention" for i in range(cfg["num_hidden_layers"])
        ]
    return cfg


def _model_config(config) -> GptOssModelConfig:
    if isinstance(config, GptOssModelConfig):
        return config
    d = dict(config) if isinstance(config, dict) else config.to_dict()
    return GptOssModelConfig.from_hf_config({"model_type": "gpt_oss", **d})


def hf_tensor_names(config, *, mxfp4: bool = False) -> list[str]:
    """Checkpoint tensor names in canonical order (embed, layers, norm, lm_head), from `name_map`.

    ``config`` is a config.json dict, a transformers config or a GptOssModelConfig;
    with ``mxfp4`` the expert weights appear as their ``_blocks``/``_scales`` pairs,
    as in openai/gpt-oss-*.
    """
    return list(nm.expected_stored_shapes(_model_config(config), mxfp4=mxfp4))


def _logical_shapes(cfg: dict) -> dict[str, tuple[tuple[int, ...], str]]:
    """Logical (HF-layout) shape and value family (`name_map.Rule.init`) of every tensor of the
    float checkpoint, in checkpoint order."""
    return {name: (shape, nm.init_of(name)) for name, shape in nm.expected_hf_shapes(_model_config(cfg)).items()}


# std (or range) per value family: O(0.02-0.1) keeps the residual stream sane; sinks
# and router get larger spreads so softmax/top-k are not near-ties everywhere.
_INIT_STD = {"embedding": 0.1, "linear": 0.08, "bias": 0.03, "sink": 0.5, "router": 0.2, "router_bias": 0.1}


def _random_tensor(shape, init: str, gen: torch.Generator) -> torch.Tensor:
    if init == "norm":  # around 1 but never exactly 1
        return 0.75 + 0.5 * torch.rand(shape, generator=gen)
    return torch.randn(shape, generator=gen) * _INIT_STD[init]


def _state_dict(cfg: dict, dtype: torch.dtype, mxfp4_on: bool, seed: int) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    tensors: dict[str, torch.Tensor] = {}
    # Draw order is fixed by the canonical name order, and the MXFP4 variant
    # draws exactly what the float one does, then quantizes the experts.
    for name, (shape, init) in _logical_shapes(cfg).items():
        t = _random_tensor(shape, init, gen)
        if mxfp4_on and nm.is_mxfp4_stored(nm.match_hf(name).rule):
            # File rows are [E, out, in]: transpose of the HF parameter.
            blocks, scales = _mx.quantize(t.transpose(1, 2))
            b, s = _mx.mxfp4_pair_names(name)
            tensors[b], tensors[s] = blocks, scales
        else:
            tensors[name] = t.to(dtype).contiguous()
    return tensors


def build_tokenizer(vocab_size: int = TINY_HF_CONFIG["vocab_size"]):
    """Byte-level BPE (any text encodes) with Harmony special tokens at ids 0..8."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    if vocab_size < 256 + len(SPECIAL_TOKENS):
        raise ValueError(f"vocab_size {vocab_size} too small for a byte-level tokenizer")
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(_TRAIN_TEXT.splitlines(), trainer=trainer)
    assert tok.get_vocab_size() <= vocab_size
    return tok


def _dump(path: pathlib.Path, obj) -> None:
    path.write_text(json.dumps(obj, indent=2, sort_keys=True) + "\n")


def _shard(names: list[str], tensors: dict, num_shards: int) -> list[list[str]]:
    """Contiguous split by bytes, each shard non-empty (HF sharding is contiguous too)."""
    sizes = [tensors[n].numel() * tensors[n].element_size() for n in names]
    total, shards, cur, acc = sum(sizes), [], [], 0
    for i, (n, sz) in enumerate(zip(names, sizes)):
        cur.append(n)
        acc += sz
        left_names, left_shards = len(names) - i - 1, num_shards - len(shards) - 1
        full = acc >= total * (len(shards) + 1) / num_shards
        if left_shards > 0 and (full or left_names == left_shards):
            shards.append(cur)
            cur = []
    shards.append(cur)
    return shards


def write_tiny_checkpoint(
    path,
    *,
    dtype: str = "float32",
    mxfp4: bool = False,
    seed: int = 0,
    num_shards: int = 2,
    **config_overrides,
) -> pathlib.Path:
    """Write a random tiny GPT-OSS HF checkpoint directory and return its path.

    ``dtype`` ("float32"/"bfloat16") is the storage dtype of all float tensors;
    with ``mxfp4=True`` the experts are stored as MXFP4 blocks/scales (uint8)
    and config.json gets the real repo's quantization_config. ``num_shards=1``
    writes a single ``model.safetensors`` without index, as HF does.
    Same arguments -> byte-identical files.
    """
    from transformers import GptOssConfig

    # Validate everything before the first file is written.
    if dtype not in ("float32", "bfloat16"):
        raise ValueError(f"dtype must be 'float32' or 'bfloat16', got {dtype!r}")
    torch_dtype = getattr(torch, dtype)
    # GptOssConfig silently keeps unknown kwargs; a typo must not pass unnoticed.
    known = {f.name for f in dataclasses.fields(GptOssConfig)} - {"dtype", "architectures", "transformers_version"}
    unknown = sorted(set(config_overrides) - known)
    if unknown:
        raise TypeError(f"unknown GptOssConfig field(s): {unknown}")
    cfg = _merged_config(mxfp4, config_overrides)
    if mxfp4 and (cfg["hidden_size"] % 32 or cfg["intermediate_size"] % 32):
        raise ValueError("MXFP4 needs hidden_size and intermediate_size divisible by 32")
    names = hf_tensor_names(cfg, mxfp4=mxfp4)
    if not 1 <= num_shards <= len(names):
        raise ValueError(f"num_shards must be in [1, {len(names)}]")
    tok = build_tokenizer(cfg["vocab_size"])
    ids = {t: tok.token_to_id(t) for t in SPECIAL_TOKENS}
    token_ids = {"eos_token_id": ids[EOS_TOKEN], "pad_token_id": ids[PAD_TOKEN], "bos_token_id": ids[BOS_TOKEN]}
    hf_config = GptOssConfig(**{**token_ids, **cfg})  # strict dataclass: checks the overrides' types
    # What save_pretrained would write (diff against PreTrainedConfig defaults,
    # so no id2label & co.), with every tiny size spelled out explicitly.
    config = {**hf_config.to_diff_dict(), **cfg}
    config.update(architectures=["GptOssForCausalLM"], model_type="gpt_oss", dtype=dtype)
    if mxfp4:
        config["quantization_config"] = {
            "modules_to_not_convert": list(MXFP4_MODULES_TO_NOT_CONVERT),
            "quant_method": "mxfp4",
        }

    out = pathlib.Path(path)
    out.mkdir(parents=True, exist_ok=True)
    _dump(out / "config.json", config)
    _dump(
        out / "generation_config.json",
        {
            "bos_token_id": ids[BOS_TOKEN],
            # as in the real repo: stop on <|return|>, <|endoftext|>, <|call|>
            "eos_token_id": [ids["<|return|>"], ids[EOS_TOKEN], ids["<|call|>"]],
            "pad_token_id": ids[PAD_TOKEN],
        },
    )

    tensors = _state_dict(cfg, torch_dtype, mxfp4, seed)
    assert sorted(names) == sorted(tensors), "name list and generated tensors disagree"
    # Stale shards from an earlier call with other args would confuse loaders.
    for old in out.glob("model*.safetensors*"):
        old.unlink()
    meta = {"format": "pt"}  # fixed metadata: no timestamps, files are reproducible
    if num_shards == 1:
        save_file({n: tensors[n] for n in names}, str(out / "model.safetensors"), metadata=meta)
    else:
        weight_map = {}
        for k, shard in enumerate(_shard(names, tensors, num_shards), start=1):
            fname = f"model-{k:05d}-of-{num_shards:05d}.safetensors"
            save_file({n: tensors[n] for n in shard}, str(out / fname), metadata=meta)
            weight_map.update({n: fname for n in shard})
        total = sum(t.numel() * t.element_size() for t in tensors.values())
        _dump(out / "model.safetensors.index.json", {"metadata": {"total_size": total}, "weight_map": weight_map})

    _write_tokenizer(out, tok, cfg["max_position_embeddings"])
    return out


def _write_tokenizer(out: pathlib.Path, tok, max_len: int) -> None:
    tok.save(str(out / "tokenizer.json"))
    added = {
        str(tok.token_to_id(t)): {
            "content": t, "lstrip": False, "normalized": False, "rstrip": False,
            "single_word": False, "special": True,
        }
        for t in SPECIAL_TOKENS
    }
    special = {"bos_token": BOS_TOKEN, "eos_token": EOS_TOKEN, "pad_token": PAD_TOKEN}
    _dump(
        out / "tokenizer_config.json",
        {
            "added_tokens_decoder": added,
            "clean_up_tokenization_spaces": False,
            "model_input_names": ["input_ids", "attention_mask"],
            "model_max_length": max_len,
            "tokenizer_class": "PreTrainedTokenizerFast",
            **special,
        },
    )
    _dump(out / "special_tokens_map.json", special)
    # The real repo ships the template as chat_template.jinja; so do we.
    (out / "chat_template.jinja").write_text(CHAT_TEMPLATE)


def num_params(cfg: dict) -> int:
    """Parameter count of the logical (dequantized) model, for sanity checks."""
    return sum(math.prod(shape) for shape, _ in _logical_shapes(cfg).values())
