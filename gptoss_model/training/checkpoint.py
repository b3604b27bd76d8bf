"""Training checkpoints in megatron-core torch_dist, Megatron-LM's directory layout.

    {save}/iter_0000010/            dist_checkpointing (torch_dist) + run_config.yaml
    {save}/latest_checkpointed_iteration.txt   "10", written (atomically) after every rank
                                               finished writing iter_0000010/

Contents: "model" (the sharded state dict; only adapter tensors with LoRA/DoRA,
see peft.py), "optimizer" (megatron's optimizer state; the distributed
optimizer's in the dp_reshardable format), "opt_param_scheduler", "iteration",
"consumed_samples", "checkpoint_version", "run_config", "peft", and per rank
"rng_state" (python, numpy, torch and megatron's tracker streams).

Exactness: a resumed run's losses are bitwise those of an uninterrupted one, with the
plain megatron optimizer and with the distributed optimizer (dp_reshardable; tested at
DP2). The latter needs `_restore_adam_steps`: mcore 0.16.1 restored Adam's `step` as 1,
so every step after the first resumed one drifted.

Resume reads the tracker file only, so an `iter_*` directory a crash left
half-written (its iteration never reached the tracker) is ignored, and
overwritten when that iteration is saved again.
"""

from __future__ import annotations

import logging
import os
import random
import shutil
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

from gptoss_model.checkpoint.layout import CHECKPOINT_VERSION, TRACKER_FILE, iter_dir_name
from gptoss_model.errors import PermanentError
from gptoss_model.system.safe_unpickle import refusals_named
from gptoss_model.model import peft as peft_mod
from gptoss_model.training.config import RunConfig, save_yaml, to_dict

log = logging.getLogger(__name__)

DIST_OPT_SHARDING = "dp_reshardable"  # the only distributed-optimizer format that resumes exactly here


class CheckpointError(PermanentError, RuntimeError):
    """A checkpoint that cannot be resumed from (names the directory and what is wrong)."""


def iter_dir(root: Path, iteration: int) -> Path:
    return Path(root) / iter_dir_name(iteration)


def latest_iteration(root: Path) -> int | None:
    """The newest complete checkpoint's iteration (None: nothing to resume)."""
    tracker = Path(root) / TRACKER_FILE
    if not tracker.is_file():
        return None
    text = tracker.read_text().strip()
    try:
        it = int(text)
    except ValueError as e:
        raise CheckpointError(f"{tracker}: expected an iteration number, found {text!r}") from e
    if not (iter_dir(root, it) / "metadata.json").is_file():
        raise CheckpointError(f"{tracker} names iteration {it} but {iter_dir(root, it)} is incomplete")
    return it


def incomplete_dirs(root: Path) -> list[Path]:
    """iter_* directories newer than the tracker: saves a crash interrupted."""
    last = latest_iteration(root)
    return sorted(p for p in Path(root).glob("iter_*")
                  if p.is_dir() and p.name[5:].isdigit() and (last is None or int(p.name[5:]) > last))


def _rng_state() -> dict:
    from megatron.core import tensor_parallel

    return {"random": random.getstate(), "np": np.random.get_state(), "torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state() if torch.cuda.is_available() else None,
            "tracker": tensor_parallel.get_cuda_rng_tracker().get_states()}


def _set_rng_state(state: dict) -> None:
    from megatron.core import tensor_parallel

    random.setstate(state["random"])
    np.random.set_state(state["np"])
    torch.set_rng_state(state["torch"])
    if state["cuda"] is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])
    tensor_parallel.get_cuda_rng_tracker().set_states(state["tracker"])


def _model_state(chunks, run: RunConfig) -> dict:
    from gptoss_model.model.parallel import unwrap_model

    # The GPTModel's own keys (no DDP "module." prefix): what convert writes and Megatron-LM reads.
    state = unwrap_model(chunks[0]).sharded_state_dict()
    if run.peft.method:
        state = {k: v for k, v in state.items() if peft_mod.is_adapter_key(k)}
    return state


def _state(run: RunConfig, chunks, optimizer, scheduler, iteration: int, consumed: int, loading: bool) -> dict:
    from megatron.core.dist_checkpointing.mapping import ShardedObject

    model_state = _model_state(chunks, run)
    state = {"model": model_state, "checkpoint_version": CHECKPOINT_VERSION, "iteration": iteration,
             "consumed_samples": consumed, "run_config": to_dict(run),
             "peft": to_dict(run.peft) if run.peft.method else None, "world_size": dist.get_world_size()}
    if run.checkpoint.save_optim:
        metadata = ({"distrib_optim_sharding_type": DIST_OPT_SHARDING}
                    if run.parallelism.use_distributed_optimizer else None)
        if loading:
            if run.parallelism.use_distributed_optimizer:
                # mcore 0.16.1's dp_reshardable state_dict() needs Adam's states (and their
                # `step`) to exist before it can describe what to load into them.
                for opt in getattr(optimizer, "chained_optimizers", [optimizer]):
                    opt._init_optimizer_states_with_dummy_values()
            with torch.no_grad():
                state["optimizer"] = optimizer.sharded_state_dict(model_state, is_loading=True, metadata=metadata)
        else:
            state["optimizer"] = optimizer.sharded_state_dict(model_state, metadata=metadata)
        state["opt_param_scheduler"] = scheduler.state_dict()
    if run.checkpoint.save_rng:
        world, rank = dist.get_world_size(), dist.get_rank()
        state["rng_state"] = ShardedObject("rng_state", _rng_state(), (world,), (rank,), replica_id=0)
    return state


