"""Load a Hugging Face GPT-OSS checkpoint into (possibly distributed) megatron model chunks.

Each rank reads only the slices it owns: its TP rows/columns (as each
`name_map` rule's mapping splits them), its EP experts, its PP layers; its
parameters' PP-local layer and EP-local expert indices are made global to
find their rule. Host memory stays at one tensor slice above the model
itself. Reading and validating the safetensors files is
`gptoss_model.checkpoint.hf_reader`'s job.
"""

from __future__ import annotations

from pathlib import Path
from typing import Iterable

import torch

from gptoss_model.checkpoint import name_map as nm
from gptoss_model.model.config import GptOssModelConfig
from gptoss_model.checkpoint.hf_reader import CheckpointError, HFCheckpoint, format_shape
from gptoss_model.model.parallel import unwrap_model

__all__ = ["CheckpointError", "HFCheckpoint", "iter_param_values", "load_hf_weights", "read_for_param",
           "reads_row_windows"]


def _global_names(model: torch.nn.Module, num_experts: int) -> Iterable[tuple[str, str, torch.nn.Parameter]]:
    """(local name, global unsharded name, param): PP-local layer and EP-local expert indices made global."""
    from megatron.core import parallel_state as ps

    layer_of = {}
    if getattr(model, "decoder", None) is not None:
        layer_of = {str(i): str(layer.layer_number - 1) for i, layer in enumerate(model.decoder.layers)}
    ep_rank, ep_size = ps.get_expert_model_parallel_rank(), ps.get_expert_model_parallel_world_size()
    per_rank = num_experts // ep_size
    for name, p in model.named_parameters():
        parts = name.split(".")
        if name.startswith("decoder.layers."):
            parts[2] = layer_of[parts[2]]
        if "experts" in parts:
            i = parts.index("experts")
            if parts[i + 1] == "local_experts":  # local spec: local_experts.{j}.
                parts[i + 2] = str(ep_rank * per_rank + int(parts[i + 2]))
            else:  # TE grouped: linear_fc1.weight{j}
                stem = parts[-1].rstrip("0123456789")
                parts[-1] = stem + str(ep_rank * per_rank + int(parts[-1][len(stem):]))
        yield name, ".".join(parts), p


def reads_row_windows(ckpt, match: nm.Match) -> bool:
    """Whether read_for_param can read just some rows of this (world-1) parameter."""
    return (match.rule.mapping.stored_rows is not None and isinstance(ckpt, HFCheckpoint)
            and ckpt.is_mxfp4(match.hf_names()[0]))


def read_for_param(ckpt, match: nm.Match, local_shape=None, *, tp_rank: int, tp_size: int,
                   dtype: torch.dtype = torch.float32, rows: tuple[int, int] | None = None) -> torch.Tensor:
    """The tensor TP rank `tp_rank` of `tp_size` must hold in this parameter, reading only its slice.

    `ckpt` is anything with HFCheckpoint's `read(name, expert=, rows=, cols=)` and `cfg`.
    `local_shape` is the parameter's shape on this rank (needed where TP splits it).
    `dtype` is what MXFP4 experts are dequantized to (exact in bf16 and fp32 alike);
    other tensors come in their stored dtype. `rows` = (a, b) reads only those rows of
    the parameter, where `reads_row_windows` says so (e.g. fc1's gate half).
    """
    mapping, hf = match.rule.mapping, match.hf_names()
    if reads_row_windows(ckpt, match):
        return ckpt.read_mxfp4_rows(hf[0], match.expert, mapping.stored_rows, dtype, rows)
    if rows is not None:
        raise ValueError(f"{hf[0]}: reading a row window is only supported for MXFP4 expert weights")
    if mapping.per_expert:
        return mapping.to_megatron([ckpt.read(n, expert=match.expert) for n in hf], ckpt.cfg)
    slices = mapping.tp_slices(ckpt.cfg, local_shape, tp_rank, tp_size)
    return mapping.to_megatron([ckpt.read(n, **where) for n, where in zip(hf, slices)], ckpt.cfg)


def iter_param_values(model_chunks, source):
    """(local name, param, value this rank's param must hold) for every parameter of the chunks.

    `source` is an HFCheckpoint (or anything that reads like one); only the owned slices are read.
    """
    from megatron.core import parallel_state as ps

    tp_rank, tp_size = ps.get_tensor_model_parallel_rank(), ps.get_tensor_model_parallel_world_size()
    chunks = model_chunks if isinstance(model_chunks, (list, tuple)) else [model_chunks]
    for chunk in chunks:
        for local, global_name, param in _global_names(unwrap_model(chunk), source.cfg.num_experts):
            match = nm.match_megatron(global_name, "local") or nm.match_megatron(global_name, "te")
            if match is None:
                raise CheckpointError(f"model parameter {local!r} ({global_name}) has no HF source in "
                                      "gptoss_model.checkpoint.name_map.RULES")
            value = read_for_param(source, match, tuple(param.shape), tp_rank=tp_rank, tp_size=tp_size)
            if tuple(value.shape) != tuple(param.shape):
                raise CheckpointError(
                    f"{source.where(match.hf_names()[0])}: {list(match.hf_names())} -> {global_name} gives "
                    f"shape {format_shape(value.shape)} for this rank, parameter expects {format_shape(param.shape)} "
                    f"(TP {tp_rank}/{tp_size})")
            yield local, param, value


@torch.no_grad()
def load_hf_weights(model_chunks, checkpoint: str | Path | HFCheckpoint,
                    cfg: GptOssModelConfig | None = None) -> dict:
    """Copy HF weights into every parameter of `model_chunks` (this rank's part only).

    Returns {"loaded": n_params, "bytes": n_bytes_read, "unknown_tensors": [...]}.
    """
    ckpt = checkpoint if isinstance(checkpoint, HFCheckpoint) else HFCheckpoint(checkpoint, cfg)
    ckpt.validate()
    loaded = nbytes = 0
    for _, param, value in iter_param_values(model_chunks, ckpt):
        param.copy_(value.to(param.dtype))
        loaded += 1
        nbytes += value.numel() * value.element_size()
    ckpt.close()
    return {"loaded": loaded, "bytes": nbytes, "unknown_tensors": ckpt.unknown_tensors()}
