"""The seed page's recipes (Megatron Bridge's GPT-OSS calls) and tiny CPU ones.

    from gptoss_model.recipes import gpt_oss_20b_pretrain_config
    cfg = gpt_oss_20b_pretrain_config(name="gpt_oss_20b_pretrain", data_paths=["/data/shard_00000_text_document"],
                                      dir="/results/gpt_oss_20b", train_iters=500_000,
                                      global_batch_size=512, seq_length=4096)

Each returns a `RunConfig`; anything can be changed afterwards (`cfg.train.train_iters = 10`,
`apply_overrides(cfg, ["optimizer.lr=1e-4"])`). Defaults are Megatron Bridge's GPT-OSS
recipes: pretrain 20B TP2 PP4 EP4 SP / 120B TP2 PP4 EP16 SP, GBS 512, MBS 1, seq 4096,
LR 3e-4 -> 3e-5 cosine after 2000 warmup iterations, Adam (0.9, 0.95), weight decay
0.1, clip 1.0, manual GC every 100, distributed optimizer; finetune GBS 128, seq
2048, warmup 50, decay to 0, Adam beta2 0.98; LoRA/DoRA LR 1e-4 at 20B TP1 PP1 EP1
and 120B TP1 PP4 EP8; full SFT LR 5e-6 at EP8 (both sizes). LoRA dim 32 alpha 32,
DoRA dim 32 alpha 64, dropout 0, on linear_qkv, linear_proj, linear_fc1, linear_fc2.
"""

from __future__ import annotations

from typing import Callable

from gptoss_model.training.config import (CheckpointConfig, ConfigError, DataConfig, LoggingConfig,
                                          ModelConfig, OptimizerConfig, ParallelismConfig, PeftConfig,
                                          RunConfig, SchedulerConfig, TrainConfig)

PEFT_DEFAULTS = {"lora": {"dim": 32, "alpha": 32.0}, "dora": {"dim": 32, "alpha": 64.0}}
HF_IDS = {"openai/gpt-oss-20b": "gpt_oss_20b", "openai/gpt-oss-120b": "gpt_oss_120b"}
_PRETRAIN_ITERS = 1_168_251  # Megatron Bridge's pretrain default


def _peft(peft: str | None) -> PeftConfig:
    if peft is None:
        return PeftConfig(method=None)
    key = str(peft).lower()
    if key not in PEFT_DEFAULTS:
        raise ConfigError(f"peft={peft!r}: expected 'lora', 'dora' or None")
    return PeftConfig(method=key, **PEFT_DEFAULTS[key])


def _pretrain(preset: str, *, dir, name, data_paths, hf_path, pretrained_checkpoint, tp, pp, ep, sp,
              train_iters, global_batch_size, micro_batch_size, seq_length, lr, min_lr, lr_warmup_iters,
              lr_decay_iters, use_distributed_optimizer, manual_gc_interval, save_interval,
              eval_interval) -> RunConfig:
    return RunConfig(
        name=name, dir=dir or f"results/{name}",
        model=ModelConfig(preset=preset, hf_config=hf_path),
        parallelism=ParallelismConfig(tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp,
                                      expert_model_parallel_size=ep, sequence_parallel=sp,
                                      use_distributed_optimizer=use_distributed_optimizer,
                                      overlap_grad_reduce=use_distributed_optimizer,
                                      overlap_param_gather=use_distributed_optimizer),
        data=DataConfig(kind="pretrain", data_paths=list(data_paths or []), seq_length=seq_length),
        train=TrainConfig(train_iters=train_iters, global_batch_size=global_batch_size,
                          micro_batch_size=micro_batch_size, manual_gc_interval=manual_gc_interval,
                          eval_interval=eval_interval),
        optimizer=OptimizerConfig(lr=lr, min_lr=min_lr, adam_beta2=0.95),
        scheduler=SchedulerConfig(lr_warmup_iters=lr_warmup_iters, lr_decay_iters=lr_decay_iters),
        checkpoint=CheckpointConfig(save_interval=save_interval, pretrained_checkpoint=pretrained_checkpoint),
        logging=LoggingConfig(), peft=PeftConfig(method=None))


def _named(fn: Callable, name: str, doc: str) -> Callable:
    # The module attribute's own name: help(), tracebacks and pickle find it under that name.
    fn.__name__ = fn.__qualname__ = name
    fn.__doc__ = doc
    return fn


