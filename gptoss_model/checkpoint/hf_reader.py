"""Read a Hugging Face GPT-OSS safetensors checkpoint, one tensor (or slice) at a time.

`HFCheckpoint` opens sharded or single-file checkpoints lazily with
safetensors' `safe_open`, validates every tensor name and shape against the
config (via `name_map`) before anything is read, and returns tensors in the
layout of a bf16 HF checkpoint whatever the storage: MXFP4 expert weights
(`*_blocks` / `*_scales`, as in the openai repos) are dequantized per expert
on the fly, or as just the stored rows a megatron tensor needs.

Mapped memory is budgeted (`max_mapped_bytes`), so a full pass over a 120B
checkpoint keeps at most that much of it resident. Model-parallel slicing
and renaming live in `gptoss_model.checkpoint.load_hf`.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors import safe_open

from gptoss_model.checkpoint import mxfp4 as mx
from gptoss_model.checkpoint import name_map as nm
from gptoss_model.model.config import GptOssModelConfig
from gptoss_model.errors import PermanentError


class CheckpointError(PermanentError, ValueError):
    """The checkpoint does not match its config (missing tensor, wrong shape, bad index)."""


def format_shape(shape) -> str:
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
            return nm.hf_shape_of_mxfp4(self._stored_shape(f"{name}_blocks"))
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
                                f"(expected shape {format_shape(want)})")
                continue
            if self.is_mxfp4(name):
                problems += self._check_mxfp4(name, want)
                continue
            got = self._stored_shape(name)
            if got != want:
                problems.append(f"{self.where(name)}: tensor {name!r} has shape {format_shape(got)}, "
                                f"expected {format_shape(want)}")
        if problems:
            more = f" (+{len(problems) - 10} more)" if len(problems) > 10 else ""
            raise CheckpointError(f"checkpoint {self.path} does not match its config.json: "
                                  + "; ".join(problems[:10]) + more)

    def _check_mxfp4(self, name: str, want: tuple[int, ...]) -> list[str]:
        out = []
        for stored, shape in zip(mx.mxfp4_pair_names(name), nm.mxfp4_stored_shapes(want)):
            got = self._stored_shape(stored)
            if got != shape:
                out.append(f"{self.file_of[stored].name}: tensor {stored!r} has shape "
                           f"{format_shape(got)}, expected {format_shape(shape)} (MXFP4 of {format_shape(want)})")
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
        blocks = self._handle(self.file_of[f"{name}_blocks"]).get_slice(f"{name}_blocks")
        scales = self._handle(self.file_of[f"{name}_scales"]).get_slice(f"{name}_scales")
        if expert is not None:
            # [rows, G*32] as stored (out x in) -> HF bf16 layout [in, out]
            b, s = self._touched(blocks[expert]), self._touched(scales[expert])
            return mx.dequantize(b, s, dtype=torch.float32).transpose(0, 1)
        return mx.dequantize(blocks[:], scales[:], dtype=torch.float32).transpose(1, 2)

    def read_mxfp4_rows(self, name: str, expert: int, rows: tuple[slice, ...],
                        dtype: torch.dtype = torch.float32, window: tuple[int, int] | None = None) -> torch.Tensor:
        """Expert `expert` of MXFP4 tensor `name`, as its stored [out, in] rows `rows` (concatenated).

        `window` = (a, b) keeps rows a..b-1 of that concatenation (e.g. the gate half of fc1).
        """
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
            mx.dequantize(b, s, dtype, out=out[start:start + b.shape[0]])
            start += b.shape[0]
        return out

    def unknown_tensors(self) -> list[str]:
        known = set(nm.expected_hf_shapes(self.cfg))
        return sorted(k for k in self.file_of
                      if k not in known and k.removesuffix("_blocks").removesuffix("_scales") not in known)
