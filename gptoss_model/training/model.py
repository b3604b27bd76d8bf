"""This rank's model chunks for training: build, initial weights, adapters, DDP.

Initial weights (`checkpoint.pretrained_checkpoint`) come from a megatron
checkpoint directory (one with `latest_checkpointed_iteration.txt`, e.g. the
convert stage's output, loaded at any layout through dist_checkpointing) or a
Hugging Face directory (loaded tensor by tensor). Without one, megatron's own
initialisation is used (seeded, but layout-dependent: runs meant to be
compared across layouts must start from a checkpoint).
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch

from gptoss_model.model.config import GptOssModelConfig
from gptoss_model.model.parallel import ParallelLayout, unwrap_model
from gptoss_model.training.config import ConfigError, RunConfig

log = logging.getLogger(__name__)


def layout_of(run: RunConfig) -> ParallelLayout:
    p = run.parallelism
    return ParallelLayout(tensor_model_parallel_size=p.tensor_model_parallel_size,
                          pipeline_model_parallel_size=p.pipeline_model_parallel_size,
                          expert_model_parallel_size=p.expert_model_parallel_size,
                          expert_tensor_parallel_size=p.expert_tensor_parallel_size,
                          context_parallel_size=p.context_parallel_size,
                          sequence_parallel=p.sequence_parallel)


def params_dtype(run: RunConfig) -> torch.dtype:
    if run.model.params_dtype == "auto":
        return torch.bfloat16 if torch.cuda.is_available() else torch.float32
    return {"bfloat16": torch.bfloat16, "float32": torch.float32}[run.model.params_dtype]


def build_chunks(run: RunConfig, m: GptOssModelConfig) -> list:
    """Build, load initial weights, add adapters (base frozen), wrap in megatron DDP."""
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig

    from gptoss_model.model.build import BuildOptions, build_gpt_model
    from gptoss_model.model import peft as peft_mod

    dtype = params_dtype(run)
    pretrained = run.checkpoint.pretrained_checkpoint
    opts = BuildOptions(params_dtype=dtype, perform_initialization=pretrained is None,
                        token_dispatcher=run.model.moe_token_dispatcher_type)
    model = build_gpt_model(m, layout_of(run), opts)
    # Loss is summed over tokens and divided by the global token count (finalize_model_grads),
    # so any micro-batching / DP split of a global batch gives the same gradient.
    model.config.calculate_per_token_loss = True
    if pretrained:
        load_initial_weights(model, pretrained, m)
    if run.peft.method:
        peft_mod.apply_adapters(model, run.peft)
    if torch.cuda.is_available():
        model.cuda(torch.cuda.current_device())
    if dtype != torch.float32:
        from megatron.core.transformer.module import Float16Module

        model = Float16Module(model.config, model)
    par = run.parallelism
    ddp_config = DistributedDataParallelConfig(
        grad_reduce_in_fp32=True, overlap_grad_reduce=par.overlap_grad_reduce,
        overlap_param_gather=par.overlap_param_gather, use_distributed_optimizer=par.use_distributed_optimizer,
        average_in_collective=False, check_for_nan_in_grad=False)
    inner = unwrap_model(model)
    return [DistributedDataParallel(config=inner.config, ddp_config=ddp_config, module=model)]


def load_initial_weights(model, source: str | Path, m: GptOssModelConfig) -> None:
    from gptoss_model.checkpoint.layout import TRACKER_FILE, load_megatron_checkpoint
    from gptoss_model.checkpoint.load_hf import load_hf_weights

    source = Path(source)
    if (source / TRACKER_FILE).is_file():
        load_megatron_checkpoint(model, source)
    elif (source / "config.json").is_file():
        load_hf_weights([model], source, m)
    else:
        raise ConfigError(f"checkpoint.pretrained_checkpoint={source}: neither a megatron checkpoint "
                          f"(no {TRACKER_FILE}) nor a Hugging Face checkpoint (no config.json)")
