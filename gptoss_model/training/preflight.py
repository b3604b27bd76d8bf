"""Pre-flight: refuse a run config before anything launches, naming the field and the rule.

`preflight(run, world_size)` checks everything that can be known without
starting processes: the parallel layout against the model (shared with
`gptoss_model.model.build.layout_problems`, so the builder and this check never
disagree), batch sizes against data parallelism, sequence length against the
model's positions, schedule and optimizer ranges, PEFT settings, precision
against the hardware, and a per-rank memory estimate (parameters, gradients,
optimizer state, activations) against the device. All problems are reported
at once in one `ConfigError`.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import re
from dataclasses import dataclass

from gptoss_model.model.config import GptOssModelConfig, preset
from gptoss_model.training.gpus import GpuSpec
from gptoss_model.training.config import ConfigError, RunConfig, choice_problems

GiB = 1024 ** 3
PEFT_TARGETS = ("linear_qkv", "linear_proj", "linear_fc1", "linear_fc2")
TE_MIN_VERSION = (2, 8)  # learnable softmax (sinks) in TE attention
HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")  # owner/name; anything else is a local path


def model_config(run: RunConfig) -> GptOssModelConfig:
    """The architecture: the HF config when given (a local dir/config.json; a Hub id other than
    openai's, which equal our presets, is fetched), else the named preset."""
    from pathlib import Path

    from gptoss_model.training.recipes import HF_IDS

    source = run.model.hf_config
    if source and Path(source).exists():
        try:
            return GptOssModelConfig.from_hf_config(source)
        except Exception as e:  # noqa: BLE001 - whatever is wrong with it, this field names it
            raise ConfigError(f"model.hf_config: {source}: {e}") from e
    if source and not HUB_ID.match(source):
        raise ConfigError(f"model.hf_config: {source} does not exist (give a local checkpoint dir, its "
                          "config.json, or a Hub id like openai/gpt-oss-20b)")
    if source and source not in HF_IDS:
        from gptoss_model.hub.resolve import resolve_checkpoint

        try:
            return GptOssModelConfig.from_hf_config(resolve_checkpoint(source))
        except Exception as e:  # noqa: BLE001 - a Hub or config error, named by the field
            raise ConfigError(f"model.hf_config: {source}: {type(e).__name__}: {e}") from e
    name = HF_IDS.get(source, run.model.preset)
    try:
        return preset(name)
    except KeyError as e:
        raise ConfigError(f"model.preset: {e.args[0]}") from e


def _cuda() -> bool:
    import torch

    return torch.cuda.is_available()


# ------------------------------------------------------------------- memory
@dataclass
class MemoryEstimate:
    """Bytes per rank (the most loaded pipeline stage)."""

    params: float
    grads: float
    optimizer: float
    activations: float
    trainable_params: int
    params_per_rank: int

    @property
    def total(self) -> float:
        return self.params + self.grads + self.optimizer + self.activations

    def __str__(self) -> str:
        return (f"per-rank memory estimate: {self.total / GiB:.2f} GiB = params {self.params / GiB:.2f} "
                f"+ grads {self.grads / GiB:.2f} + optimizer {self.optimizer / GiB:.2f} "
                f"+ activations {self.activations / GiB:.2f} ({self.params_per_rank:,} params on this rank, "
                f"{self.trainable_params:,} trainable)")


def parameter_counts(m: GptOssModelConfig) -> dict[str, int]:
    """Exact parameter counts of GPT-OSS by part (matches the built model)."""
    h, hd, i = m.hidden_size, m.head_dim, m.intermediate_size
    qkv_out = (m.num_attention_heads + 2 * m.num_key_value_heads) * hd
    attention = h * qkv_out + qkv_out + m.num_attention_heads * hd * h + h + m.num_attention_heads
    per_expert = (2 * i * h + 2 * i) + (i * h + h)
    router = m.num_experts * h + m.num_experts
    return {"embedding": m.vocab_size * h, "lm_head": m.vocab_size * h, "final_norm": h,
            "layer_dense": attention + router + 2 * h, "expert": per_expert,
            "total": 2 * m.vocab_size * h + h + m.num_layers * (attention + router + 2 * h
                                                                 + m.num_experts * per_expert)}


def adapter_params_per_layer(m: GptOssModelConfig, dim: int, targets: list[str], dora: bool) -> int:
    """LoRA A (dim x in) + B (out x dim) per targeted linear, experts included (+ DoRA magnitude)."""
    h, hd, i = m.hidden_size, m.head_dim, m.intermediate_size
    shapes = {"linear_qkv": [(h, (m.num_attention_heads + 2 * m.num_key_value_heads) * hd)],
              "linear_proj": [(m.num_attention_heads * hd, h)],
              "linear_fc1": [(h, 2 * i)] * m.num_experts,
              "linear_fc2": [(i, h)] * m.num_experts}
    return sum(dim * (fan_in + fan_out) + (fan_out if dora else 0)
               for t in targets for fan_in, fan_out in shapes[t])


def estimate_memory(run: RunConfig, m: GptOssModelConfig, world_size: int, *, bf16: bool | None = None,
                    flash_attention: bool | None = None) -> MemoryEstimate:
    """Per-rank bytes; `bf16` / `flash_attention` default to what this machine would run."""
    par, tr = run.parallelism, run.train
    tp, pp, ep = (par.tensor_model_parallel_size, par.pipeline_model_parallel_size,
                  par.expert_model_parallel_size)
    dp = max(world_size // (tp * pp), 1)
    expert_dp = max(world_size // (ep * pp), 1)
    c = parameter_counts(m)
    layers = m.num_layers // pp
    dense = (c["embedding"] + (c["lm_head"] if pp == 1 else 0)) // tp + layers * c["layer_dense"] // tp
    experts = layers * (m.num_experts // ep) * c["expert"]
    bf16 = _bf16(run) if bf16 is None else bf16
    p_bytes = 2 if bf16 else 4
    if run.peft.method:
        trainable = layers * adapter_params_per_layer(m, run.peft.dim, run.peft.target_modules,
                                                      run.peft.method == "dora") // max(tp, 1)
        trainable_dense, trainable_expert = trainable, 0
    else:
        trainable, trainable_dense, trainable_expert = dense + experts, dense, experts
    opt_per_param = 12 if bf16 else 8  # fp32 main copy (bf16 only) + Adam's two fp32 moments
    shard = (lambda n, g: n / g) if par.use_distributed_optimizer else (lambda n, g: n)
    optimizer = opt_per_param * (shard(trainable_dense, dp) + shard(trainable_expert, expert_dp))
    # Activations kept for backward per micro-batch and layer (bytes at p_bytes per element):
    # attention ~ s*b*h*11 + scores 5*a*s^2*b (only without Transformer Engine's flash
    # attention), MoE MLP ~ s*b*(2h + topk * 5 * intermediate); SP divides all by TP.
    # 1F1B keeps up to PP micro-batches in flight on the first stage.
    s, b = run.data.seq_length, tr.micro_batch_size
    if flash_attention is None:
        from gptoss_model.model.build import te_available

        flash_attention = te_available()
    scores = 0 if flash_attention else 5 * m.num_attention_heads * s * s * b
    per_layer = (s * b * m.hidden_size * 13 + scores
                 + s * b * m.experts_per_token * 5 * m.intermediate_size) * p_bytes / 2
    in_flight = min(pp, max(tr.global_batch_size // max(tr.micro_batch_size * dp, 1), 1))
    logits = s * b * m.vocab_size // tp * 4 * 2  # fp32 logits + their grad on the last stage
    activations = per_layer / tp * layers * in_flight + logits
    return MemoryEstimate(params=(dense + experts) * p_bytes, grads=trainable * 4, optimizer=optimizer,
                          activations=activations, trainable_params=int(trainable),
                          params_per_rank=int(dense + experts))


def _bf16(run: RunConfig) -> bool:
    if run.model.params_dtype == "auto":
        return _cuda()
    return run.model.params_dtype == "bfloat16"


def device_memory_bytes(local_world_size: int = 1) -> tuple[float, str]:
    if _cuda():
        import torch

        return float(torch.cuda.get_device_properties(0).total_memory), torch.cuda.get_device_name(0)
    import psutil

    return psutil.virtual_memory().available / max(local_world_size, 1), "CPU RAM available per local rank"


# ------------------------------------------------------------------- checks
def preflight(run: RunConfig, world_size: int, *, local_world_size: int | None = None,
              model: GptOssModelConfig | None = None, check_inputs: bool = True,
              device: "GpuSpec | None" = None) -> MemoryEstimate:
    """Every rule the config breaks, as one ConfigError; else the memory estimate.

    `check_inputs` also opens what the run will read and probes where it writes
    (input_checks); planning a run for another machine leaves it off and names the target
    `device` (a GPU: bf16 unless float32 is asked for, flash attention, its memory)."""
    from gptoss_model.model.build import layout_problems
    from gptoss_model.model.parallel import ParallelLayout

    problems: list[str] = []

    def need(ok: bool, field: str, rule: str) -> None:
        if not ok:
            problems.append(f"{field}: {rule}")

    m = model or model_config(run)
    par, tr, data, opt, sch, peft = (run.parallelism, run.train, run.data, run.optimizer, run.scheduler,
                                     run.peft)
    layout = ParallelLayout(
        tensor_model_parallel_size=par.tensor_model_parallel_size,
        pipeline_model_parallel_size=par.pipeline_model_parallel_size,
        expert_model_parallel_size=par.expert_model_parallel_size,
        expert_tensor_parallel_size=par.expert_tensor_parallel_size,
        context_parallel_size=par.context_parallel_size, sequence_parallel=par.sequence_parallel)
    for fld, rule in layout_problems(m, layout, world_size):
        need(False, f"parallelism.{fld}", rule)
    tp, pp = par.tensor_model_parallel_size, par.pipeline_model_parallel_size
    need(not par.sequence_parallel or tp > 1, "parallelism.sequence_parallel",
         "sequence parallel splits the sequence over TP ranks; it needs tensor_model_parallel_size > 1")
    need(not par.overlap_param_gather or par.use_distributed_optimizer, "parallelism.overlap_param_gather",
         "parameter all-gather overlap exists only with use_distributed_optimizer=true")
    for fld, rule in choice_problems(run):  # enum-like fields (Literal types) outside their values
        need(False, fld, rule)
    cuda = _cuda() or device is not None
    bf16 = _bf16(run) if device is None else run.model.params_dtype != "float32"
    need(cuda or not bf16, "model.params_dtype",
         "bfloat16 training needs CUDA; on CPU megatron's optimizer only handles float32 parameters")
    if device is None and cuda and importlib.util.find_spec("transformer_engine") is not None:
        version = tuple(int(x) for x in importlib.metadata.version("transformer-engine").split(".")[:2])
        need(version >= TE_MIN_VERSION, "model",
             f"Transformer Engine {'.'.join(map(str, version))} is too old: GPT-OSS's learnable softmax "
             f"(sinks) needs >= {'.'.join(map(str, TE_MIN_VERSION))}")

    # batches
    mp = tp * pp * par.context_parallel_size
    dp = world_size // mp if mp and world_size % mp == 0 else None
    need(tr.micro_batch_size >= 1, "train.micro_batch_size", "must be >= 1")
    need(tr.global_batch_size >= 1, "train.global_batch_size", "must be >= 1")
    if dp and tr.micro_batch_size >= 1:
        need(tr.global_batch_size % (tr.micro_batch_size * dp) == 0, "train.global_batch_size",
             f"{tr.global_batch_size} must be a multiple of micro_batch_size x data-parallel size = "
             f"{tr.micro_batch_size} x {dp} (world {world_size} / TP*PP*CP {mp})")
    need(tr.train_iters >= 1, "train.train_iters", "must be >= 1")
    need(tr.eval_interval >= 0, "train.eval_interval", "must be >= 0 (0 disables validation)")
    need(tr.eval_interval == 0 or tr.eval_iters >= 1, "train.eval_iters", "must be >= 1 when validating")
    need(tr.manual_gc_interval >= 0, "train.manual_gc_interval", "must be >= 0")
    need(tr.replica_check_interval >= 0, "train.replica_check_interval", "must be >= 0 (0 disables the check)")
    need(tr.hang_timeout >= 0, "train.hang_timeout", "must be >= 0 seconds (0 disables the watchdog)")
    need(tr.collective_timeout_minutes >= 1, "train.collective_timeout_minutes", "must be >= 1")

    # data
    need(bool(data.data_paths), "data.data_paths", "at least one dataset prefix is needed")
    need(data.blend_weights is None or len(data.blend_weights) == len(data.data_paths), "data.blend_weights",
         f"{len(data.blend_weights or [])} weights for {len(data.data_paths)} data_paths")
    need(data.blend_weights is None or all(w > 0 for w in data.blend_weights), "data.blend_weights",
         "weights must be > 0")
    need(2 <= data.seq_length <= m.max_position_embeddings, "data.seq_length",
         f"{data.seq_length} must be in [2, the model's max_position_embeddings={m.max_position_embeddings}]")
    need(not par.sequence_parallel or data.seq_length % max(tp, 1) == 0, "data.seq_length",
         f"{data.seq_length} must be divisible by tensor_model_parallel_size={tp} with sequence parallel")
    need(0 <= data.eod_token_id < m.vocab_size, "data.eod_token_id",
         f"{data.eod_token_id} is outside the vocabulary [0, {m.vocab_size})")
    try:
        parts = [float(x) for x in data.split.split(",")]
        need(len(parts) == 3 and min(parts) >= 0 and parts[0] > 0, "data.split",
             f"{data.split!r}: three non-negative train,valid,test shares with train > 0")
        need(tr.eval_interval == 0 or data.kind == "sft" or parts[1] > 0, "data.split",
             f"{data.split!r} has no validation share but train.eval_interval={tr.eval_interval}")
    except ValueError:
        need(False, "data.split", f"{data.split!r}: expected three comma-separated numbers like 98,2,0")

    # optimizer and schedule
    need(opt.lr > 0, "optimizer.lr", "must be > 0")
    need(0 <= opt.min_lr <= opt.lr, "optimizer.min_lr", f"{opt.min_lr} must be in [0, lr={opt.lr}]")
    need(0 <= opt.adam_beta1 < 1, "optimizer.adam_beta1", "must be in [0, 1)")
    need(0 <= opt.adam_beta2 < 1, "optimizer.adam_beta2", "must be in [0, 1)")
    need(opt.adam_eps > 0, "optimizer.adam_eps", "must be > 0")
    need(opt.weight_decay >= 0, "optimizer.weight_decay", "must be >= 0")
    need(opt.clip_grad >= 0, "optimizer.clip_grad", "must be >= 0 (0 disables clipping)")
    need(opt.bf16 is None or opt.bf16 == bf16, "optimizer.bf16",
         f"{opt.bf16} disagrees with model.params_dtype={run.model.params_dtype}")
    need(0 <= sch.lr_warmup_iters < run.lr_decay_iters() or sch.lr_decay_style == "constant",
         "scheduler.lr_warmup_iters",
         f"{sch.lr_warmup_iters} must be in [0, lr_decay_iters={run.lr_decay_iters()}) "
         "(the recipe's warmup exceeds this run's length: lower it)")

    # checkpoints, peft
    need(run.checkpoint.save_interval >= 0, "checkpoint.save_interval", "must be >= 0 (0: only at the end)")
    if peft.method:
        need(peft.dim >= 1, "peft.dim", "must be >= 1")
        need(peft.alpha > 0, "peft.alpha", "must be > 0")
        need(0 <= peft.dropout < 1, "peft.dropout", "must be in [0, 1)")
        bad = sorted(set(peft.target_modules) - set(PEFT_TARGETS))
        need(not bad and bool(peft.target_modules), "peft.target_modules",
             f"{bad or 'empty'}: choose from {list(PEFT_TARGETS)}")
        need(run.checkpoint.pretrained_checkpoint is not None, "checkpoint.pretrained_checkpoint",
             "LoRA/DoRA adapt pretrained weights: set the base checkpoint")
    if check_inputs:
        from gptoss_model.training import input_checks

        for fld, rule in (input_checks.data_problems(run) + input_checks.pretrained_problems(run, m)
                          + input_checks.resume_problems(run) + input_checks.writable_problems(run)):
            need(False, fld, rule)
    if problems:
        raise ConfigError(f"run config {run.name!r} refused before launch ({len(problems)} problem"
                          f"{'s' if len(problems) > 1 else ''}):\n  - " + "\n  - ".join(problems))

    estimate = estimate_memory(run, m, world_size, bf16=bf16,
                               flash_attention=True if device is not None else None)
    if run.logging.memory_check:
        available, what = ((device.memory_bytes, device.name) if device is not None
                           else device_memory_bytes(local_world_size or min(world_size, 8)))
        if estimate.total > 0.95 * available:
            raise ConfigError(f"train.micro_batch_size / parallelism: {estimate} exceeds {what} "
                              f"({available / GiB:.1f} GiB); raise TP/PP/EP, use the distributed optimizer, "
                              "lower micro_batch_size or seq_length (logging.memory_check=false skips this)")
    return estimate
