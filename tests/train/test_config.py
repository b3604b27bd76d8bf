"""Recipes (the seed's calls and defaults), the config tree (YAML, overrides) and pre-flight."""
from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from gptoss_model.recipes import (RECIPES, gpt_oss_20b_finetune_config, gpt_oss_20b_pretrain_config,
                                  gpt_oss_120b_finetune_config, gpt_oss_120b_pretrain_config)
from gptoss_model.training.config import (ConfigError, RunConfig, apply_overrides, from_dict, load_yaml,
                                          to_yaml)
from gptoss_model.training.preflight import estimate_memory, parameter_counts, preflight

CONFIGS = Path(__file__).resolve().parents[2] / "configs"


def _layout(c: RunConfig):
    p = c.parallelism
    return (p.tensor_model_parallel_size, p.pipeline_model_parallel_size, p.expert_model_parallel_size)


def test_seed_page_calls_run_as_written():
    """The seed page's snippets, with only the import path changed."""
    pre = gpt_oss_20b_pretrain_config(name="gpt_oss_20b_pretrain", data_paths=["/path/to/dataset.nvjsonl"],
                                      dir="/results/gpt_oss_20b", train_iters=500_000, global_batch_size=512,
                                      seq_length=4096)
    assert pre.train.train_iters == 500_000 and pre.data.data_paths == ["/path/to/dataset.nvjsonl"]
    assert pre.dir == "/results/gpt_oss_20b" and pre.name == "gpt_oss_20b_pretrain"
    pre120 = gpt_oss_120b_pretrain_config(name="gpt_oss_120b_pretrain", data_paths=["/d"], dir="/r",
                                          train_iters=500_000, global_batch_size=512, seq_length=4096)
    assert _layout(pre120) == (2, 4, 16)
    lora = gpt_oss_20b_finetune_config(hf_path="openai/gpt-oss-20b", name="gpt_oss_20b_lora_finetune",
                                       pretrained_checkpoint="path/to/gpt_oss/checkpoint", peft="lora",
                                       train_iters=1000, global_batch_size=128, finetune_lr=1e-4)
    assert lora.peft.method == "lora" and lora.checkpoint.pretrained_checkpoint == "path/to/gpt_oss/checkpoint"
    dora = gpt_oss_20b_finetune_config(hf_path="openai/gpt-oss-20b", name="n", pretrained_checkpoint="p",
                                       peft="dora", train_iters=1000, global_batch_size=128, finetune_lr=1e-4)
    assert dora.peft.method == "dora"
    sft = gpt_oss_20b_finetune_config(hf_path="openai/gpt-oss-20b", name="n", pretrained_checkpoint="p",
                                      peft=None, train_iters=1000, global_batch_size=128, finetune_lr=5e-6)
    assert sft.peft.method is None and sft.optimizer.lr == 5e-6
    big = gpt_oss_120b_finetune_config(hf_path="openai/gpt-oss-120b", name="n", pretrained_checkpoint="p",
                                       peft="lora", train_iters=1000, global_batch_size=128, finetune_lr=1e-4)
    assert big.model.preset == "gpt_oss_120b"


