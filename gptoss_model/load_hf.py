"""Stream a Hugging Face GPT-OSS checkpoint into (possibly distributed) megatron model chunks.

Tensor by tensor with safetensors' `safe_open`: each rank reads only the
slices it owns (its TP rows/columns, its EP experts, its PP layers), so host
memory stays at one tensor slice above the model itself. MXFP4 expert
weights (`*_blocks` / `*_scales`, as in the openai repos) are dequantized per
expert on the fly.

Every checkpoint is validated against the config before anything is read: a
missing tensor or a wrong shape fails with the file, the tensor, and the
expected vs found shape.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Iterable

import torch
from safetensors import safe_open

from gptoss_model.errors import PermanentError
from gptoss_model import name_map as nm
from gptoss_model.config import GptOssModelConfig


class CheckpointError(PermanentError, ValueError):
    """The checkpoint does not match its config (missing tensor, wrong shape, bad index)."""


def _fmt(shape) -> str:
    return "[" + ", ".join(str(int(d)) for d in shape) + "]"


_DTYPE_BYTES = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1,
                "BOOL": 1, "F8_E4M3": 1, "F8_E5M2": 1}


def _numel(shape) -> int:
    n = 1
    for d in shape:
        n *= int(d)
    return n


class HFCheckpoint:
    """Read-only view of a HF checkpoint directory (sharded or single-file safetensors).

    `read()` returns tensors in the layout of a bf16 HF checkpoint, whatever the
    storage (plain or MXFP4), optionally just one expert / a row or column range.
    """

    def __init__(self, path: str | Path, cfg: GptOssModelConfig | None = None, *,
                 max_mapped_bytes: int | None = None):
        self.path = Path(path)
        # safetensors mmaps each file; pages a read touched stay resident (and in RSS) until the
        # file is unmapped. With a limit, handles are dropped once that many bytes were read,
        # and a larger tensor is read in row blocks, so a full pass over a 120B checkpoint
        # keeps at most ~limit of it mapped.
        self.max_mapped_bytes = max_mapped_bytes
        self._mapped = 0
        self.cfg = cfg or GptOssModelConfig.from_hf_config(self.path)
        index = self.path / "model.safetensors.index.json"
        if index.is_file():
            self.index_file = index
            try:
                self.file_of = {k: self.path / v for k, v in json.loads(index.read_text())["weight_map"].items()}
            except (KeyError, json.JSONDecodeError) as e:
                raise CheckpointError(f"{index}: unreadable safetensors index ({e})") from e
        else:
            single = self.path / "model.safetensors"
            if not single.is_file():
                raise CheckpointError(f"{self.path}: neither model.safetensors.index.json nor model.safetensors")
            self.index_file = single
            with safe_open(single, "pt") as f:
                self.file_of = {k: single for k in f.keys()}
        self._handles: dict[Path, object] = {}

    # -------------------------------------------------------------- storage
    def _handle(self, file: Path):
        if file not in self._handles:
            if not file.is_file():
                raise CheckpointError(f"{self.index_file} maps tensors to {file.name}, which does not exist")
            self._handles[file] = safe_open(file, "pt")
        return self._handles[file]

    def close(self) -> None:
        self._handles.clear()
        self._mapped = 0

    def _touched(self, t: torch.Tensor) -> torch.Tensor:
        self._mapped += t.numel() * t.element_size()
        if self.max_mapped_bytes is not None and self._mapped >= self.max_mapped_bytes:
            self.close()
        return t

    def is_mxfp4(self, name: str) -> bool:
        return name not in self.file_of and f"{name}_blocks" in self.file_of and f"{name}_scales" in self.file_of

    def _stored_shape(self, name: str) -> tuple[int, ...]:
        return tuple(self._handle(self.file_of[name]).get_slice(name).get_shape())

    def shape(self, name: str) -> tuple[int, ...]:
        """Logical (dequantized, HF bf16 layout) shape."""
        if self.is_mxfp4(name):
            b = self._stored_shape(f"{name}_blocks")  # [E, rows, G, 16]
            return (b[0], b[2] * b[3] * 2, b[1])  # dequantized rows [E, rows, G*32], then transposed
        return self._stored_shape(name)

    def where(self, name: str) -> str:
        key = name if name in self.file_of else f"{name}_blocks"
        return self.file_of[key].name if key in self.file_of else self.index_file.name

    # ----------------------------------------------------------- validation
    def validate(self) -> None:
        expected = nm.expected_hf_shapes(self.cfg)
        problems = []
        for name, want in expected.items():
            if name not in self.file_of and not self.is_mxfp4(name):
                problems.append(f"{self.index_file.name}: tensor {name!r} is missing "
                                f"(expected shape {_fmt(want)})")
                continue
            if self.is_mxfp4(name):
                problems += self._check_mxfp4(name, want)
                continue
            got = self._stored_shape(name)
            if got != want:
                problems.append(f"{self.where(name)}: tensor {name!r} has shape {_fmt(got)}, "
                                f"expected {_fmt(want)}")
        if problems:
            more = f" (+{len(problems) - 10} more)" if len(problems) > 10 else ""
            raise CheckpointError(f"checkpoint {self.path} does not match its config.json: "
                                  + "; ".join(problems[:10]) + more)

    def _check_mxfp4(self, name: str, want: tuple[int, ...]) -> list[str]:
        e, in_f, rows = want
        groups = -(-in_f // 32)
        out = []
        for suffix, shape in (("_blocks", (e, rows, groups, 16)), ("_scales", (e, rows, groups))):
            got = self._stored_shape(name + suffix)
            if got != shape:
                out.append(f"{self.file_of[name + suffix].name}: tensor {name + suffix!r} has shape "
                           f"{_fmt(got)}, expected {_fmt(shape)} (MXFP4 of {_fmt(want)})")
        return out

    # -------------------------------------------------------------- reading
    def read(self, name: str, *, expert: int | None = None, rows: tuple[int, int] | None = None,
             cols: tuple[int, int] | None = None) -> torch.Tensor:
        """One tensor, or one expert of a stacked expert tensor, or a row/column range of it."""
        if self.is_mxfp4(name):
            return self._read_mxfp4(name, expert)
        sl = self._handle(self.file_of[name]).get_slice(name)
        if expert is not None:
            return self._touched(sl[expert])
        if cols is not None:
            return self._touched(sl[:, cols[0]:cols[1]])
        shape = sl.get_shape()
        r0, r1 = rows if rows is not None else (0, shape[0] if shape else 0)
        row_bytes = _numel(shape[1:]) * _DTYPE_BYTES.get(sl.get_dtype(), 4)
        if not shape or self.max_mapped_bytes is None or (r1 - r0) * row_bytes <= self.max_mapped_bytes:
            return self._touched(sl[r0:r1] if shape else sl[:])
        return self._read_rows_bounded(name, r0, r1, max(1, self.max_mapped_bytes // max(row_bytes, 1)))

    def _read_rows_bounded(self, name: str, r0: int, r1: int, step: int) -> torch.Tensor:
        first = self._touched(self._handle(self.file_of[name]).get_slice(name)[r0:min(r1, r0 + step)])
        out = torch.empty((r1 - r0, *first.shape[1:]), dtype=first.dtype)
        out[:first.shape[0]] = first
        del first
        for a in range(r0 + step, r1, step):
            b = min(r1, a + step)
            out[a - r0:b - r0] = self._touched(self._handle(self.file_of[name]).get_slice(name)[a:b])
        return out

    def _read_mxfp4(self, name: str, expert: int | None) -> torch.Tensor:
        from gptoss_model.mxfp4 import dequantize

        blocks = self._handle(self.file_of[f"{name}_blocks"]).get_slice(f"{name}_blocks")
        scales = self._handle(self.file_of[f"{name}_scales"]).get_slice(f"{name}_scales")
        if expert is not None:
            # [rows, G*32] as stored (out x in) -> HF bf16 layout [in, out]
            b, s = self._touched(blocks[expert]), self._touched(scales[expert])
            return dequantize(b, s, dtype=torch.float32).transpose(0, 1)
        return dequantize(blocks[:], scales[:], dtype=torch.float32).transpose(1, 2)

    def read_mxfp4_rows(self, name: str, expert: int, rows: tuple[slice, ...],
                        dtype: torch.dtype = torch.float32, window: tuple[int, int] | None = None) -> torch.Tensor:
        """Expert `expert` of MXFP4 tensor `name`, as its stored [out, in] rows `rows` (concatenated).

        `window` = (a, b) keeps rows a..b-1 of that concatenation (e.g. the gate half of fc1).
        """
        from gptoss_model.mxfp4 import dequantize

        blocks = self._touched(self._handle(self.file_of[f"{name}_blocks"]).get_slice(f"{name}_blocks")[expert])
        scales = self._touched(self._handle(self.file_of[f"{name}_scales"]).get_slice(f"{name}_scales")[expert])
        a, b = window if window is not None else (0, blocks.shape[0])
        picks, start = [], 0
        for r in (range(blocks.shape[0])[r] for r in rows):  # each slice's stored rows, in order
            lo, hi = max(a - start, 0), min(b - start, len(r))
            if lo < hi:
                picks.append(r[lo:hi])
            start += len(r)
        parts = [(blocks[p.start:p.stop:p.step], scales[p.start:p.stop:p.step]) for p in picks]
        out = torch.empty((sum(b.shape[0] for b, _ in parts), blocks.shape[1] * blocks.shape[2] * 2), dtype=dtype)
        start = 0
        for b, s in parts:
            dequantize(b, s, dtype, out=out[start:start + b.shape[0]])
            start += b.shape[0]
        return out

    def unknown_tensors(self) -> list[str]:
        known = set(nm.expected_hf_shapes(self.cfg))
        return sorted(k for k in self.file_of
                      if k not in known and k.removesuffix("_blocks").removesuffix("_scales") not in known)


# --------------------------------------------------------------- into model
def _unwrap(chunk: torch.nn.Module) -> torch.nn.Module:
    while hasattr(chunk, "module"):
        chunk = chunk.module
    return chunk


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
    return (nm.megatron_rows_of_stored(match.rule.kind) is not None and isinstance(ckpt, HFCheckpoint)
            and ckpt.is_mxfp4(match.hf_names()[0]))


def read_for_param(ckpt, match: nm.Match, local_shape, tp_rank: int, tp_size: int,
                   dtype: torch.dtype = torch.float32, rows: tuple[int, int] | None = None) -> torch.Tensor:
    """The tensor this rank's parameter must hold, reading only its slice.

    `dtype` is what MXFP4 experts are dequantized to (exact in bf16 and fp32 alike);
    other tensors come in their stored dtype. `rows` = (a, b) reads only those rows of
    the parameter, where `reads_row_windows` says so (e.g. fc1's gate half).
    """
    cfg, rule = ckpt.cfg, match.rule
    hf = match.hf_names()
    if reads_row_windows(ckpt, match):
        return ckpt.read_mxfp4_rows(hf[0], match.expert, nm.megatron_rows_of_stored(rule.kind), dtype, rows)
    if rows is not None:
        raise ValueError(f"{hf[0]}: reading a row window is only supported for MXFP4 expert weights")
    if rule.kind in nm.EXPERT_KINDS:
        return nm.expert_to_megatron(rule.kind, ckpt.read(hf[0], expert=match.expert))
    if rule.kind in (nm.QKV, nm.QKV_BIAS):
        groups = cfg.num_key_value_heads // tp_size
        g0, g1 = tp_rank * groups, (tp_rank + 1) * groups
        qd, kd = cfg.heads_per_group * cfg.head_dim, cfg.head_dim
        q = ckpt.read(hf[0], rows=(g0 * qd, g1 * qd))
        k = ckpt.read(hf[1], rows=(g0 * kd, g1 * kd))
        v = ckpt.read(hf[2], rows=(g0 * kd, g1 * kd))
        return nm.qkv_to_megatron(q, k, v, cfg.heads_per_group, cfg.head_dim)
    if rule.tp_dim is None or tp_size == 1:
        return ckpt.read(hf[0])
    n = local_shape[rule.tp_dim]
    span = (tp_rank * n, (tp_rank + 1) * n)
    return ckpt.read(hf[0], rows=span) if rule.tp_dim == 0 else ckpt.read(hf[0], cols=span)


class InMemoryCheckpoint:
    """HF-named tensors held in memory, readable like HFCheckpoint (tests, reference gradients)."""

    def __init__(self, tensors: dict[str, torch.Tensor], cfg: GptOssModelConfig):
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


def iter_param_values(model_chunks, source):
    """(local name, param, value this rank's param must hold) for every parameter of the chunks.

    `source` is an HFCheckpoint or InMemoryCheckpoint; only the owned slices are read.
    """
    from megatron.core import parallel_state as ps

    tp_rank, tp_size = ps.get_tensor_model_parallel_rank(), ps.get_tensor_model_parallel_world_size()
    chunks = model_chunks if isinstance(model_chunks, (list, tuple)) else [model_chunks]
    for chunk in chunks:
        for local, global_name, param in _global_names(_unwrap(chunk), source.cfg.num_experts):
            match = nm.match_megatron(global_name, "local") or nm.match_megatron(global_name, "te")
            if match is None:
                raise CheckpointError(f"model parameter {local!r} ({global_name}) has no HF source in "
                                      "gptoss_model.name_map.RULES")
            value = read_for_param(source, match, tuple(param.shape), tp_rank, tp_size)
            if tuple(value.shape) != tuple(param.shape):
                raise CheckpointError(
                    f"{source.where(match.hf_names()[0])}: {list(match.hf_names())} -> {global_name} gives "
                    f"shape {_fmt(value.shape)} for this rank, parameter expects {_fmt(param.shape)} "
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