def _pretrain_recipe(preset: str, expert_parallelism_default: int, doc: str) -> Callable[..., RunConfig]:
    """The public pretraining recipe of one size: same arguments, that size's name, EP and docstring."""
    def config(name: str = f"{preset}_pretrain", data_paths: list[str] | None = None,
               dir: str | None = None, train_iters: int = _PRETRAIN_ITERS,
               global_batch_size: int = 512, seq_length: int = 4096, *,
               micro_batch_size: int = 1, lr: float = 3e-4, min_lr: float = 3e-5,
               lr_warmup_iters: int = 2000, lr_decay_iters: int | None = None,
               tensor_parallelism: int = 2, pipeline_parallelism: int = 4,
               expert_parallelism: int = expert_parallelism_default, sequence_parallelism: bool = True,
               use_distributed_optimizer: bool = True, manual_gc_interval: int = 100,
               save_interval: int = 500, eval_interval: int = 2000,
               hf_path: str | None = None, pretrained_checkpoint: str | None = None) -> RunConfig:
        return _pretrain(preset, dir=dir, name=name, data_paths=data_paths, hf_path=hf_path,
                         pretrained_checkpoint=pretrained_checkpoint, tp=tensor_parallelism,
                         pp=pipeline_parallelism, ep=expert_parallelism, sp=sequence_parallelism,
                         train_iters=train_iters, global_batch_size=global_batch_size,
                         micro_batch_size=micro_batch_size, seq_length=seq_length, lr=lr, min_lr=min_lr,
                         lr_warmup_iters=lr_warmup_iters, lr_decay_iters=lr_decay_iters,
                         use_distributed_optimizer=use_distributed_optimizer,
                         manual_gc_interval=manual_gc_interval, save_interval=save_interval,
                         eval_interval=eval_interval)
    return _named(config, f"{preset}_pretrain_config", doc)


gpt_oss_20b_pretrain_config = _pretrain_recipe(
    "gpt_oss_20b", 4, "GPT-OSS 20B pretraining: TP2 PP4 EP4 + SP (16 GPUs), GBS 512, seq 4096.")
gpt_oss_120b_pretrain_config = _pretrain_recipe(
    "gpt_oss_120b", 16, "GPT-OSS 120B pretraining: TP2 PP4 EP16 + SP (64 GPUs), GBS 512, seq 4096.")


def _finetune(preset: str, layouts: dict, *, hf_path, name, dir, pretrained_checkpoint, peft, data_paths,
              train_iters, global_batch_size, micro_batch_size, seq_length, finetune_lr, min_lr,
              lr_warmup_iters, tensor_parallelism, pipeline_parallelism, expert_parallelism,
              save_interval, eval_interval) -> RunConfig:
    peft_cfg = _peft(peft)
    tp, pp, ep = layouts[peft_cfg.method is not None]
    tp = tp if tensor_parallelism is None else tensor_parallelism
    pp = pp if pipeline_parallelism is None else pipeline_parallelism
    ep = ep if expert_parallelism is None else expert_parallelism
    if finetune_lr is None:
        finetune_lr = 1e-4 if peft_cfg.method else 5e-6
    return RunConfig(
        name=name, dir=dir or f"results/{name}",
        model=ModelConfig(preset=HF_IDS.get(hf_path, preset), hf_config=hf_path),
        parallelism=ParallelismConfig(tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp,
                                      expert_model_parallel_size=ep, sequence_parallel=tp > 1,
                                      use_distributed_optimizer=True),
        data=DataConfig(kind="sft", data_paths=list(data_paths or []), seq_length=seq_length),
        train=TrainConfig(train_iters=train_iters, global_batch_size=global_batch_size,
                          micro_batch_size=micro_batch_size, manual_gc_interval=100, eval_interval=eval_interval),
        optimizer=OptimizerConfig(lr=finetune_lr, min_lr=min_lr, adam_beta2=0.98),
        scheduler=SchedulerConfig(lr_warmup_iters=lr_warmup_iters),
        checkpoint=CheckpointConfig(save_interval=save_interval, pretrained_checkpoint=pretrained_checkpoint),
        logging=LoggingConfig(), peft=peft_cfg)


def _finetune_recipe(preset: str, layouts: dict, doc: str) -> Callable[..., RunConfig]:
    """The public finetuning recipe of one size: same arguments, that size's Hub id, name, layouts
    ({peft?: (tp, pp, ep)}) and docstring."""
    size = preset.removeprefix("gpt_oss_")

    def config(hf_path: str = f"openai/gpt-oss-{size}", name: str = f"{preset}_finetune",
               pretrained_checkpoint: str | None = None, peft: str | None = "lora",
               train_iters: int = 1000, global_batch_size: int = 128,
               finetune_lr: float | None = None, *, dir: str | None = None,
               data_paths: list[str] | None = None, micro_batch_size: int = 1,
               seq_length: int = 2048, min_lr: float = 0.0, lr_warmup_iters: int = 50,
               tensor_parallelism: int | None = None, pipeline_parallelism: int | None = None,
               expert_parallelism: int | None = None, save_interval: int = 100,
               eval_interval: int = 100) -> RunConfig:
        return _finetune(preset, layouts, hf_path=hf_path, name=name, dir=dir,
                         pretrained_checkpoint=pretrained_checkpoint, peft=peft, data_paths=data_paths,
                         train_iters=train_iters, global_batch_size=global_batch_size,
                         micro_batch_size=micro_batch_size, seq_length=seq_length, finetune_lr=finetune_lr,
                         min_lr=min_lr, lr_warmup_iters=lr_warmup_iters, tensor_parallelism=tensor_parallelism,
                         pipeline_parallelism=pipeline_parallelism, expert_parallelism=expert_parallelism,
                         save_interval=save_interval, eval_interval=eval_interval)
    return _named(config, f"{preset}_finetune_config", doc)


