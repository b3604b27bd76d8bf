"""LoRA and DoRA on megatron-core's parallel linears (attention and every expert).

The adapter math lives here and nowhere else; export merges adapters into
base weights with `merged_weight`.

For a base linear y = x W^T + b (W: [out, in]), scale s = alpha / dim:
  LoRA  y = x W^T + s * (x A^T) B^T + b
  DoRA  y = (m / ||W + s B A||_row) * (x W^T + s * (x A^T) B^T) + b
        where the row norm (over `in`, one per output feature) is treated as a
        constant in backward (the DoRA paper's memory-saving choice) and the
        magnitude m starts as ||W||_row, so a fresh adapter changes nothing.
A: [dim, in], Kaiming-uniform; B: [out, dim], zeros. Base weights are frozen.

Adapter checkpoint layout: an adapter is a submodule `adapter` of the linear it
adapts, so its tensors are named after the base weight's module, with the
model's global numbering (dist_checkpointing keys, any TP/PP/EP layout):
  decoder.layers.{L}.self_attention.linear_qkv.adapter.lora_a      [dim, in]
  decoder.layers.{L}.self_attention.linear_qkv.adapter.lora_b      [out, dim]
  decoder.layers.{L}.self_attention.linear_proj.adapter.{lora_a,lora_b}
  decoder.layers.{L}.mlp.experts.local_experts.{E}.linear_fc1.adapter.{lora_a,lora_b}
  decoder.layers.{L}.mlp.experts.local_experts.{E}.linear_fc2.adapter.{lora_a,lora_b}
  ... .adapter.dora_magnitude  [out]   (DoRA only)
stored in an `iter_XXXXXXX/` like any training checkpoint, under "model", with
"peft": {"method", "dim", "alpha", "target_modules"} in the common state. The
base weight of `X.adapter.*` is `X.weight` of the base checkpoint.

Tensor parallel (attention only; experts run at expert-TP 1): linear_qkv is
column-parallel, so A is replicated and B split on `out`; linear_proj is
row-parallel, so A is split on `in` and B replicated. With sequence
parallelism the adapter path gathers / reduce-scatters the sequence exactly
like its base, and replicated adapter tensors are tagged so that
finalize_model_grads sums their partial gradients over the TP ranks; split ones carry
megatron's tensor-parallel attributes so the gradient norm counts every shard.
"""

from __future__ import annotations

import math
import types
import zlib

import torch

from gptoss_model.model.config import PeftConfig


# ---------------------------------------------------------------- merge (export)
def merged_weight(weight: torch.Tensor, adapter: dict[str, torch.Tensor], alpha: float, dim: int) -> torch.Tensor:
    """The fp32 weight [out, in] that computes what base `weight` + this adapter computes.

    `adapter` holds `lora_a` [dim, in], `lora_b` [out, dim] and, for DoRA, `dora_magnitude` [out]
    (full, unsharded tensors: the layout described in the module docstring).
    """
    w = weight.float() + (alpha / dim) * (adapter["lora_b"].float() @ adapter["lora_a"].float())
    if "dora_magnitude" in adapter:
        w = w * (adapter["dora_magnitude"].float() / w.norm(dim=1)).unsqueeze(1)
    return w


