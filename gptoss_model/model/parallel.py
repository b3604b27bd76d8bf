"""torch.distributed + megatron parallel_state set-up, from torchrun's environment.

One entry point, `initialize(layout)`: gloo on CPU, nccl with CUDA. Without
torchrun (plain `python`, pytest) it starts a world of one on a free local
port, so the same code path serves tests, the demo and a 1000-GPU job.
"""

from __future__ import annotations

import contextlib
import datetime
from dataclasses import dataclass

import torch
import torch.distributed as dist

from gptoss_model.system.processes import free_port
from gptoss_model.errors import PermanentError
from gptoss_model.settings import settings


@dataclass(frozen=True)
class ParallelLayout:
    """How the model is split. Data parallel is whatever is left of the world."""

    tensor_model_parallel_size: int = 1
    pipeline_model_parallel_size: int = 1
    expert_model_parallel_size: int = 1
    sequence_parallel: bool = False
    # GPT-OSS experts carry biases, which megatron-core only supports at ETP=1.
    expert_tensor_parallel_size: int = 1
    context_parallel_size: int = 1

    @property
    def tp(self) -> int:
        return self.tensor_model_parallel_size

    @property
    def pp(self) -> int:
        return self.pipeline_model_parallel_size

    @property
    def ep(self) -> int:
        return self.expert_model_parallel_size

    def model_parallel_size(self) -> int:
        return self.tp * self.pp * self.context_parallel_size

    def data_parallel_size(self, world_size: int) -> int:
        return world_size // self.model_parallel_size()



def default_backend() -> str:
    return "nccl" if torch.cuda.is_available() else "gloo"


def init_distributed(backend: str | None = None, timeout_minutes: int = 30) -> None:
    """Join the process group described by torchrun's env vars (or make a world of one)."""
    if dist.is_initialized():
        return
    backend = backend or default_backend()
    timeout = datetime.timedelta(minutes=timeout_minutes)
    env = settings()
    if env.rank is None:  # plain python / pytest: a private world of one
        if backend == "nccl":
            torch.cuda.set_device(0)
        dist.init_process_group(backend=backend, init_method=f"tcp://127.0.0.1:{free_port()}",
                                rank=0, world_size=1, timeout=timeout)
        return
    if backend == "nccl":
        torch.cuda.set_device(env.local_rank)
    if env.world_size is None:
        raise RuntimeError("RANK is set but WORLD_SIZE is not: start ranks with torchrun")
    dist.init_process_group(backend=backend, rank=env.rank, world_size=env.world_size, timeout=timeout)


def initialize(layout: ParallelLayout, *, seed: int = 1234, backend: str | None = None,
               timeout_minutes: int = 30) -> None:
    """Init torch.distributed and megatron's parallel groups for `layout`.

    Re-initialising with a different layout in the same process is allowed
    (tests do it): megatron's groups are destroyed and rebuilt.
    """
    from megatron.core import parallel_state, tensor_parallel

    from gptoss_model.model import cpu_patches

    cpu_patches.apply()
    init_distributed(backend, timeout_minutes)
    world = dist.get_world_size()
    if world % layout.model_parallel_size():
        raise ValueError(
            f"world size {world} is not divisible by TP*PP*CP = {layout.model_parallel_size()} ({layout})"
        )
    if parallel_state.model_parallel_is_initialized():
        parallel_state.destroy_model_parallel()
    parallel_state.initialize_model_parallel(
        tensor_model_parallel_size=layout.tp,
        pipeline_model_parallel_size=layout.pp,
        context_parallel_size=layout.context_parallel_size,
        expert_model_parallel_size=layout.ep,
        expert_tensor_parallel_size=layout.expert_tensor_parallel_size,
        distributed_timeout_minutes=timeout_minutes,
    )
    # Seeds the tracked RNG states (TP/EP-aware dropout and init). On CPU the
    # tracker is the CPU one installed by cpu_patches.
    tensor_parallel.model_parallel_cuda_manual_seed(seed)
    torch.manual_seed(seed)


def destroy() -> None:
    """Tear down megatron groups and the process group (end of a run or a test)."""
    from megatron.core import parallel_state

    if parallel_state.model_parallel_is_initialized():
        parallel_state.destroy_model_parallel()
    if dist.is_initialized():
        dist.destroy_process_group()


def rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def world_size() -> int:
    return dist.get_world_size() if dist.is_initialized() else 1


def unwrap_model(chunk: torch.nn.Module) -> torch.nn.Module:
    """The bare model inside DDP / Float16Module wrappers."""
    while hasattr(chunk, "module"):
        chunk = chunk.module
    return chunk


class WorldSizeError(PermanentError, RuntimeError):
    """A single-process job (conversion, verification) run inside a larger world."""


@contextlib.contextmanager
def world_of_one(job: str = "this job"):
    """torch.distributed + megatron parallel state at world 1 for the duration, unless already there.

    Conversion and verification build whole models in one process. Inside a
    world of one set up by someone else (a test, a notebook) the groups are
    reused or re-made at TP=PP=EP=1; a private world is torn down on exit.
    """
    from megatron.core import parallel_state as ps

    created = False
    if dist.is_initialized():
        if dist.get_world_size() != 1:
            raise WorldSizeError(f"{job} runs in a single process (world size 1); "
                                 f"this one is rank {dist.get_rank()} of {dist.get_world_size()}")
        if (not ps.model_parallel_is_initialized()
                or ps.get_tensor_model_parallel_world_size() != 1
                or ps.get_pipeline_model_parallel_world_size() != 1
                or ps.get_expert_model_parallel_world_size() != 1):
            initialize(ParallelLayout())
    else:
        initialize(ParallelLayout())
        created = True
    try:
        yield
    finally:
        if created:
            destroy()
