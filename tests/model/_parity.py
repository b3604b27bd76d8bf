"""Parity helpers shared by the in-process tests and the torchrun worker.

The reference is transformers' GptOssForCausalLM (eager attention, fp32).
Gradients are compared per parameter on each rank's own slice: the HF
reference gradients are sliced exactly as the loader slices weights
(`iter_param_values` over an InMemoryCheckpoint), so TP/PP/EP layouts need
no gathering.
"""

from __future__ import annotations

from functools import partial

import torch
import torch.nn.functional as F

from gptoss_model.checkpoint.load_hf import iter_param_values


class InMemoryCheckpoint:
    """HF-named tensors held in memory, read like HFCheckpoint (the reference gradients)."""

    def __init__(self, tensors: dict[str, torch.Tensor], cfg):
        self.tensors, self.cfg = tensors, cfg

    def read(self, name, *, expert=None, rows=None, cols=None) -> torch.Tensor:
        t = self.tensors[name]
        if expert is not None:
            return t[expert]
        if rows is not None:
            return t[rows[0]:rows[1]]
        if cols is not None:
            return t[:, cols[0]:cols[1]]
        return t

    def where(self, name: str) -> str:
        return "<memory>"


def make_batch(vocab_size: int, batch: int = 2, seq: int = 40, seed: int = 0, pad_token_id: int | None = 0):
    """Random ids and labels. The pad id never appears as an input: transformers builds
    embed_tokens with padding_idx=pad_token_id, so the reference never gives that row a
    gradient, while megatron (rightly, for training) does."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, vocab_size, (batch, seq), generator=g)
    if pad_token_id is not None:
        ids[ids == pad_token_id] = (pad_token_id + 1) % vocab_size
    labels = torch.randint(0, vocab_size, (batch, seq), generator=g)
    return ids, labels


def reference_grads(ref, ids, labels):
    """Logits, loss (mean token CE over the whole batch) and {HF name: grad}."""
    ref.zero_grad(set_to_none=True)
    logits = ref(ids).logits
    loss = F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), labels.reshape(-1))
    loss.backward()
    grads = {n: p.grad.detach().clone() for n, p in ref.named_parameters()}
    ref.zero_grad(set_to_none=True)
    return logits.detach(), loss.detach(), grads


def megatron_logits(model, ids):
    pos = torch.arange(ids.shape[1]).expand_as(ids)
    with torch.no_grad():
        return model(ids, pos, None)


def megatron_loss_backward(model, ids, labels):
    """World-1 (no pipeline schedule) forward+backward; grads land in .grad / .main_grad."""
    pos = torch.arange(ids.shape[1]).expand_as(ids)
    loss = model(ids, pos, None, labels=labels).float().mean()
    loss.backward()
    return loss.detach()


def _loss_func(output_tensor):
    loss = output_tensor.float().mean()
    return loss, {"loss": loss.detach()}


def schedule_forward_backward(chunks, ids, labels):
    """One training micro-batch through megatron's pipeline schedule + finalize_model_grads."""
    from megatron.core.distributed import finalize_model_grads
    from megatron.core.pipeline_parallel import get_forward_backward_func
    from megatron.core import parallel_state as ps

    def forward_step(data_iterator, model):
        b_ids, b_labels = next(data_iterator)
        pos = torch.arange(b_ids.shape[1]).expand_as(b_ids)
        return model(b_ids, pos, None, labels=b_labels), partial(_loss_func)

    for c in chunks:
        c.zero_grad_buffer()
    seq = ids.shape[1]
    losses = get_forward_backward_func()(
        forward_step_func=forward_step, data_iterator=iter([(ids, labels)]), model=chunks,
        num_microbatches=1, seq_length=seq, micro_batch_size=ids.shape[0], forward_only=False)
    finalize_model_grads(chunks)
    loss = losses[0]["loss"] if ps.is_pipeline_last_stage() else None
    return loss


def grad_diffs(chunks, ref_grads: dict, cfg) -> dict[str, float]:
    """Per local parameter: max|g - g_ref| / max|g_ref| on this rank's slice.

    Parameters whose reference grad is exactly zero (an expert no token chose)
    must be exactly zero too; they report 0 or inf.
    """
    out = {}
    for name, param, want in iter_param_values(chunks, InMemoryCheckpoint(ref_grads, cfg)):
        got = getattr(param, "main_grad", None)
        if got is None:
            got = param.grad
        got = torch.zeros_like(param) if got is None else got.detach().float()
        scale = want.abs().max().item()
        err = (got - want.float()).abs().max().item()
        out[name] = err / scale if scale > 0 else (0.0 if err == 0 else float("inf"))
    return out


def dp_slice(ids, labels):
    """This rank's data-parallel share of the batch (rows)."""
    from megatron.core import parallel_state as ps

    dp, r = ps.get_data_parallel_world_size(), ps.get_data_parallel_rank()
    n = ids.shape[0] // dp
    return ids[r * n:(r + 1) * n], labels[r * n:(r + 1) * n]


def tp_vocab_slice(ref_logits):
    """The vocab columns of the reference logits this TP rank's (parallel_output) logits hold."""
    from megatron.core import parallel_state as ps

    tp, r = ps.get_tensor_model_parallel_world_size(), ps.get_tensor_model_parallel_rank()
    v = ref_logits.shape[-1] // tp
    return ref_logits[..., r * v:(r + 1) * v]
