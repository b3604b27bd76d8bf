"""The public API: AutoBridge.from_hf_pretrained -> provider -> provide_distributed_model (world 1)."""

from __future__ import annotations

import pytest
import torch

from gptoss_model import AutoBridge, bridge
from gptoss_model.model.config import tiny

from . import _parity as P
from .conftest import LOGIT_TOL

pytestmark = pytest.mark.usefixtures("world1")


def test_seed_snippet_at_world_1(tiny_ckpt, reference):
    b = AutoBridge.from_hf_pretrained(str(tiny_ckpt))
    assert b.config == tiny()
    provider = b.to_megatron_provider()
    provider.tensor_model_parallel_size = 1
    provider.pipeline_model_parallel_size = 1
    provider.expert_model_parallel_size = 1
    provider.sequence_parallel = False
    provider.finalize()
    model = provider.provide_distributed_model(wrap_with_ddp=False)
    assert isinstance(model, list) and len(model) == 1
    ids, _ = P.make_batch(512, seq=40, seed=5)
    with torch.no_grad():
        want = reference(ids).logits
    assert (P.megatron_logits(model[0], ids) - want).abs().max().item() < LOGIT_TOL


def test_wrap_with_ddp_and_megatron_state_dict_names(tiny_ckpt):
    from megatron.core.distributed import DistributedDataParallel

    (model,) = AutoBridge.from_hf_pretrained(tiny_ckpt).to_megatron_provider().provide_distributed_model()
    assert isinstance(model, DistributedDataParallel)
    keys = set(model.module.state_dict())
    assert "decoder.layers.0.self_attention.linear_qkv.weight" in keys
    assert "decoder.layers.0.mlp.experts.local_experts.3.linear_fc1.weight" in keys
    assert "decoder.layers.0.self_attention.core_attention.softmax_offset" in keys


def test_without_weights_nothing_is_read(tmp_path):
    (tmp_path / "config.json").write_text(__import__("json").dumps(tiny().to_hf_config()))
    provider = AutoBridge.from_hf_pretrained(tmp_path).to_megatron_provider(load_weights=False)
    (model,) = provider.provide_distributed_model(wrap_with_ddp=False)
    assert all(torch.isfinite(p).all() for p in model.parameters())  # megatron's own init


# A repo id goes through the verified, resumable download: tests/hub/test_bridge_from_hub.py.


def test_a_file_is_not_a_checkpoint(tmp_path):
    f = tmp_path / "model.safetensors"
    f.write_bytes(b"")
    with pytest.raises(NotADirectoryError):
        bridge.resolve_checkpoint(f)
