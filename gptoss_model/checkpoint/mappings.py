"""The transforms between a Hugging Face GPT-OSS tensor layout and megatron-core's, as objects.

A `ParamMapping` converts one `name_map` rule's HF tensor(s) to its megatron
tensor and back, and says how tensor parallelism splits it and (for MXFP4
expert weights) which stored rows make the megatron tensor. The plain
functions are the transforms themselves; each works on any contiguous slice
of query groups or on one expert, so a loader can transform just what a rank
owns. Why each transform exists: `gptoss_model.checkpoint.name_map`'s docstring.
"""

from __future__ import annotations

import abc
from typing import Sequence

import torch

from gptoss_model.model.config import GptOssModelConfig


# ---------------------------------------------------------------- transforms
# Each works on any contiguous slice of query groups / on one expert, so a
# loader can transform just what a rank owns.
def qkv_to_megatron(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, heads_per_group: int,
                    head_dim: int) -> torch.Tensor:
    """[q; k; v] (grouped-query heads, weight or bias) -> per-group [q.., k, v] rows."""
    groups = k.shape[0] // head_dim
    rest = q.shape[1:]
    q = q.reshape(groups, heads_per_group * head_dim, *rest)
    k = k.reshape(groups, head_dim, *rest)
    v = v.reshape(groups, head_dim, *rest)
    return torch.cat([q, k, v], dim=1).reshape(-1, *rest)


