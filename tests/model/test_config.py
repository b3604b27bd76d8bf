"""GptOssModelConfig: presets, the HF reader/writer, and rejection of other models."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from gptoss_model.model.config import (
    FULL,
    SLIDING,
    GptOssModelConfig,
    NotGptOssConfigError,
    gpt_oss_20b,
    gpt_oss_120b,
    preset,
    tiny,
)

# openai/gpt-oss-20b's config.json (transformers 4.55 layout: rope_theta + rope_scaling).
REAL_20B_CONFIG = {
    "architectures": ["GptOssForCausalLM"], "attention_bias": True, "attention_dropout": 0.0,
    "eos_token_id": 200002, "experts_per_token": 4, "head_dim": 64, "hidden_act": "silu",
    "hidden_size": 2880, "initial_context_length": 4096, "initializer_range": 0.02,
    "intermediate_size": 2880, "layer_types": ["sliding_attention", "full_attention"] * 12,
    "max_position_embeddings": 131072, "model_type": "gpt_oss", "num_attention_heads": 64,
    "num_experts_per_tok": 4, "num_hidden_layers": 24, "num_key_value_heads": 8,
    "num_local_experts": 32, "output_router_logits": False, "pad_token_id": 199999,
    "quantization_config": {"modules_to_not_convert": ["model.layers.*.self_attn", "model.layers.*.mlp.router",
                                                       "model.embed_tokens", "lm_head"], "quant_method": "mxfp4"},
    "rms_norm_eps": 1e-05,
    "rope_scaling": {"beta_fast": 32.0, "beta_slow": 1.0, "factor": 32.0, "original_max_position_embeddings": 4096,
                     "rope_type": "yarn", "truncate": False},
    "rope_theta": 150000, "router_aux_loss_coef": 0.9, "sliding_window": 128, "swiglu_limit": 7.0,
    "tie_word_embeddings": False, "transformers_version": "4.55.0.dev0", "use_cache": True, "vocab_size": 201088,
}

LLAMA_CONFIG = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 4096,
                "intermediate_size": 11008, "num_hidden_layers": 32, "num_attention_heads": 32,
                "num_key_value_heads": 32, "vocab_size": 32000}


def test_presets_are_the_published_models():
    for c, layers, experts in ((gpt_oss_20b(), 24, 32), (gpt_oss_120b(), 36, 128)):
        assert (c.num_layers, c.num_experts, c.experts_per_token) == (layers, experts, 4)
        assert (c.hidden_size, c.intermediate_size, c.num_attention_heads, c.num_key_value_heads,
                c.head_dim, c.vocab_size) == (2880, 2880, 64, 8, 64, 201088)
        assert (c.sliding_window, c.rope_factor, c.rope_theta, c.swiglu_limit) == (128, 32.0, 150000.0, 7.0)
        assert c.layer_types[:2] == (SLIDING, FULL) and len(c.layer_types) == layers
        assert c.attention_bias and not c.tie_word_embeddings and not c.rope_truncate
    assert preset("gpt-oss-20b") == gpt_oss_20b()


def test_real_20b_config_json_reads_as_the_preset():
    assert GptOssModelConfig.from_hf_config(REAL_20B_CONFIG) == gpt_oss_20b()


def test_tiny_preset_has_the_fixture_factory_sizes(tiny_ckpt):
    assert GptOssModelConfig.from_hf_config(tiny_ckpt) == tiny()
    t = tiny()
    assert (t.hidden_size, t.intermediate_size, t.num_layers, t.num_experts, t.experts_per_token,
            t.num_attention_heads, t.num_key_value_heads, t.head_dim, t.vocab_size, t.sliding_window,
            t.rope_original_max_position_embeddings, t.max_position_embeddings) == (
        64, 48, 4, 8, 4, 4, 2, 16, 512, 8, 32, 1024)


@pytest.mark.parametrize("make", [tiny, gpt_oss_20b, gpt_oss_120b])
def test_hf_round_trip_and_transformers_accepts_it(make, tmp_path):
    from transformers import GptOssConfig

    c = make()
    assert GptOssModelConfig.from_hf_config(c.to_hf_config()) == c
    # transformers 5 re-saves it in its own layout (rope_parameters); we read that too.
    GptOssConfig(**c.to_hf_config()).save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "config.json").read_text())
    assert "rope_parameters" in saved
    assert GptOssModelConfig.from_hf_config(tmp_path) == c


def test_non_gpt_oss_config_is_rejected_naming_the_file(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps(LLAMA_CONFIG))
    with pytest.raises(NotGptOssConfigError) as e:
        GptOssModelConfig.from_hf_config(tmp_path)
    msg = str(e.value)
    assert str(tmp_path / "config.json") in msg and "'llama'" in msg and "gpt_oss" in msg


def test_incomplete_or_unsupported_gpt_oss_configs_are_rejected():
    broken = {k: v for k, v in REAL_20B_CONFIG.items() if k != "num_local_experts"}
    with pytest.raises(NotGptOssConfigError, match="num_local_experts"):
        GptOssModelConfig.from_hf_config(broken)
    with pytest.raises(NotGptOssConfigError, match="swiglu_alpha"):
        GptOssModelConfig.from_hf_config({**REAL_20B_CONFIG, "swiglu_alpha": 1.5})
    with pytest.raises(NotGptOssConfigError, match="rope_type"):
        GptOssModelConfig.from_hf_config({**REAL_20B_CONFIG, "rope_scaling": {"rope_type": "linear"}})


def test_unmodelled_keys_survive_for_export():
    c = GptOssModelConfig.from_hf_config(REAL_20B_CONFIG)
    out = c.to_hf_config()
    assert out["quantization_config"]["quant_method"] == "mxfp4"
    assert out["router_aux_loss_coef"] == 0.9 and out["eos_token_id"] == 200002


def test_import_is_light_and_never_prefect():
    code = (
        "import sys, gptoss_model, gptoss_model.model.config\n"
        "assert 'megatron' not in sys.modules, 'import gptoss_model pulled in megatron'\n"
        "from gptoss_model import AutoBridge\n"
        "import gptoss_model.model.build, gptoss_model.checkpoint.load_hf, gptoss_model.checkpoint.name_map, gptoss_model.model.cpu_patches\n"
        "import gptoss_model.model.parallel, gptoss_model.bridge\n"
        "assert not any(m == 'prefect' or m.startswith('prefect.') for m in sys.modules), 'prefect imported'\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)
