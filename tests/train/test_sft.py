"""SFT from the packed format: batch layout, and per-document attention in the model (world of one)."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from gptoss_model.training.sft import build_sft_datasets, sample_to_batch


def test_packed_sample_becomes_a_per_document_batch():
    sample = {"tokens": np.array([5, 6, 7, 8, 9], np.int32), "loss_mask": np.array([0, 0, 1, 0, 1], np.uint8),
              "doc_lengths": np.array([3, 2], np.int32)}
    b = sample_to_batch(sample, seq_length=8, pad_id=0)
    assert b["tokens"].tolist() == [5, 6, 7, 8, 9, 0, 0, 0]
    assert b["labels"].tolist() == [6, 7, 8, 9, 0, 0, 0, 0]
    # label i uses mask[i + 1]; the last token of a document predicts nothing; padding masked
    assert b["loss_mask"].tolist() == [0, 1, 0, 1, 0, 0, 0, 0]
    assert b["position_ids"].tolist() == [0, 1, 2, 0, 1, 0, 1, 2]
    allowed = ~b["attention_mask"][0]
    assert allowed[4].tolist() == [False, False, False, True, True, False, False, False]
    assert allowed[2].tolist() == [True, True, True, False, False, False, False, False]
    with pytest.raises(ValueError, match="seq_length=4"):
        sample_to_batch(sample, seq_length=4, pad_id=0)


def test_sft_splits_read_the_artifact(train_env):
    from gptoss_model.recipes import tiny_finetune_config

    run = tiny_finetune_config(data_paths=train_env["sft_prefixes"], pretrained_checkpoint="x")
    train, valid = build_sft_datasets(run)
    assert len(train) > 0 and valid is not None and len(train) + len(valid) > len(train)
    b = train[0]
    assert b["tokens"].shape == (64,) and b["loss_mask"].sum() > 0


@pytest.fixture(scope="module")
def world1_model(train_env):
    from gptoss_model.model import parallel
    from gptoss_model.model.build import BuildOptions, build_gpt_model
    from gptoss_model.model.config import GptOssModelConfig
    from gptoss_model.checkpoint.load_hf import load_hf_weights

    parallel.initialize(parallel.ParallelLayout())
    cfg = GptOssModelConfig.from_hf_config(train_env["ckpt"])
    model = build_gpt_model(cfg, parallel.ParallelLayout(), BuildOptions(perform_initialization=False))
    load_hf_weights([model], train_env["ckpt"], cfg)
    yield model.eval()
    parallel.destroy()


@torch.no_grad()
def test_documents_do_not_see_each_other(world1_model):
    """A document's logits inside a pack equal its logits alone (sliding and full layers),
    with documents longer than the sliding window so the window and the mask both matter."""
    g = torch.Generator().manual_seed(0)
    a, b = torch.randint(1, 512, (20,), generator=g), torch.randint(1, 512, (12,), generator=g)
    sample = {"tokens": torch.cat([a, b]).numpy(), "loss_mask": np.ones(32, np.uint8),
              "doc_lengths": np.array([20, 12])}
    batch = sample_to_batch(sample, seq_length=40, pad_id=0)
    packed = world1_model(batch["tokens"][None], batch["position_ids"][None], batch["attention_mask"][None])
    alone = world1_model(b[None], torch.arange(12)[None], None)
    first = world1_model(a[None], torch.arange(20)[None], None)
    diff_b = (packed[0, 20:32] - alone[0]).abs().max().item()
    diff_a = (packed[0, :20] - first[0]).abs().max().item()
    print(f"\nmax |logit diff| packed vs alone: doc 1 {diff_a:.2e}, doc 2 {diff_b:.2e}")
    assert diff_a < 1e-4 and diff_b < 1e-4


@torch.no_grad()
def test_without_the_window_mask_patch_documents_leak(world1_model, monkeypatch):
    """Control: megatron-core's own softmax path drops the document mask on sliding layers."""
    from megatron.core.fusions.fused_softmax import FusedScaleMaskSoftmax

    monkeypatch.setattr(FusedScaleMaskSoftmax, "forward_torch_softmax",
                        FusedScaleMaskSoftmax.forward_torch_softmax._gptoss_orig)
    g = torch.Generator().manual_seed(0)
    a, b = torch.randint(1, 512, (20,), generator=g), torch.randint(1, 512, (12,), generator=g)
    sample = {"tokens": torch.cat([a, b]).numpy(), "loss_mask": np.ones(32, np.uint8),
              "doc_lengths": np.array([20, 12])}
    batch = sample_to_batch(sample, seq_length=40, pad_id=0)
    packed = world1_model(batch["tokens"][None], batch["position_ids"][None], batch["attention_mask"][None])
    alone = world1_model(b[None], torch.arange(12)[None], None)
    assert (packed[0, 20:32] - alone[0]).abs().max().item() > 1e-2


@pytest.mark.parametrize("method", ["lora", "dora"])
def test_merged_weight_computes_what_the_adapted_linear_computes(world1_model, train_env, method):
    """Export's merge (peft.merged_weight) against the adapted megatron linears themselves:
    attention (row-parallel proj, column-parallel qkv) and an expert's fc1/fc2."""
    from gptoss_model.model import parallel
    from gptoss_model.model.build import build_gpt_model
    from gptoss_model.model.config import GptOssModelConfig
    from gptoss_model.training.config import PeftConfig
    from gptoss_model.model.peft import apply_adapters, merged_weight

    model = build_gpt_model(GptOssModelConfig.from_hf_config(train_env["ckpt"]), parallel.ParallelLayout())
    cfg = PeftConfig(method=method, dim=4, alpha=8.0)
    apply_adapters(model, cfg)
    g = torch.Generator().manual_seed(1)
    layer = model.decoder.layers[0]
    for linear in (layer.self_attention.linear_proj, layer.self_attention.linear_qkv,
                   layer.mlp.experts.local_experts[3].linear_fc1, layer.mlp.experts.local_experts[3].linear_fc2):
        ad = linear.adapter
        with torch.no_grad():
            ad.lora_b.copy_(torch.randn(ad.lora_b.shape, generator=g) * 0.1)
            if method == "dora":
                ad.dora_magnitude.mul_(1 + 0.1 * torch.rand(ad.dora_magnitude.shape, generator=g))
        x = torch.randn(5, 1, linear.weight.shape[1], generator=g)
        with torch.no_grad():
            out, out_bias = linear(x)
            state = {k: v.detach() for k, v in ad.named_parameters()}
            want = x @ merged_weight(linear.weight.detach(), state, cfg.alpha, cfg.dim).t()
            if out_bias is None and linear.bias is not None:
                want = want + linear.bias
        assert (out - want).abs().max().item() < 1e-5 * max(1.0, want.abs().max().item())
