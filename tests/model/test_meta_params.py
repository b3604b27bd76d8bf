"""Meta-device builds of the full models: exact parameter counts, equal to transformers'."""

from __future__ import annotations

import pytest
import torch

from gptoss_model.model import build
from gptoss_model.model.config import gpt_oss_20b, gpt_oss_120b
from gptoss_model.model.parallel import ParallelLayout

pytestmark = pytest.mark.usefixtures("world1")


@pytest.mark.parametrize("make,total", [(gpt_oss_20b, 20_914_757_184), (gpt_oss_120b, 116_829_156_672)])
def test_full_model_parameter_counts_on_meta(make, total):
    from transformers import GptOssConfig, GptOssForCausalLM

    cfg = make()
    with torch.device("meta"):
        model = build.build_gpt_model(cfg, ParallelLayout(), build.BuildOptions(
            params_dtype=torch.bfloat16, perform_initialization=False))
        hf = GptOssForCausalLM(GptOssConfig(**cfg.to_hf_config()))
    assert {p.device.type for p in model.parameters()} == {"meta"}
    counts = build.count_parameters(model, cfg)
    hf_total = sum(p.numel() for p in hf.parameters())
    print(f"\n{cfg.num_layers} layers x {cfg.num_experts} experts: total {counts['total']:,} "
          f"(transformers {hf_total:,}), active {counts['active']:,} "
          f"(= {counts['active'] / 1e9:.3f}B; input embedding excluded, top-{cfg.experts_per_token} experts)")
    assert counts["total"] == total == hf_total
