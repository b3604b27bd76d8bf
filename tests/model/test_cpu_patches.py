"""The megatron-core patches: each still targets real code, applies once, and the CPU training
path they enable (DDP + Megatron optimizer, incl. the distributed one) runs."""

from __future__ import annotations

import megatron.core
import pytest
import torch

from gptoss_model.model import cpu_patches

from . import _parity as P


def test_written_for_the_installed_megatron_core():
    assert megatron.core.__version__ == cpu_patches.MCORE_VERSION, (
        "megatron-core changed: re-check every patch in gptoss_model/model/cpu_patches.py, then bump MCORE_VERSION")


def test_every_patch_still_targets_the_code_it_fixes():
    """Fails when mcore moves or fixes the code a patch rewrites: remove or update that patch."""
    stale = [name for name, ok in cpu_patches.check().items() if not ok]
    assert not stale, f"patches whose target code changed: {stale}"


def test_every_patch_is_documented():
    for p in cpu_patches.PATCHES:
        assert p.symptom and p.reason and p.mcore_version == "0.16.1", p.name
    assert len({p.name for p in cpu_patches.PATCHES}) == len(cpu_patches.PATCHES)


def test_apply_is_conditional_and_idempotent():
    first = cpu_patches.apply()
    expected = [p.name for p in cpu_patches.PATCHES if p.needed()]
    assert first == expected
    if not torch.cuda.is_available():  # this machine: every patch is needed
        assert len(first) == len(cpu_patches.PATCHES) == 13
    from megatron.core.tensor_parallel import mappings

    fwd = mappings._ReduceFromModelParallelRegion.forward
    assert cpu_patches.apply() == first
    assert mappings._ReduceFromModelParallelRegion.forward is fwd  # not wrapped twice


@pytest.mark.parametrize("distributed_optimizer", [False, True])
def test_cpu_training_steps_with_the_megatron_optimizer(tiny_ckpt, world1, distributed_optimizer):
    from megatron.core.distributed import DistributedDataParallelConfig
    from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer

    from gptoss_model import AutoBridge

    chunks = AutoBridge.from_hf_pretrained(tiny_ckpt).to_megatron_provider().provide_distributed_model(
        wrap_with_ddp=True, ddp_config=DistributedDataParallelConfig(
            grad_reduce_in_fp32=True, use_distributed_optimizer=distributed_optimizer))
    opt = get_megatron_optimizer(OptimizerConfig(optimizer="adam", lr=1e-3, clip_grad=1.0, bf16=False,
                                                 use_distributed_optimizer=distributed_optimizer), chunks)
    ids, labels = P.make_batch(512, seq=32)
    losses = []
    for _ in range(3):
        losses.append(P.schedule_forward_backward(chunks, ids, labels).item())
        ok, grad_norm, _ = opt.step()
        assert ok and grad_norm > 0
        opt.zero_grad()
    assert losses[2] < losses[0], losses
