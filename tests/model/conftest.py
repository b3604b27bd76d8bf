"""Fixtures for the gptoss_model tests: tiny checkpoints (built once per session),
the transformers reference, and a megatron world of one."""

from __future__ import annotations

import pytest
import torch

from gptoss_model.model.reference import load_reference_model
from gptoss_model.checkpoint.tiny import write_tiny_checkpoint

# Parity bounds of the issue: fp32 logits (absolute) and gradients (relative).
LOGIT_TOL = 1e-4
GRAD_TOL = 1e-4


@pytest.fixture(scope="session")
def tiny_ckpt(tmp_path_factory):
    """fp32, sharded, non-square experts (hidden 64, intermediate 48)."""
    return write_tiny_checkpoint(tmp_path_factory.mktemp("tiny") / "fp32", dtype="float32", seed=0)


@pytest.fixture(scope="session")
def tiny_mxfp4_ckpt(tmp_path_factory):
    """Experts stored as MXFP4 blocks/scales, as in the openai repos (intermediate 96)."""
    return write_tiny_checkpoint(tmp_path_factory.mktemp("tiny") / "mxfp4", mxfp4=True, seed=1)


@pytest.fixture(scope="session")
def tiny_square_ckpt(tmp_path_factory):
    """intermediate == hidden: the real models' square down_proj, where a transpose keeps the shape."""
    return write_tiny_checkpoint(tmp_path_factory.mktemp("tiny") / "square", intermediate_size=64, seed=2)


@pytest.fixture(scope="session")
def reference(tiny_ckpt):
    return load_reference_model(tiny_ckpt, dtype=torch.float32)


@pytest.fixture(scope="module")
def world1():
    """torch.distributed (gloo) + megatron parallel state for one process, torn down after the module."""
    from gptoss_model.model import parallel

    parallel.initialize(parallel.ParallelLayout())
    yield
    parallel.destroy()


def build_loaded(ckpt, **opts):
    """A world-1 megatron GPTModel with the checkpoint's weights (local spec on CPU)."""
    from gptoss_model.checkpoint import load_hf
    from gptoss_model.model import build, parallel
    from gptoss_model.model.config import GptOssModelConfig

    cfg = GptOssModelConfig.from_hf_config(ckpt)
    layout = parallel.ParallelLayout()
    model = build.build_gpt_model(cfg, layout, build.BuildOptions(perform_initialization=False, **opts))
    load_hf.load_hf_weights([model], ckpt, cfg)
    return cfg, model