# ----------------------------------------------------------------- the module
class Adapter(torch.nn.Module):
    """LoRA (or DoRA) tensors of one parallel linear, local shards."""

    def __init__(self, base, cfg: PeftConfig, *, parallel: str, tp_size: int, tp_rank: int,
                 init_key: str, seed: int):
        super().__init__()
        self.method, self.scale = cfg.method, cfg.alpha / cfg.dim
        self.parallel, self.tp_size = parallel, tp_size
        self.dropout = torch.nn.Dropout(cfg.dropout) if cfg.dropout > 0 else None
        out_local, in_local = base.weight.shape
        in_full = in_local * tp_size if parallel == "row" else in_local
        dtype = base.weight.dtype
        # Initialised on the full shape from a key-derived seed and then sliced: the same
        # adapter on any TP/PP/EP layout and any rank.
        gen = torch.Generator().manual_seed(seed ^ zlib.crc32(init_key.encode()))
        a = torch.empty(cfg.dim, in_full, dtype=torch.float32)
        bound = 1.0 / math.sqrt(in_full)  # kaiming_uniform_(a=sqrt(5)), as nn.Linear / PEFT
        a.uniform_(-bound, bound, generator=gen)
        if parallel == "row":
            a = a.chunk(tp_size, dim=1)[tp_rank]
        self.lora_a = torch.nn.Parameter(a.to(dtype).contiguous().to(base.weight.device))
        self.lora_b = torch.nn.Parameter(torch.zeros(out_local, cfg.dim, dtype=dtype, device=base.weight.device))
        if cfg.method == "dora":
            with torch.no_grad():
                norm = self._row_norm(base.weight.float(), torch.zeros(()))
            self.dora_magnitude = torch.nn.Parameter(norm.to(dtype))

    def _row_norm(self, weight: torch.Tensor, delta: torch.Tensor) -> torch.Tensor:
        sq = (weight + delta).pow(2).sum(dim=1)
        if self.parallel == "row" and self.tp_size > 1:  # `in` is split: sum the partial squares
            from megatron.core import parallel_state as ps

            torch.distributed.all_reduce(sq, group=ps.get_tensor_model_parallel_group())
        return sq.sqrt()

    def lora(self, x: torch.Tensor, sequence_parallel: bool) -> torch.Tensor:
        """s * (x A^T) B^T with the same TP/SP communication as the base linear."""
        from megatron.core.tensor_parallel import mappings as mp

        if self.dropout is not None:
            x = self.dropout(x)
        if self.parallel == "column" and self.tp_size > 1:
            x = (mp.gather_from_sequence_parallel_region(x) if sequence_parallel
                 else mp.copy_to_tensor_model_parallel_region(x))
        h = x @ self.lora_a.t()
        if self.parallel == "row" and self.tp_size > 1:
            h = (mp.reduce_scatter_to_sequence_parallel_region(h) if sequence_parallel
                 else mp.reduce_from_tensor_model_parallel_region(h))
        return (h @ self.lora_b.t()) * self.scale

    def dora_scale(self, weight: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            norm = self._row_norm(weight.float(), self.scale * (self.lora_b.float() @ self.lora_a.float()))
        return self.dora_magnitude / norm.to(self.dora_magnitude.dtype)


def _adapted_forward(self, input_, *args, **kwargs):
    out, out_bias = self._gptoss_base_forward(input_, *args, **kwargs)
    ad: Adapter = self.adapter
    delta = ad.lora(input_, self._gptoss_sp)
    if ad.method != "dora":
        return out + delta, out_bias
    # The base output includes its bias unless the linear returns it separately.
    bias_inside = out_bias is None and getattr(self, "bias", None) is not None
    no_bias = out - self.bias if bias_inside else out
    scaled = ad.dora_scale(self.weight) * (no_bias + delta)
    return (scaled + self.bias if bias_inside else scaled), out_bias


def _adapted_sharded_state_dict(self, prefix="", sharded_offsets=(), metadata=None):
    """The base layer's sharding plus the adapter's (split on the same axis as the base weight)."""
    from megatron.core.transformer.utils import make_sharded_tensors_for_checkpoint

    axis_map = ({"weight": 0, "bias": 0, "adapter.lora_b": 0, "adapter.dora_magnitude": 0}
                if self.adapter.parallel == "column" else {"weight": 1, "adapter.lora_a": 1})
    return make_sharded_tensors_for_checkpoint(
        self.state_dict(prefix="", keep_vars=True), prefix, axis_map, sharded_offsets,
        tp_group=self.tp_group, dp_cp_group=(metadata or {}).get("dp_cp_group"))


# -------------------------------------------------------------- apply to model
def _global_key(model, name: str) -> str:
    """`decoder.layers.{local}.…local_experts.{local}…` -> the globally numbered name."""
    from megatron.core import parallel_state as ps

    parts = name.split(".")
    if parts[:2] == ["decoder", "layers"]:
        layer = model.decoder.layers[int(parts[2])]
        parts[2] = str(layer.layer_number - 1)
        if "local_experts" in parts:
            i = parts.index("local_experts") + 1
            n_local = len(layer.mlp.experts.local_experts)
            parts[i] = str(ps.get_expert_model_parallel_rank() * n_local + int(parts[i]))
    return ".".join(parts)


def apply_adapters(model: torch.nn.Module, cfg: PeftConfig, seed: int = 1234) -> list[str]:
    """Freeze `model` and add an adapter to every targeted linear; returns their global names."""
    from megatron.core.tensor_parallel.layers import (ColumnParallelLinear, RowParallelLinear,
                                                      set_tensor_model_parallel_attributes)

    for p in model.parameters():
        p.requires_grad = False
    targets = set(cfg.target_modules)
    adapted = []
    for name, module in list(model.named_modules()):
        if name.rsplit(".", 1)[-1] not in targets:
            continue
        if not isinstance(module, (ColumnParallelLinear, RowParallelLinear)):
            raise TypeError(f"peft.target_modules: {name} is a {type(module).__name__}, "
                            "not a megatron-core parallel linear")
        parallel = "column" if isinstance(module, ColumnParallelLinear) else "row"
        is_expert = getattr(module, "is_expert", False)
        group = module.tp_group
        tp_size, tp_rank = (1, 0) if is_expert else (group.size(), group.rank())
        key = _global_key(model, name)
        module.adapter = Adapter(module, cfg, parallel=parallel, tp_size=tp_size, tp_rank=tp_rank,
                                 init_key=key, seed=seed)
        module._gptoss_sp = bool(getattr(module, "sequence_parallel", False)) and not is_expert
        for pname, p in module.adapter.named_parameters():
            # Expert adapters are expert params (reduced over expert-DP, like their base).
            p.allreduce = getattr(module.weight, "allreduce", True)
            replicated = (parallel == "column" and pname == "lora_a") or (
                parallel == "row" and pname in ("lora_b", "dora_magnitude"))
            if tp_size > 1 and replicated:
                # Partial gradients on each TP rank, summed by finalize_model_grads (GPT-OSS
                # always runs TP with SP: MoE requires it).
                p.sequence_parallel = True
            elif tp_size > 1:
                # A TP shard: without the tag the grad-norm (hence clipping) counts only TP
                # rank 0's shard, as megatron treats untagged params as TP duplicates.
                set_tensor_model_parallel_attributes(p, True, 0 if parallel == "column" else 1, 1)
        module._gptoss_base_forward = module.forward
        module.forward = types.MethodType(_adapted_forward, module)
        module.sharded_state_dict = types.MethodType(_adapted_sharded_state_dict, module)
        adapted.append(key)
    if not adapted:
        raise ValueError(f"peft.target_modules={cfg.target_modules}: no such linear in the model")
    return adapted


def is_adapter_key(key: str) -> bool:
    return ".adapter." in key
