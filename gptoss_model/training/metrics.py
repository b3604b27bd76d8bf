"""Per-step metrics to stdout, a JSONL file and TensorBoard (rank 0 only), and the FLOP count.

JSONL record per step: {"iteration", "loss", "lr", "grad_norm", "tokens_per_s",
"tflops_per_s_per_rank", "step_s", "mem_gb", "consumed_samples"}; validation
records carry "val_loss" instead of "loss". The file is appended to, so a
resumed run continues the same file (a step repeated after a crash appears
twice; the last record of an iteration wins).
"""

from __future__ import annotations

import json
import logging
import os
import resource
from pathlib import Path

import torch

from gptoss_model.model.config import GptOssModelConfig

log = logging.getLogger(__name__)


def flops_per_token(m: GptOssModelConfig, seq_length: int, *, peft: bool = False) -> float:
    """Model FLOPs for one training token (forward + backward), MoE-aware.

    Forward, per token (a multiply-add = 2 FLOPs), per layer:
      attention projections  2 * h * (n_q + 2 n_kv) * d  +  2 * n_q * d * h
      attention scores       2 * 2 * n_q * d * k, k = keys the token attends to, averaged
                             over positions of a causal sequence of length S:
                             full layers (S + 1) / 2, sliding layers min(W, (S + 1) / 2)-ish
                             (exactly: mean over i of min(i + 1, W))
      router                 2 * h * E
      experts (top-k only)   topk * (2 * h * 2I + 2 * I * h)
    plus the output layer 2 * h * V (the input embedding is a lookup: 0).
    Backward is twice the forward (grads w.r.t. inputs and weights): training = 3x forward.
    With LoRA/DoRA the frozen weights need no weight gradients: 2x forward (adapters ignored).
    """
    h, d, i = m.hidden_size, m.head_dim, m.intermediate_size
    nq, nkv = m.num_attention_heads, m.num_key_value_heads
    s = seq_length
    full_keys = (s + 1) / 2
    window = m.sliding_window
    win_keys = sum(min(p + 1, window) for p in range(s)) / s
    total = 0.0
    for kind in m.layer_types:
        keys = win_keys if kind == "sliding_attention" else full_keys
        total += 2 * h * (nq + 2 * nkv) * d + 2 * nq * d * h + 4 * nq * d * keys
        total += 2 * h * m.num_experts + m.experts_per_token * (2 * h * 2 * i + 2 * i * h)
    total += 2 * h * m.vocab_size
    return total * (2 if peft else 3)


def memory_gb() -> float:
    """Peak device memory (CUDA) or this process's peak RSS (CPU), in GB."""
    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated() / 1e9
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6  # kB on Linux


class MetricsWriter:
    """Writes on rank 0; other ranks get a no-op writer."""

    def __init__(self, jsonl: Path, tensorboard_dir: Path | None, enabled: bool):
        self.enabled = enabled
        self._file = None
        self._tb = None
        if not enabled:
            return
        jsonl.parent.mkdir(parents=True, exist_ok=True)
        self._file = open(jsonl, "a", buffering=1)
        if tensorboard_dir is not None:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError:  # tensorboard is a dependency; a stripped env still trains
                log.warning("tensorboard is not installed: no TensorBoard events (JSONL still written)")
            else:
                self._tb = SummaryWriter(log_dir=str(tensorboard_dir))

    def write(self, record: dict, *, echo: bool = True) -> None:
        if not self.enabled:
            return
        self._file.write(json.dumps(record) + "\n")
        if self._tb is not None:
            step = record["iteration"]
            for k, v in record.items():
                if k != "iteration" and isinstance(v, (int, float)) and v is not None:
                    self._tb.add_scalar(f"train/{k}" if k != "val_loss" else "validation/loss", v, step)
        if echo:
            print(_line(record), flush=True)

    def close(self) -> None:
        if self._file:
            self._file.close()
        if self._tb is not None:
            self._tb.close()


def _line(r: dict) -> str:
    if "val_loss" in r:
        return f"[validation] iteration {r['iteration']:>7d} | val loss {r['val_loss']:.6f}"
    return (f"iteration {r['iteration']:>7d} | loss {r['loss']:.6f} | lr {r['lr']:.3e} | "
            f"grad norm {r['grad_norm']:.4f} | {r['tokens_per_s']:.0f} tok/s | "
            f"{r['tflops_per_s_per_rank']:.3f} TFLOP/s/rank | {r['step_s'] * 1e3:.0f} ms | "
            f"mem {r['mem_gb']:.2f} GB")


def read_metrics(path: str | os.PathLike) -> list[dict]:
    """The JSONL records, the last record of each (iteration, kind) kept, in iteration order."""
    latest: dict[tuple[int, bool], dict] = {}
    for line in Path(path).read_text().splitlines():
        if line.strip():
            r = json.loads(line)
            latest[(r["iteration"], "val_loss" in r)] = r
    return [latest[k] for k in sorted(latest)]
