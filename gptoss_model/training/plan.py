"""Plan a run for a GPU cluster from any machine: per-rank memory and the parallel layout.

    gptoss train plan gpt_oss_20b_pretrain --gpus 16 --device h100

The recipe's own settings (bf16 unless float32 is asked for, its optimizer, the
distributed optimizer, TP/PP/EP/SP, micro-batch and sequence length) with flash
attention, as the run would have them on the target GPUs; the same rules the
pre-flight applies before a launch, without looking at this machine's devices or
the run's input files.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

from gptoss_model.training.config import ConfigError, RunConfig
from gptoss_model.training.gpus import GPUS, GpuSpec
from gptoss_model.training.preflight import GiB, MemoryEstimate, model_config, preflight


@dataclass
class Plan:
    run: RunConfig
    gpus: int
    device: GpuSpec
    estimate: MemoryEstimate

    def layout_rows(self) -> list[tuple[str, str]]:
        par, tr = self.run.parallelism, self.run.train
        tp, pp, ep = (par.tensor_model_parallel_size, par.pipeline_model_parallel_size,
                      par.expert_model_parallel_size)
        cp, etp = par.context_parallel_size, par.expert_tensor_parallel_size
        m = model_config(self.run)
        dp = self.gpus // (tp * pp * cp)
        nodes = -(-self.gpus // self.device.per_node)
        return [
            ("GPUs", f"{self.gpus} ({nodes} node{'s' if nodes > 1 else ''} x {min(self.gpus, self.device.per_node)} "
                     f"{self.device.name})"),
            ("tensor parallel (TP)", f"{tp}{' + sequence parallel' if par.sequence_parallel else ''}"),
            ("pipeline parallel (PP)", f"{pp} ({m.num_layers // pp} layers a stage)"),
            ("expert parallel (EP) x expert TP", f"{ep} x {etp} ({m.num_experts // ep} of {m.num_experts} "
                                                 "experts a rank)"),
            ("context parallel (CP)", str(cp)),
            ("data parallel (DP) / expert DP", f"{dp} / {self.gpus // (etp * ep * pp)}"),
            ("micro-batches a step", f"{tr.global_batch_size // (tr.micro_batch_size * dp)} of "
                                     f"{tr.micro_batch_size} x {self.run.data.seq_length} tokens"),
            ("optimizer", f"{self.run.optimizer.optimizer}"
                          f"{', distributed' if par.use_distributed_optimizer else ''}"),
        ]

    def memory_rows(self) -> list[tuple[str, str]]:
        e, cap = self.estimate, self.device.memory_bytes
        return [("parameters", _gib(e.params)), ("gradients (fp32)", _gib(e.grads)),
                ("optimizer state", _gib(e.optimizer)), ("activations (flash attention)", _gib(e.activations)),
                ("total per rank", f"{_gib(e.total)} of {cap / GiB:.1f} GiB ({e.total / cap:.0%})"),
                ("parameters on the busiest rank", f"{e.params_per_rank:,} ({e.trainable_params:,} trainable)")]

    def table(self) -> str:
        rows = [("", "")] + self.layout_rows() + [("", "")] + self.memory_rows()
        width = max(len(k) for k, _ in rows)
        lines = [f"{self.run.name} on {self.gpus} x {self.device.name}"]
        lines += [f"  {k:<{width}}  {v}" if k else "" for k, v in rows]
        return "\n".join(lines)


def _gib(n: float) -> str:
    return f"{n / GiB:.2f} GiB"


def plan(run: RunConfig, gpus: int, device: str) -> Plan:
    """The memory estimate and layout of `run` on `gpus` GPUs of kind `device`; ConfigError
    (every problem, naming the field) when the layout does not fit that world or memory."""
    if device not in GPUS:
        raise ConfigError(f"--device {device!r}: expected one of {sorted(GPUS)}")
    if gpus < 1:
        raise ConfigError(f"--gpus {gpus}: must be >= 1")
    spec = GPUS[device]
    # Inputs are not part of a plan; stand-ins satisfy the rules that only ask for their presence.
    run = copy.deepcopy(run)
    run.data.data_paths = run.data.data_paths or ["(input dataset)"]
    run.checkpoint.pretrained_checkpoint = run.checkpoint.pretrained_checkpoint or "(base checkpoint)"
    estimate = preflight(run, gpus, check_inputs=False, device=spec)
    return Plan(run, gpus, spec, estimate)
