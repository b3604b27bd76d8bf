"""The on-disk layout of a Megatron-LM checkpoint, shared by every stage that reads or writes one.

    out/latest_checkpointed_iteration.txt   "500" (or "release"): written last, the commit point
    out/iter_0000500/                       megatron-core dist_checkpointing (torch_dist)

The state dict is Megatron-LM's: {"model": model.sharded_state_dict(),
"checkpoint_version": 3.0, "iteration": N} (+ optimizer, RNG... for training);
dist_checkpointing reshards it on load, so any TP/PP/EP layout reads it.
"""
from __future__ import annotations

from pathlib import Path

import torch

from gptoss_model.system import safe_unpickle
from gptoss_model.model.config import GptOssModelConfig
from gptoss_model.errors import PermanentError

safe_unpickle.install()  # every torch_dist reader in this process: .metadata through the restricted unpickler

TRACKER_FILE = "latest_checkpointed_iteration.txt"
DTYPES = {"bfloat16": torch.bfloat16, "float32": torch.float32}  # storage dtypes of a converted checkpoint
CHECKPOINT_VERSION = 3.0  # Megatron-LM's current checkpoint_version


class CheckpointLayoutError(PermanentError, FileNotFoundError):
    """A directory that is not a (complete) Megatron-LM checkpoint."""


def iter_dir_name(iteration: int) -> str:
    return f"iter_{iteration:07d}"


def checkpoint_iter_dir(megatron_dir: str | Path) -> Path:
    """The iteration directory named by the tracker file (a checkpoint without one is incomplete)."""
    megatron_dir = Path(megatron_dir)
    tracker = megatron_dir / TRACKER_FILE
    if not tracker.is_file():
        raise CheckpointLayoutError(f"{megatron_dir}: no {TRACKER_FILE}; not a complete Megatron checkpoint")
    text = tracker.read_text().strip()
    if text == "release":
        return megatron_dir / "release"
    try:
        return megatron_dir / iter_dir_name(int(text))
    except ValueError:
        raise CheckpointLayoutError(f"{tracker}: expected an iteration number or 'release', got {text[:40]!r}") from None


def megatron_state_dict(model, iteration: int = 0) -> dict:
    """What Megatron-LM saves and loads for a model-only checkpoint (no optimizer, no RNG)."""
    return {"model": model.sharded_state_dict(), "checkpoint_version": CHECKPOINT_VERSION, "iteration": iteration}


def compute_device() -> str:
    """Where checks run a megatron model: the GPU when there is one.

    On a CUDA machine megatron-core puts some parameters (yarn, softmax sinks, router) on the
    current CUDA device whatever the build asks, so a whole model there lives on the GPU."""
    return "cuda" if torch.cuda.is_available() else "cpu"


def build_model(cfg: GptOssModelConfig, dtype: torch.dtype, device: str | None = None):
    """A world-1 GPTModel (local spec), uninitialised, on `device` (default: compute_device()).

    On "meta" its linear layers hold no memory (materialise them with `to_empty`)."""
    from gptoss_model.model import build
    from gptoss_model.model.parallel import ParallelLayout

    device = device or compute_device()
    opts = build.BuildOptions(params_dtype=dtype, use_te=False, perform_initialization=False,
                              on_gpu=torch.device(device).type == "cuda")
    with torch.device(device):
        return build.build_gpt_model(cfg, ParallelLayout(), opts)


def load_megatron_checkpoint(model, megatron_dir: str | Path):
    """Load a checkpoint into this rank's model chunk (any layout; parallel state must exist)."""
    from megatron.core import dist_checkpointing

    state = megatron_state_dict(model)
    with safe_unpickle.refusals_named():
        loaded = dist_checkpointing.load(state, str(checkpoint_iter_dir(megatron_dir)))
    model.load_state_dict(loaded["model"], strict=True)
    return model
