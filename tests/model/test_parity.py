"""Logits and gradient parity with transformers' GptOssForCausalLM (eager, fp32), world of one.

Also the mutation checks: each historic bug (transposed down_proj, window off
by one, yarn rounding) is re-introduced with a monkeypatch and must break
parity by orders of magnitude, proving the comparison would catch it.
"""

from __future__ import annotations

import pytest
import torch

from gptoss_model.model import build
from gptoss_model.checkpoint import name_map as nm
from gptoss_model.checkpoint.load_hf import CheckpointError
from gptoss_model.model.reference import load_reference_model

from . import _parity as P
from .conftest import GRAD_TOL, LOGIT_TOL, build_loaded

pytestmark = pytest.mark.usefixtures("world1")


def _logit_diff(ckpt, ref, seq, seed=0):
    cfg, model = build_loaded(ckpt)
    ids, _ = P.make_batch(cfg.vocab_size, batch=2, seq=seq, seed=seed, pad_token_id=cfg.pad_token_id)
    with torch.no_grad():
        want = ref(ids).logits
    return (P.megatron_logits(model, ids) - want).abs().max().item()


@pytest.mark.parametrize("seq", [40, 128])
def test_logits_match_reference(tiny_ckpt, reference, seq):
    # 40 > 2x the window (8) and > yarn's original max positions (32); 128 = 4x that.
    diff = _logit_diff(tiny_ckpt, reference, seq)
    print(f"\nfp32 seq={seq}: max abs logit diff {diff:.3g}")
    assert diff < LOGIT_TOL


def test_logits_match_reference_mxfp4(tiny_mxfp4_ckpt):
    # Reference dequantized by transformers' own MXFP4 code, ours by gptoss_model.checkpoint.mxfp4.
    ref = load_reference_model(tiny_mxfp4_ckpt)
    diff = _logit_diff(tiny_mxfp4_ckpt, ref, 72)
    print(f"\nMXFP4 seq=72: max abs logit diff {diff:.3g}")
    assert diff < LOGIT_TOL


def test_gradients_match_reference_every_parameter(tiny_ckpt, reference):
    cfg, model = build_loaded(tiny_ckpt)
    ids, labels = P.make_batch(cfg.vocab_size, batch=2, seq=40, seed=3, pad_token_id=cfg.pad_token_id)
    _, ref_loss, ref_grads = P.reference_grads(reference, ids, labels)
    loss = P.megatron_loss_backward(model, ids, labels)
    diffs = P.grad_diffs([model], ref_grads, cfg)
    worst = max(diffs, key=diffs.get)
    print(f"\nworld 1: loss diff {abs(loss - ref_loss).item():.3g}; {len(diffs)} params, "
          f"max grad rel diff {diffs[worst]:.3g} ({worst})")
    assert len(diffs) == sum(1 for _ in model.parameters())
    assert abs(loss - ref_loss).item() < 1e-5
    assert diffs[worst] < GRAD_TOL


# ------------------------------------------------------------------ mutations
def _mutate_transformer_config(monkeypatch, **attrs):
    orig = build.transformer_config

    def mutated(*args, **kwargs):
        tc = orig(*args, **kwargs)
        for k, v in attrs.items():
            setattr(tc, k, v)
        return tc

    monkeypatch.setattr(build, "transformer_config", mutated)


def test_mutation_window_off_by_one_breaks_parity(tiny_ckpt, reference, monkeypatch):
    _mutate_transformer_config(monkeypatch, window_size=(8, 0))  # right: (sliding_window - 1, 0)
    diff = _logit_diff(tiny_ckpt, reference, 40)
    print(f"\nmutation window (W, 0): max abs logit diff {diff:.3g}")
    assert diff > 1000 * LOGIT_TOL


def test_mutation_yarn_rounding_breaks_parity(tiny_ckpt, reference, monkeypatch):
    _mutate_transformer_config(monkeypatch, yarn_correction_range_round_to_int=True)
    diff = _logit_diff(tiny_ckpt, reference, 128)
    print(f"\nmutation yarn rounding: max abs logit diff {diff:.3g}")
    assert diff > 1000 * LOGIT_TOL


def test_mutation_transposed_down_proj_breaks_parity(tiny_square_ckpt, tiny_ckpt, monkeypatch):
    """Square experts (as in the real models): the transposed load fits and only logits tell."""
    monkeypatch.setattr(nm.DOWN_TRANSPOSE, "to_megatron", lambda hf_parts, cfg: hf_parts[0].contiguous())
    ref = load_reference_model(tiny_square_ckpt)
    diff = _logit_diff(tiny_square_ckpt, ref, 40)
    print(f"\nmutation down_proj not transposed (square experts): max abs logit diff {diff:.3g}")
    assert diff > 1000 * LOGIT_TOL
    # Non-square tiny sizes turn the same bug into a loud shape error.
    with pytest.raises(CheckpointError, match=r"linear_fc2\.weight gives shape \[48, 64\].*expects \[64, 48\]"):
        build_loaded(tiny_ckpt)


def test_square_checkpoint_itself_is_in_parity(tiny_square_ckpt):
    ref = load_reference_model(tiny_square_ckpt)
    assert _logit_diff(tiny_square_ckpt, ref, 40) < LOGIT_TOL
