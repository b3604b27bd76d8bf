"""Clear failures: non-GPT-OSS config, missing tensor, wrong shape, refused layouts."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from gptoss_model import AutoBridge
from gptoss_model.model.build import LayoutError, check_layout
from gptoss_model.model.config import NotGptOssConfigError, tiny
from gptoss_model.checkpoint.load_hf import CheckpointError, HFCheckpoint
from gptoss_model.model.parallel import ParallelLayout

from .test_config import LLAMA_CONFIG


def _copy(src, dst):
    shutil.copytree(src, dst)
    return dst


def _rewrite_shard(ckpt, tensor, change):
    """Apply `change(dict_of_tensors)` to the shard holding `tensor`; return that shard's file name."""
    index_path = ckpt / "model.safetensors.index.json"
    index = json.loads(index_path.read_text())
    fname = index["weight_map"][tensor]
    with safe_open(ckpt / fname, "pt") as f:
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    change(tensors)
    save_file(tensors, str(ckpt / fname), metadata={"format": "pt"})
    index["weight_map"] = {k: v for k, v in index["weight_map"].items() if v != fname or k in tensors}
    index_path.write_text(json.dumps(index))
    return fname


def test_non_gpt_oss_checkpoint_is_refused_by_the_bridge(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps(LLAMA_CONFIG))
    with pytest.raises(NotGptOssConfigError, match=r"config\.json: not a GPT-OSS config \(model_type='llama'"):
        AutoBridge.from_hf_pretrained(tmp_path)


def test_missing_tensor_names_file_tensor_and_expected_shape(tiny_ckpt, tmp_path):
    ckpt = _copy(tiny_ckpt, tmp_path / "ckpt")
    name = "model.layers.2.self_attn.sinks"
    _rewrite_shard(ckpt, name, lambda t: t.pop(name))
    with pytest.raises(CheckpointError) as e:
        HFCheckpoint(ckpt).validate()
    msg = str(e.value)
    print("\n" + msg)
    assert "model.safetensors.index.json" in msg and repr(name) in msg and "missing" in msg
    assert "expected shape [4]" in msg


def test_wrong_shape_names_file_tensor_expected_and_found(tiny_ckpt, tmp_path):
    ckpt = _copy(tiny_ckpt, tmp_path / "ckpt")
    name = "model.layers.1.mlp.experts.down_proj"  # [E, inter, hidden] = [8, 48, 64]

    def transpose(t):
        t[name] = t[name].transpose(1, 2).contiguous()

    fname = _rewrite_shard(ckpt, name, transpose)
    with pytest.raises(CheckpointError) as e:
        HFCheckpoint(ckpt).validate()
    msg = str(e.value)
    print("\n" + msg)
    assert f"{fname}: tensor {name!r} has shape [8, 64, 48], expected [8, 48, 64]" in msg


def test_wrong_mxfp4_shape_is_reported_per_stored_tensor(tiny_mxfp4_ckpt, tmp_path):
    ckpt = _copy(tiny_mxfp4_ckpt, tmp_path / "ckpt")
    name = "model.layers.0.mlp.experts.gate_up_proj_scales"

    def drop_a_group(t):
        t[name] = t[name][..., :1].contiguous()

    fname = _rewrite_shard(ckpt, name, drop_a_group)
    with pytest.raises(CheckpointError, match=rf"{fname}: tensor {name!r} has shape \[8, 192, 1\], "
                                              r"expected \[8, 192, 2\] \(MXFP4 of \[8, 64, 192\]\)"):
        HFCheckpoint(ckpt).validate()


def test_loader_refuses_before_touching_the_model(tiny_ckpt, tmp_path, world1):
    """The seed path fails at load time with the same message, nothing half-loaded is returned."""
    ckpt = _copy(tiny_ckpt, tmp_path / "ckpt")
    _rewrite_shard(ckpt, "lm_head.weight", lambda t: t.update({"lm_head.weight": torch.zeros(512, 32)}))
    provider = AutoBridge.from_hf_pretrained(ckpt).to_megatron_provider()
    with pytest.raises(CheckpointError, match=r"'lm_head.weight' has shape \[512, 32\], expected \[512, 64\]"):
        provider.provide_distributed_model(wrap_with_ddp=False)


@pytest.mark.parametrize("layout,message", [
    (ParallelLayout(expert_tensor_parallel_size=2), "expert tensor parallel size 1"),
    (ParallelLayout(tensor_model_parallel_size=4, sequence_parallel=True), "num_key_value_heads=2"),
    (ParallelLayout(expert_model_parallel_size=3), "num_experts=8"),
    (ParallelLayout(pipeline_model_parallel_size=3), "num_layers=4"),
    (ParallelLayout(tensor_model_parallel_size=2), "needs sequence_parallel=True"),
    (ParallelLayout(context_parallel_size=2), "context parallel"),
])
def test_check_layout_refuses_unbuildable_layouts(layout, message):
    with pytest.raises(LayoutError, match=message) as e:
        check_layout(tiny(), layout)
    assert "refused" in str(e.value)


def test_check_layout_checks_the_world_size():
    with pytest.raises(LayoutError, match="world size 2 not divisible by ETP\\*EP\\*PP=4"):
        check_layout(tiny(), ParallelLayout(expert_model_parallel_size=2, pipeline_model_parallel_size=2), 2)
    check_layout(tiny(), ParallelLayout(tensor_model_parallel_size=2, sequence_parallel=True,
                                     expert_model_parallel_size=1), 2)  # repaired, so accepted


def test_provider_finalize_refuses_a_bad_layout(tiny_ckpt):
    provider = AutoBridge.from_hf_pretrained(tiny_ckpt).to_megatron_provider()
    provider.tensor_model_parallel_size = 2  # without sequence_parallel
    with pytest.raises(LayoutError, match="sequence_parallel"):
        provider.finalize()
