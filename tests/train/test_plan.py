"""`gptoss train plan`: the per-rank memory of the seed's GPU recipes, planned from this CPU machine.

The figures are pinned: a change to the estimate (or a recipe default) must show up here and in
the README's table. Known facts they are checked against: Megatron Bridge runs the 20B pretrain
(TP2 PP4 EP4 SP, distributed optimizer, seq 4096) on 16 x 80 GB GPUs, so it must fit an H100;
the seed's 120B LoRA layout (TP1 PP4 EP8) needs a world divisible by EP x PP = 32, which
megatron-core enforces, so 16 GPUs must be refused naming the field.
"""
from __future__ import annotations

import pytest
from typer.testing import CliRunner

from gptoss_model.training.config import ConfigError, apply_overrides
from gptoss_model.training.plan import plan
from gptoss_model.training.preflight import GiB, estimate_memory, model_config
from gptoss_model.training.recipes import recipe

PINNED = [  # (recipe, overrides, GPUs, device, total GiB per rank)
    ("gpt_oss_20b_pretrain", [], 16, "h100", 31.58),
    ("gpt_oss_120b_pretrain", [], 64, "h100", 42.51),
    ("gpt_oss_120b_finetune", [], 32, "h100", 20.54),  # LoRA, the seed's TP1 PP4 EP8 on 4 nodes
    ("gpt_oss_120b_finetune", ["parallelism.expert_model_parallel_size=4"], 16, "h100", 27.97),  # 2 nodes
    ("gpt_oss_20b_finetune", [], 8, "h100", 48.25),  # LoRA on one node, TP1 PP1 EP1
]


@pytest.mark.parametrize("name,overrides,gpus,device,total", PINNED,
                         ids=[f"{p[0]}-{p[2]}" + ("-" + p[1][0].split("=")[0].split(".")[-1] if p[1] else "")
                              for p in PINNED])
def test_seed_recipes_planned_for_gpus_from_a_cpu_machine(name, overrides, gpus, device, total):
    p = plan(apply_overrides(recipe(name), overrides), gpus, device)
    print("\n" + p.table())
    assert round(p.estimate.total / GiB, 2) == total
    assert p.estimate.total < p.device.memory_bytes  # fits the target GPU
    without_flash = estimate_memory(p.run, model_config(p.run), gpus, bf16=True, flash_attention=False)
    assert p.estimate.activations < without_flash.activations  # flash attention: no s^2 score matrices
    assert p.estimate.params == p.estimate.params_per_rank * 2  # bf16 weights on the GPU


def test_the_seed_120b_lora_layout_does_not_fit_16_gpus():
    with pytest.raises(ConfigError, match=r"parallelism\.expert_model_parallel_size: world size 16 not "
                                          r"divisible by ETP\*EP\*PP=32"):
        plan(recipe("gpt_oss_120b_finetune"), 16, "h100")


def test_cli_prints_the_layout_and_memory_table():
    from flows.cli import app

    out = CliRunner().invoke(app, ["train", "plan", "gpt_oss_20b_pretrain", "--gpus", "16", "--device", "h200"])
    assert out.exit_code == 0, out.output
    assert "2 nodes x 8 NVIDIA H200" in out.output and "2 + sequence parallel" in out.output
    assert "31.58 GiB of 140.4 GiB" in out.output
    bad = CliRunner().invoke(app, ["train", "plan", "gpt_oss_20b_pretrain", "--gpus", "12"])
    assert bad.exit_code == 2 and "parallelism.tensor_model_parallel_size" in bad.output
    unknown = CliRunner().invoke(app, ["train", "plan", "gpt_oss_20b_pretrain", "--gpus", "16", "--device", "tpu"])
    assert unknown.exit_code == 2 and "--device 'tpu'" in unknown.output