gpt_oss_20b_finetune_config = _finetune_recipe(
    "gpt_oss_20b", {True: (1, 1, 1), False: (1, 1, 8)},
    "GPT-OSS 20B finetuning: LoRA/DoRA at TP1 PP1 EP1 (LR 1e-4), full SFT at EP8 (LR 5e-6).")
gpt_oss_120b_finetune_config = _finetune_recipe(
    "gpt_oss_120b", {True: (1, 4, 8), False: (1, 1, 8)},
    "GPT-OSS 120B finetuning: LoRA/DoRA at TP1 PP4 EP8 (LR 1e-4), full SFT at TP1 PP1 EP8 (LR 5e-6).")


# ------------------------------------------------------------------ CPU sizes
def tiny_pretrain_config(name: str = "tiny_pretrain", data_paths: list[str] | None = None,
                         dir: str | None = None, train_iters: int = 30, global_batch_size: int = 8,
                         seq_length: int = 64, *, micro_batch_size: int = 2, hf_path: str | None = None,
                         pretrained_checkpoint: str | None = None, tensor_parallelism: int = 1,
                         pipeline_parallelism: int = 1, expert_parallelism: int = 1,
                         lr: float = 3e-3, min_lr: float = 3e-4, lr_warmup_iters: int = 3,
                         save_interval: int = 10, eval_interval: int = 10) -> RunConfig:
    """The tiny GPT-OSS (4 layers, hidden 64, 8 experts) on CPU: tests, the demo, the benchmark."""
    cfg = _pretrain("tiny", dir=dir, name=name, data_paths=data_paths, hf_path=hf_path,
                    pretrained_checkpoint=pretrained_checkpoint, tp=tensor_parallelism,
                    pp=pipeline_parallelism, ep=expert_parallelism, sp=tensor_parallelism > 1,
                    train_iters=train_iters, global_batch_size=global_batch_size,
                    micro_batch_size=micro_batch_size, seq_length=seq_length, lr=lr, min_lr=min_lr,
                    lr_warmup_iters=lr_warmup_iters, lr_decay_iters=None, use_distributed_optimizer=False,
                    manual_gc_interval=10, save_interval=save_interval, eval_interval=eval_interval)
    cfg.data.eod_token_id = 0  # the tiny tokenizer's <|endoftext|>
    cfg.train.eval_iters = 2
    return cfg


def tiny_finetune_config(name: str = "tiny_finetune", data_paths: list[str] | None = None,
                         dir: str | None = None, peft: str | None = "lora", train_iters: int = 30,
                         global_batch_size: int = 8, seq_length: int = 64, *, micro_batch_size: int = 2,
                         hf_path: str | None = None, pretrained_checkpoint: str | None = None,
                         finetune_lr: float | None = None, tensor_parallelism: int = 1,
                         pipeline_parallelism: int = 1, expert_parallelism: int = 1,
                         save_interval: int = 10, eval_interval: int = 10) -> RunConfig:
    """Tiny LoRA/DoRA/full SFT on the packed SFT format, on CPU."""
    cfg = _finetune("tiny", {True: (1, 1, 1), False: (1, 1, 1)}, hf_path=hf_path, name=name, dir=dir,
                    pretrained_checkpoint=pretrained_checkpoint, peft=peft, data_paths=data_paths,
                    train_iters=train_iters, global_batch_size=global_batch_size,
                    micro_batch_size=micro_batch_size, seq_length=seq_length,
                    finetune_lr=finetune_lr if finetune_lr is not None else (3e-3 if peft else 1e-3),
                    min_lr=0.0, lr_warmup_iters=3, tensor_parallelism=tensor_parallelism,
                    pipeline_parallelism=pipeline_parallelism, expert_parallelism=expert_parallelism,
                    save_interval=save_interval, eval_interval=eval_interval)
    cfg.parallelism.use_distributed_optimizer = False
    cfg.train.manual_gc_interval = 10
    cfg.train.eval_iters = 2
    cfg.data.eod_token_id = 0
    return cfg


RECIPES: dict[str, Callable[..., RunConfig]] = {
    "gpt_oss_20b_pretrain": gpt_oss_20b_pretrain_config,
    "gpt_oss_120b_pretrain": gpt_oss_120b_pretrain_config,
    "gpt_oss_20b_finetune": gpt_oss_20b_finetune_config,
    "gpt_oss_120b_finetune": gpt_oss_120b_finetune_config,
    "tiny_pretrain": tiny_pretrain_config,
    "tiny_finetune": tiny_finetune_config,
}


def recipe(name: str, **kwargs) -> RunConfig:
    """A recipe by name (`gpt_oss_20b_pretrain`, `tiny_finetune`, ...), with its keyword arguments."""
    key = name.removesuffix("_config")
    if key not in RECIPES:
        raise ConfigError(f"unknown recipe {name!r}; known: {sorted(RECIPES)}")
    return RECIPES[key](**kwargs)