def test_every_seed_default_of_the_facts_note():
    for fn, preset, layout in ((gpt_oss_20b_pretrain_config, "gpt_oss_20b", (2, 4, 4)),
                               (gpt_oss_120b_pretrain_config, "gpt_oss_120b", (2, 4, 16))):
        c = fn()
        assert c.model.preset == preset and _layout(c) == layout and c.parallelism.sequence_parallel
        assert (c.train.global_batch_size, c.train.micro_batch_size, c.data.seq_length) == (512, 1, 4096)
        assert (c.optimizer.lr, c.optimizer.min_lr, c.scheduler.lr_warmup_iters) == (3e-4, 3e-5, 2000)
        assert c.scheduler.lr_decay_style == "cosine" and c.train.manual_gc_interval == 100
        assert (c.optimizer.adam_beta1, c.optimizer.adam_beta2, c.optimizer.adam_eps) == (0.9, 0.95, 1e-8)
        assert (c.optimizer.weight_decay, c.optimizer.clip_grad) == (0.1, 1.0)
        assert c.parallelism.use_distributed_optimizer and c.parallelism.overlap_grad_reduce
        assert c.parallelism.overlap_param_gather and c.data.kind == "pretrain"
    cases = [  # (fn, peft, layout, lr)
        (gpt_oss_20b_finetune_config, "lora", (1, 1, 1), 1e-4),
        (gpt_oss_20b_finetune_config, "dora", (1, 1, 1), 1e-4),
        (gpt_oss_20b_finetune_config, None, (1, 1, 8), 5e-6),
        (gpt_oss_120b_finetune_config, "lora", (1, 4, 8), 1e-4),
        (gpt_oss_120b_finetune_config, "dora", (1, 4, 8), 1e-4),
        (gpt_oss_120b_finetune_config, None, (1, 1, 8), 5e-6),
    ]
    for fn, peft, layout, lr in cases:
        c = fn(peft=peft)
        assert _layout(c) == layout, (fn.__name__, peft)
        assert c.optimizer.lr == lr and c.optimizer.min_lr == 0.0 and c.scheduler.lr_warmup_iters == 50
        assert (c.train.global_batch_size, c.train.micro_batch_size, c.data.seq_length) == (128, 1, 2048)
        assert c.optimizer.adam_beta2 == 0.98 and c.optimizer.adam_eps == 1e-8
        assert (c.optimizer.weight_decay, c.optimizer.clip_grad) == (0.1, 1.0)
        assert c.train.train_iters == 1000 and c.data.kind == "sft"
        if peft:
            assert c.peft.method == peft and c.peft.dim == 32 and c.peft.dropout == 0.0
            assert c.peft.alpha == (32.0 if peft == "lora" else 64.0)
            assert c.peft.target_modules == ["linear_qkv", "linear_proj", "linear_fc1", "linear_fc2"]
        else:
            assert c.peft.method is None


# Pipeline run files (demo.yaml: one section per stage, starting with download) are not run configs.
RUN_CONFIGS = [p for p in sorted(CONFIGS.glob("*.yaml")) if "download" not in yaml.safe_load(p.read_text())]


def test_configs_dir_holds_run_configs():
    assert len(RUN_CONFIGS) >= 6  # every seed recipe and the tiny ones


@pytest.mark.parametrize("path", RUN_CONFIGS, ids=lambda p: p.name)
def test_config_yaml_round_trips(path):
    cfg = load_yaml(path)
    assert from_dict(yaml.safe_load(to_yaml(cfg))) == cfg
    recipe = path.stem
    if recipe in RECIPES:  # configs/<recipe>.yaml is that recipe's defaults, kept in sync
        assert cfg == RECIPES[recipe](), f"{path} differs from recipe {recipe}()"


def test_overrides_from_cli_yaml_and_dict():
    c = gpt_oss_20b_finetune_config()
    c2 = apply_overrides(c, ["optimizer.lr=2e-5", "data.data_paths=[a, b]", "peft.method=null",
                             "parallelism.sequence_parallel=true", "train.train_iters=7"])
    assert (c2.optimizer.lr, c2.data.data_paths, c2.peft.method, c2.train.train_iters) == (2e-5, ["a", "b"], None, 7)
    c3 = apply_overrides(c, {"optimizer": {"lr": 3e-5}, "train.global_batch_size": 64})
    assert c3.optimizer.lr == 3e-5 and c3.train.global_batch_size == 64 and c.optimizer.lr == 1e-4
    with pytest.raises(ConfigError, match=r"optimizer\.lrr: unknown key 'lrr' in optimizer"):
        apply_overrides(c, ["optimizer.lrr=1"])
    with pytest.raises(ConfigError, match=r"train\.train_iters: expected an integer, got 'ten'"):
        apply_overrides(c, ["train.train_iters=ten"])
    with pytest.raises(ConfigError, match=r"override train: is a section"):
        apply_overrides(c, ["train=3"])
    with pytest.raises(ConfigError, match=r"unknown key optimiser"):
        from_dict({"optimiser": {}})


