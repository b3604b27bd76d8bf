"""Replica consistency: every copy of a replicated parameter must stay bitwise equal.

Megatron keeps many copies of the same tensor: every data-parallel rank holds the
model, every tensor-parallel rank holds the parameters TP does not split (norms,
router, biases of row-parallel linears), every expert-data-parallel rank holds its
experts. Nothing in megatron checks that the copies agree; a wrong gradient
reduction or clipping decision on one rank (as megatron-core 0.16.1's expert
optimizer made at TP>1, see cpu_patches "expert-optimizer-tp-group") lets them
drift apart silently, and each rank then trains a different model.

`check_replicas(chunks, grad_norm)` compares an exact digest of every trainable
parameter across its replica group, and the step's gradient norm (a global value)
across the world. Every rank takes part and every rank raises the same
`ReplicaDivergenceError`, naming the parameters and ranks, so the run stops as one.
Cost: one pass over the trainable parameters and a few small all-gathers.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from gptoss_model.errors import PermanentError

_CHUNK = 1 << 24  # elements digested at a time: bounds the int64 temporaries
_MODULUS = 65521  # position weights 1..65521 make a swap of two values visible


class ReplicaDivergenceError(PermanentError, RuntimeError):
    """Copies of a replicated parameter (or the grad norm) differ across ranks."""


def tensor_digest(t: torch.Tensor) -> torch.Tensor:
    """Two int64s that change when any bit of `t` changes (sum and position-weighted sum
    of the raw bit patterns; exact integer arithmetic, wrapping, so no rounding)."""
    flat = t.detach().contiguous().view(-1)
    ints = {8: torch.int64, 4: torch.int32, 2: torch.int16, 1: torch.int8}[flat.element_size()]
    bits = flat.view(ints)
    total = torch.zeros(2, dtype=torch.int64, device=flat.device)
    for start in range(0, bits.numel(), _CHUNK):
        part = bits[start:start + _CHUNK].to(torch.int64)
        weights = torch.arange(start, start + part.numel(), device=part.device) % _MODULUS + 1
        total[0] += part.sum()
        total[1] += (part * weights).sum()
    return total


def replica_groups(named_params) -> list[tuple[str, object, list[tuple[str, torch.Tensor]]]]:
    """(what, process group, [(name, param)]) for every way the trainable parameters are copied."""
    from megatron.core import parallel_state as ps

    dense = [(n, p) for n, p in named_params if p.requires_grad and getattr(p, "allreduce", True)]
    experts = [(n, p) for n, p in named_params if p.requires_grad and not getattr(p, "allreduce", True)]
    tp_replicated = [(n, p) for n, p in dense if not getattr(p, "tensor_model_parallel", False)]
    return [("tensor-parallel", ps.get_tensor_model_parallel_group(), tp_replicated),
            ("data-parallel", ps.get_data_parallel_group(with_context_parallel=True), dense),
            ("expert-data-parallel", ps.get_expert_data_parallel_group(), experts)]


def _disagreements(what: str, group, params) -> list[str]:
    if group is None or dist.get_world_size(group) == 1 or not params:
        return []
    device = params[0][1].device
    mine = torch.stack([tensor_digest(p) for _, p in params]).to(device)
    gathered = [torch.empty_like(mine) for _ in range(dist.get_world_size(group))]
    dist.all_gather(gathered, mine, group=group)
    ranks = dist.get_process_group_ranks(group)
    found = []
    for i, (name, _) in enumerate(params):
        differing = [ranks[r] for r, theirs in enumerate(gathered) if not torch.equal(theirs[i], mine[i])]
        if differing:
            found.append(f"{name} differs between rank {dist.get_rank()} and its {what} replica(s) on "
                         f"rank(s) {differing}")
    return found


def check_replicas(chunks, grad_norm: float, iteration: int) -> None:
    """Raise ReplicaDivergenceError on every rank if any replicated parameter or the grad
    norm differs across ranks (collective: every rank of the world must call it)."""
    from gptoss_model.model.parallel import unwrap_model

    named = [(n, p) for c in chunks for n, p in unwrap_model(c).named_parameters()]
    problems = []
    for what, group, params in replica_groups(named):
        problems += _disagreements(what, group, params)
    norms = [None] * dist.get_world_size()
    dist.all_gather_object(norms, float(grad_norm))
    if len({repr(x) for x in norms}) > 1:
        problems.append(f"the gradient norm differs across ranks: {dict(enumerate(norms))}")
    flag = torch.tensor([len(problems)], dtype=torch.int64, device=_device(chunks))
    dist.all_reduce(flag, op=dist.ReduceOp.MAX)
    if not flag.item():
        return
    every = [None] * dist.get_world_size()
    dist.all_gather_object(every, problems)
    lines = sorted({line for rank_lines in every for line in rank_lines})
    shown = lines[:20] + ([f"... and {len(lines) - 20} more"] if len(lines) > 20 else [])
    raise ReplicaDivergenceError(
        f"iteration {iteration}: replicas disagree (ranks would go on training different models):\n  - "
        + "\n  - ".join(shown))


def _device(chunks) -> torch.device:
    return next(p for c in chunks for p in c.parameters()).device