def save_checkpoint(run: RunConfig, chunks, optimizer, scheduler, iteration: int, consumed: int) -> Path:
    """Write iter_{iteration}/ on every rank, then the tracker (rank 0): the commit point."""
    from megatron.core import dist_checkpointing

    root = run.save_dir()
    target = iter_dir(root, iteration)
    if dist.get_rank() == 0:
        root.mkdir(parents=True, exist_ok=True)
        if target.exists():  # left by a save a crash interrupted: never the tracker's
            shutil.rmtree(target)
        target.mkdir()
    dist.barrier()
    state = _state(run, chunks, optimizer, scheduler, iteration, consumed, loading=False)
    dist_checkpointing.save(state, str(target), sharded_strategy=("torch_dist", 1))
    dist.barrier()
    if dist.get_rank() == 0:
        save_yaml(run, target / "run_config.yaml")
        tmp = root / f".{TRACKER_FILE}.tmp"
        tmp.write_text(str(iteration))
        os.replace(tmp, root / TRACKER_FILE)
    dist.barrier()
    return target


@torch.no_grad()  # the distributed optimizer's shards are views of leaf parameters
def load_checkpoint(run: RunConfig, chunks, optimizer, scheduler) -> tuple[int, int] | None:
    """Restore the newest complete checkpoint of `checkpoint.load`; (iteration, consumed samples)."""
    from megatron.core import dist_checkpointing

    root = run.load_dir()
    iteration = latest_iteration(root)
    if iteration is None:
        return None
    for stale in incomplete_dirs(root):
        _say(f"ignoring {stale}: a save that never completed (the tracker names iteration {iteration})")
    source = iter_dir(root, iteration)
    with refusals_named():
        common = dist_checkpointing.load_common_state_dict(str(source))
    saved_peft = common.get("peft")
    if bool(saved_peft) != bool(run.peft.method) or (saved_peft and saved_peft["method"] != run.peft.method):
        raise CheckpointError(f"{source}: saved with peft={saved_peft and saved_peft['method']}, this run "
                              f"uses peft={run.peft.method}; point checkpoint.load elsewhere")
    state = _state(run, chunks, optimizer, scheduler, iteration, 0, loading=True)
    if common.get("world_size") != dist.get_world_size():
        state.pop("rng_state", None)  # per-rank streams only mean something on the same world
    with torch.no_grad(), refusals_named():
        loaded = dist_checkpointing.load(state, str(source))
    from gptoss_model.model.parallel import unwrap_model

    unwrap_model(chunks[0]).load_state_dict(loaded["model"], strict=not run.peft.method)
    if "optimizer" in loaded:
        optimizer.load_state_dict(loaded["optimizer"])
        _restore_adam_steps(optimizer, _saved_adam_steps(loaded["optimizer"]))
        scheduler.load_state_dict(loaded["opt_param_scheduler"])
    if "rng_state" in loaded:
        _set_rng_state(loaded["rng_state"])
    _say(f"resumed from {source} (iteration {iteration}, {loaded['consumed_samples']} samples consumed)")
    return iteration, int(loaded["consumed_samples"])


def _saved_adam_steps(state) -> set:
    """Every Adam `step` the checkpoint's optimizer param groups hold (megatron saves it there)."""
    found = set()
    if isinstance(state, dict):
        for g in state.get("param_groups", ()):
            if isinstance(g, dict) and "step" in g:
                found.add(float(g["step"]))
        for v in state.values():
            if isinstance(v, (dict, list)):
                found |= _saved_adam_steps(v)
    elif isinstance(state, list):
        for v in state:
            found |= _saved_adam_steps(v)
    return found


def _restore_adam_steps(optimizer, saved: set) -> None:
    """Give every parameter its own Adam `step` tensor holding the saved count.

    megatron-core 0.16.1's DistributedOptimizer.load_state_dict (torch Adam, no TE/Apex)
    (1) assigns ONE step tensor to every parameter's state, which torch's Adam then
    increments once per parameter per iteration, and (2) with the dp_reshardable format
    copies the per-bucket `step` back over it, and that one is the placeholder state's
    (1, from the dummy step that must run before loading). Both broke bias correction
    after a resume. The param groups' saved step is the true count.
    """
    step = next(iter(saved)) if len(saved) == 1 else None
    for opt in getattr(optimizer, "chained_optimizers", [optimizer]):
        inner = getattr(opt, "optimizer", None)
        for state in (inner.state.values() if inner is not None else ()):
            if torch.is_tensor(state.get("step")):
                state["step"] = (torch.full_like(state["step"], step) if step is not None
                                 else state["step"].clone())


def _say(message: str) -> None:
    """Rank 0 to stdout (where torchrun users and the Prefect log stream look) and the log."""
    log.info(message)
    if dist.get_rank() == 0:
        print(f"[checkpoint] {message}", flush=True)