def test_yaml_errors_name_the_file(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("train:\n  train_iters: [1, 2]\n")
    with pytest.raises(ConfigError, match=rf"{bad}: train.train_iters: expected an integer"):
        load_yaml(bad)


def _tiny(**kw):
    from gptoss_model.recipes import tiny_pretrain_config

    c = tiny_pretrain_config(data_paths=["/data/shard"], **kw)
    c.logging.memory_check = False
    return c


BAD = [  # (override, world size, the field the message must name)
    (["parallelism.tensor_model_parallel_size=4", "parallelism.sequence_parallel=true"], 4,
     "parallelism.tensor_model_parallel_size"),
    (["parallelism.tensor_model_parallel_size=2"], 2, "parallelism.sequence_parallel"),
    (["parallelism.expert_model_parallel_size=3"], 3, "parallelism.expert_model_parallel_size"),
    (["parallelism.pipeline_model_parallel_size=3"], 3, "parallelism.pipeline_model_parallel_size"),
    (["parallelism.expert_tensor_parallel_size=2"], 2, "parallelism.expert_tensor_parallel_size"),
    (["parallelism.sequence_parallel=true"], 1, "parallelism.sequence_parallel"),
    (["train.global_batch_size=6"], 4, "train.global_batch_size"),
    (["data.seq_length=4096"], 1, "data.seq_length"),
    (["data.data_paths=[]"], 1, "data.data_paths"),
    (["data.blend_weights=[1.0]", "data.data_paths=[a, b]"], 1, "data.blend_weights"),
    (["optimizer.min_lr=1.0"], 1, "optimizer.min_lr"),
    (["scheduler.lr_warmup_iters=30"], 1, "scheduler.lr_warmup_iters"),
    (["peft.method=lora", "peft.target_modules=[linear_qkv, q_proj]"], 1, "peft.target_modules"),
    (["peft.method=lora", "checkpoint.pretrained_checkpoint=null"], 1, "checkpoint.pretrained_checkpoint"),
    (["model.params_dtype=bfloat16"], 1, "model.params_dtype"),  # CPU: no bf16 training
    (["data.split=90,10"], 1, "data.split"),
    (["model.preset=gpt_oss_7b"], 1, "model.preset"),
    (["parallelism.overlap_param_gather=true"], 1, "parallelism.overlap_param_gather"),
]


@pytest.mark.parametrize("overrides,world,field", BAD, ids=[b[2] + ":" + b[0][0] for b in BAD])
def test_preflight_refuses_bad_configs_naming_the_field(overrides, world, field):
    c = apply_overrides(_tiny(pretrained_checkpoint="/ckpt"), overrides)
    with pytest.raises(ConfigError) as e:
        preflight(c, world, check_inputs=False)
    assert field in str(e.value), str(e.value)
    print(f"\n{overrides} (world {world}) -> {e.value}")


@pytest.mark.parametrize("section,key,value", [("scheduler", "lr_decay_style", "exp"), ("peft", "method", "qlora")])
def test_preflight_refuses_a_bad_choice_set_in_python(section, key, value):
    # Parsing refuses these (test_bad_choices_fail_at_parse_time); a config changed in Python meets preflight.
    c = _tiny(pretrained_checkpoint="/ckpt")
    setattr(getattr(c, section), key, value)
    with pytest.raises(ConfigError, match=rf"{section}\.{key}: '{value}' is not one of"):
        preflight(c, 1, check_inputs=False)


CHOICES = [  # (field, bad value, the message's list of allowed values)
    ("model.params_dtype", "fp16", "'auto', 'bfloat16', 'float32'"),
    ("model.moe_token_dispatcher_type", "flex", "'alltoall', 'allgather'"),
    ("data.kind", "dpo", "'pretrain', 'sft'"),
    ("optimizer.optimizer", "adamw", "'adam', 'sgd'"),
    ("scheduler.lr_decay_style", "exp", "'cosine', 'linear', 'constant', 'inverse-square-root'"),
    ("peft.method", "qlora", "'lora', 'dora' or null"),
]


@pytest.mark.parametrize("field,value,allowed", CHOICES, ids=[c[0] for c in CHOICES])
def test_bad_choices_fail_at_parse_time(tmp_path, field, value, allowed):
    """An enum-like field outside its values is refused when the config is read, naming both."""
    message = rf"{field}: '{value}' is not one of {allowed}"
    with pytest.raises(ConfigError, match=message):
        apply_overrides(RunConfig(), [f"{field}={value}"])
    section, key = field.split(".")
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump({section: {key: value}}))
    with pytest.raises(ConfigError, match=rf"{path}: {message}"):
        load_yaml(path)
    assert apply_overrides(RunConfig(), {field: getattr(getattr(RunConfig(), section), key)}) == RunConfig()