def qkv_from_megatron(qkv: torch.Tensor, heads_per_group: int, head_dim: int):
    rest = qkv.shape[1:]
    per_group = (heads_per_group + 2) * head_dim
    g = qkv.reshape(qkv.shape[0] // per_group, per_group, *rest)
    q, k, v = torch.split(g, [heads_per_group * head_dim, head_dim, head_dim], dim=1)
    return q.reshape(-1, *rest), k.reshape(-1, *rest), v.reshape(-1, *rest)


def gate_up_to_fc1(gate_up: torch.Tensor) -> torch.Tensor:
    """One expert: HF [hidden, 2*inter] (gate/up interleaved) -> megatron fc1 [2*inter, hidden] = [gate; up]."""
    return torch.cat([gate_up[..., 0::2], gate_up[..., 1::2]], dim=-1).transpose(-1, -2).contiguous()


def fc1_to_gate_up(fc1: torch.Tensor) -> torch.Tensor:
    gate, up = fc1.chunk(2, dim=-2)
    return torch.stack([gate, up], dim=-2).flatten(-3, -2).transpose(-1, -2).contiguous()


def gate_up_bias_to_fc1(bias: torch.Tensor) -> torch.Tensor:
    """One expert: HF [2*inter] interleaved -> megatron [gate; up]."""
    return torch.cat([bias[..., 0::2], bias[..., 1::2]], dim=-1)


def fc1_bias_to_gate_up(bias: torch.Tensor) -> torch.Tensor:
    gate, up = bias.chunk(2, dim=-1)
    return torch.stack([gate, up], dim=-1).flatten(-2)


def down_to_fc2(down: torch.Tensor) -> torch.Tensor:
    """One expert: HF [inter, hidden] (x @ W) -> megatron fc2 [hidden, inter] (x @ W.T)."""
    return down.transpose(-1, -2).contiguous()


def fc2_to_down(fc2: torch.Tensor) -> torch.Tensor:
    return fc2.transpose(-1, -2).contiguous()


# ------------------------------------------------------------------ mappings
class ParamMapping(abc.ABC):
    """How one rule's HF tensor(s) become its megatron tensor and back.

    `to_megatron(hf_parts, cfg)` takes the rule's HF tensors in `Rule.hf` order
    (for `per_expert` mappings: one expert's slice of each) and `to_hf(meg, cfg)`
    returns them again. Both work on any contiguous TP slice the mapping's
    `tp_slices` describes, so a loader can transform just what a rank owns.
    """

    per_expert = False  # HF stacks E experts in one tensor; megatron has one tensor per expert
    # MXFP4 stores each expert's weight as [out, in] rows (the transpose of HF's bf16 layout), so
    # some megatron tensors are just a selection of stored rows: a loader can dequantize straight
    # into megatron layout, no transposes. None: no such selection.
    stored_rows: tuple[slice, ...] | None = None

    def __init__(self, tp_dim: int | None = None):
        self.tp_dim = tp_dim  # dim megatron splits across TP ranks (None: replicated)

    @abc.abstractmethod
    def to_megatron(self, hf_parts: Sequence[torch.Tensor], cfg: GptOssModelConfig) -> torch.Tensor:
        """The rule's HF tensors (or one expert's slices of them) -> its megatron tensor."""

    @abc.abstractmethod
    def to_hf(self, meg: torch.Tensor, cfg: GptOssModelConfig) -> tuple[torch.Tensor, ...]:
        """A megatron tensor -> the rule's HF tensors (one expert's slices, for per-expert mappings)."""

    def tp_slices(self, cfg: GptOssModelConfig, local_shape, tp_rank: int, tp_size: int) -> list[dict]:
        """Per HF tensor, the `read(...)` keywords (`rows=`/`cols=` ranges, or none) TP rank `tp_rank` needs."""
        if self.tp_dim is None or tp_size == 1:
            return [{}]
        n = local_shape[self.tp_dim]
        span = (tp_rank * n, (tp_rank + 1) * n)
        return [{"rows": span} if self.tp_dim == 0 else {"cols": span}]

    def __repr__(self) -> str:
        return f"{type(self).__name__}(tp_dim={self.tp_dim})"


class DirectMapping(ParamMapping):
    """Same layout, new name (norms, router, sinks, o_proj, embeddings, lm_head, expert fc2 bias)."""

    def __init__(self, tp_dim: int | None = None, *, per_expert: bool = False):
        super().__init__(tp_dim)
        self.per_expert = per_expert

    def to_megatron(self, hf_parts, cfg):
        return hf_parts[0]

    def to_hf(self, meg, cfg):
        return (meg,)


class QKVMapping(ParamMapping):
    """Separate q/k/v (weights or biases) <-> megatron's per-query-group [q.., k, v] rows.

    TP splits it by whole query groups, so each rank reads the rows of its groups from q, k and v.
    """

    def __init__(self):
        super().__init__(tp_dim=0)

    def to_megatron(self, hf_parts, cfg):
        return qkv_to_megatron(*hf_parts, cfg.heads_per_group, cfg.head_dim)

    def to_hf(self, meg, cfg):
        return qkv_from_megatron(meg, cfg.heads_per_group, cfg.head_dim)

    def tp_slices(self, cfg, local_shape, tp_rank, tp_size):
        groups = cfg.num_key_value_heads // tp_size
        g0, g1 = tp_rank * groups, (tp_rank + 1) * groups
        qd, kd = cfg.heads_per_group * cfg.head_dim, cfg.head_dim
        return [{"rows": (g0 * qd, g1 * qd)}, {"rows": (g0 * kd, g1 * kd)}, {"rows": (g0 * kd, g1 * kd)}]


class GateUpMapping(ParamMapping):
    """One expert: HF gate/up interleaved on the last dim <-> megatron fc1 = [gate; up].

    The weight is also transposed (HF [hidden, 2*inter] for x @ W, megatron [2*inter, hidden]).
    """

    per_expert = True

    def __init__(self, *, bias: bool):
        super().__init__(None)  # experts are never TP-split: expert tensor parallel size 1
        self.bias = bias
        # fc1 = [gate; up] = the even stored rows, then the odd ones
        self.stored_rows = None if bias else (slice(0, None, 2), slice(1, None, 2))

    def to_megatron(self, hf_parts, cfg):
        return gate_up_bias_to_fc1(hf_parts[0]) if self.bias else gate_up_to_fc1(hf_parts[0])

    def to_hf(self, meg, cfg):
        return (fc1_bias_to_gate_up(meg) if self.bias else fc1_to_gate_up(meg),)

    def __repr__(self) -> str:
        return f"GateUpMapping(bias={self.bias})"


class TransposeMapping(ParamMapping):
    """One expert: HF down [inter, hidden] (x @ W) <-> megatron fc2 [hidden, inter] (x @ W.T)."""

    per_expert = True
    stored_rows = (slice(None),)  # fc2 = all stored rows

    def to_megatron(self, hf_parts, cfg):
        return down_to_fc2(hf_parts[0])

    def to_hf(self, meg, cfg):
        return (fc2_to_down(meg),)