def test_preflight_accepts_the_recipes_and_prints_a_memory_estimate(monkeypatch, capsys):
    import gptoss_model.training.preflight as pf

    assert parameter_counts(__import__("gptoss_model.model.config", fromlist=["x"]).gpt_oss_20b())["total"] == 20_914_757_184
    assert parameter_counts(__import__("gptoss_model.model.config", fromlist=["x"]).gpt_oss_120b())["total"] == 116_829_156_672
    preflight(_tiny(), 1, check_inputs=False)
    monkeypatch.setattr(pf, "_cuda", lambda: True)  # judge the GPU recipes as on GPUs
    for fn, world in ((gpt_oss_20b_pretrain_config, 16), (gpt_oss_120b_pretrain_config, 64)):
        c = fn(data_paths=["/d"])
        c.logging.memory_check = False
        est = preflight(c, world, check_inputs=False)
        print(f"\n{c.name} at world {world}: {est}")
        assert 0 < est.total < 80 * 1024 ** 3 * 2
    c = gpt_oss_20b_finetune_config(data_paths=["/d"], pretrained_checkpoint="/p", peft="lora")
    c.logging.memory_check = False
    est = preflight(c, 8, check_inputs=False)
    assert est.trainable_params < est.params_per_rank / 50  # adapters are a few % of the model
    print(f"\n20B LoRA: {est}")
    # a 120B full SFT on one 80 GB-class GPU must be refused by the memory check
    big = gpt_oss_120b_finetune_config(data_paths=["/d"], pretrained_checkpoint="/p", peft=None,
                                       expert_parallelism=1)
    monkeypatch.setattr(pf, "device_memory_bytes", lambda n=1: (80e9, "test GPU"))
    with pytest.raises(ConfigError, match="exceeds test GPU"):
        preflight(big, 1, check_inputs=False)
    assert estimate_memory(big, pf.model_config(big), 1).total > 80e9


def test_flops_formula_is_moe_aware():
    from gptoss_model.model.config import gpt_oss_20b
    from gptoss_model.training.metrics import flops_per_token

    m = gpt_oss_20b()
    per_token = flops_per_token(m, 4096)
    active = 3_608_000_000  # active params without the input embedding (the facts note)
    # 6 x active dominates; attention over 4k keys adds the rest (sliding layers only 128 keys)
    assert 6 * active < per_token < 6 * active * 1.3
    total_dense = parameter_counts(m)["total"]
    assert per_token < 6 * total_dense / 4  # far below a dense model's count


def test_an_unknown_recipe_is_refused_naming_it_and_a_missing_yaml_names_the_file(tmp_path):
    from pydantic import ValidationError

    from gptoss_model.train import load_run_config
    from tasks.train import TrainParams

    with pytest.raises(ValidationError, match=r"recipe 'tiny_pretrian': not a recipe \(gpt_oss_20b_pretrain, .*tiny_pretrain"):
        TrainParams(recipe="tiny_pretrian", name="run")
    assert TrainParams(recipe="tiny_pretrain_config", name="run").recipe == "tiny_pretrain_config"
    missing = tmp_path / "no-such-run.yaml"
    assert TrainParams(recipe=str(missing), name="run")  # the file is read where the run runs
    with pytest.raises(ConfigError, match=rf"{missing}: no such run config"):
        load_run_config(str(missing), [])
