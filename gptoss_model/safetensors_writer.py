"""Write a sharded safetensors checkpoint tensor by tensor, without holding a shard in memory.

`safetensors.torch.save_file` needs every tensor of a file at once; a 5 GB
shard would then be 5 GB of RSS. The format does not need that: a file is
an 8-byte little-endian header length, a JSON header giving each tensor's
dtype, shape and byte range, then the bytes back to back. All shapes and
dtypes are known before the first byte (from the model config), so the
header of every shard is written first and each tensor is appended as soon
as it is produced, then dropped. Peak memory is one tensor, or one part of
one: `write_rows` appends a tensor in leading-dim slices (one expert at a time).

    plan = ShardPlan.make([TensorSpec(name, shape, dtype), ...], max_shard_bytes=5e9)
    with ShardedSafetensorsWriter(out_dir, plan) as w:
        for name, tensor in produce():   # in plan order
            w.write(name, tensor)
    # -> model-00001-of-0000N.safetensors ..., model.safetensors.index.json

Shards are filled in plan order and a new one starts when the next tensor
would exceed the limit (a tensor larger than the limit gets a shard of its
own), which is how `transformers`' `save_pretrained` shards too; the index
is written even for one shard, so every export looks the same. A file is
written under a temporary name, fsynced and renamed once complete, and the
index is written last, so a directory with an index is a complete checkpoint.
The header is what `safetensors` itself writes (keys sorted, `__metadata__`
`{"format": "pt"}`, padded with spaces to 8 bytes), so the files load with
`safe_open` and `transformers`.
"""

from __future__ import annotations

import json
import os
import struct
from dataclasses import dataclass
from pathlib import Path

import torch

INDEX_FILE = "model.safetensors.index.json"

_DTYPE_NAMES = {torch.float32: "F32", torch.bfloat16: "BF16", torch.float16: "F16", torch.uint8: "U8",
                torch.int8: "I8", torch.int32: "I32", torch.int64: "I64", torch.float64: "F64", torch.bool: "BOOL"}


class SafetensorsWriteError(RuntimeError):
    """A tensor came out of order, with the wrong shape/dtype, or a shard was left incomplete."""


@dataclass(frozen=True)
class TensorSpec:
    name: str
    shape: tuple[int, ...]
    dtype: torch.dtype

    @property
    def nbytes(self) -> int:
        n = 1
        for d in self.shape:
            n *= int(d)
        return n * self.dtype.itemsize


@dataclass(frozen=True)
class ShardPlan:
    shards: tuple[tuple[TensorSpec, ...], ...]

    @classmethod
    def make(cls, specs: list[TensorSpec], max_shard_bytes: int) -> "ShardPlan":
        if max_shard_bytes <= 0:
            raise ValueError(f"max_shard_bytes must be positive, got {max_shard_bytes}")
        names = [s.name for s in specs]
        if len(set(names)) != len(names):
            raise ValueError("duplicate tensor names in the shard plan")
        shards: list[list[TensorSpec]] = [[]]
        size = 0
        for spec in specs:
            if shards[-1] and size + spec.nbytes > max_shard_bytes:
                shards.append([])
                size = 0
            shards[-1].append(spec)
            size += spec.nbytes
        return cls(tuple(tuple(s) for s in shards if s))

    @property
    def total_size(self) -> int:
        return sum(s.nbytes for shard in self.shards for s in shard)

    def file_names(self) -> list[str]:
        n = len(self.shards)
        return [f"model-{i:05d}-of-{n:05d}.safetensors" for i in range(1, n + 1)]


def _header(shard: tuple[TensorSpec, ...]) -> bytes:
    entries, offset = {}, 0
    for spec in shard:  # data in plan order; keys in the JSON are sorted, as safetensors writes them
        entries[spec.name] = {"dtype": _DTYPE_NAMES[spec.dtype], "shape": [int(d) for d in spec.shape],
                              "data_offsets": [offset, offset + spec.nbytes]}
        offset += spec.nbytes
    header = {"__metadata__": {"format": "pt"}, **{k: entries[k] for k in sorted(entries)}}
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    return struct.pack("<Q", len(raw)) + raw


def _tensor_bytes(t: torch.Tensor) -> memoryview:
    t = t.detach().contiguous()
    return memoryview(t.view(torch.uint8).reshape(-1).numpy()) if t.numel() else memoryview(b"")


class ShardedSafetensorsWriter:
    """Append tensors in plan order; shards are closed (fsynced, renamed) as they fill up."""

    def __init__(self, out_dir: str | Path, plan: ShardPlan, *, evict_page_cache: bool = True):
        self.out_dir, self.plan = Path(out_dir), plan
        self.files = plan.file_names()
        self.evict_page_cache = evict_page_cache
        self._order = [(i, spec) for i, shard in enumerate(plan.shards) for spec in shard]
        self._next = 0
        self._fh = None
        self._shard = -1
        self._rows = 0  # rows of the current tensor written so far (write_rows)
        self.bytes_written = 0

    def __enter__(self) -> "ShardedSafetensorsWriter":
        self.out_dir.mkdir(parents=True, exist_ok=True)
        return self

    def __exit__(self, exc_type, *exc) -> None:
        if exc_type is None:
            self.close()
        elif self._fh is not None:  # leave no half-written shard behind under its final name
            self._fh.close()
            Path(self._fh.name).unlink(missing_ok=True)
            self._fh = None

    def _open(self, shard: int) -> None:
        self._finish_shard()
        self._shard = shard
        part = self.out_dir / (self.files[shard] + ".partial")
        self._fh = open(part, "wb")
        self._fh.write(_header(self.plan.shards[shard]))

    def _finish_shard(self) -> None:
        if self._fh is None:
            return
        self._fh.flush()
        os.fsync(self._fh.fileno())
        part = Path(self._fh.name)
        self._fh.close()
        self._fh = None
        final = self.out_dir / self.files[self._shard]
        os.replace(part, final)
        if self.evict_page_cache and hasattr(os, "posix_fadvise"):
            # Clean (fsynced) pages we will not read again: dropping them keeps later writes fast
            # once the export is larger than free RAM.
            fd = os.open(final, os.O_RDONLY)
            try:
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            finally:
                os.close(fd)

    def write(self, name: str, tensor: torch.Tensor) -> None:
        """Append the whole tensor `name` (the next one in plan order)."""
        self.write_rows(name, tensor, rows=tensor.shape[0] if tensor.dim() else None)

    def write_rows(self, name: str, part: torch.Tensor, rows: int | None) -> None:
        """Append `rows` leading-dim rows of tensor `name` (e.g. one expert of a stacked expert tensor).

        The parts of one tensor come in order; the next tensor may start once its rows are all written.
        """
        if self._next >= len(self._order):
            raise SafetensorsWriteError(f"tensor {name!r} is not in the shard plan (all tensors already written)")
        shard, spec = self._order[self._next]
        if name != spec.name:
            raise SafetensorsWriteError(f"expected tensor {spec.name!r} next, got {name!r}")
        want = tuple(spec.shape) if rows is None else (rows, *spec.shape[1:])
        if tuple(part.shape) != want or part.dtype != spec.dtype or self._rows + (rows or 0) > (
                spec.shape[0] if spec.shape else 0):
            raise SafetensorsWriteError(f"tensor {name!r}: got {list(part.shape)} {part.dtype} after "
                                        f"{self._rows} rows; the plan says {list(spec.shape)} {spec.dtype}")
        if shard != self._shard:
            self._open(shard)
        self._fh.write(_tensor_bytes(part))
        self._rows += rows or 0
        if rows is None or self._rows == spec.shape[0]:
            self.bytes_written += spec.nbytes
            self._next += 1
            self._rows = 0

    def close(self) -> None:
        if self._next != len(self._order):
            missing = [s.name for _, s in self._order[self._next:self._next + 3]]
            raise SafetensorsWriteError(f"{len(self._order) - self._next} tensors never written, from {missing}")
        self._finish_shard()
        weight_map = {spec.name: self.files[i] for i, spec in self._order}
        index = {"metadata": {"total_size": self.plan.total_size},
                 "weight_map": {k: weight_map[k] for k in sorted(weight_map)}}
        tmp = self.out_dir / (INDEX_FILE + ".partial")
        tmp.write_text(json.dumps(index, indent=2) + "\n")
        os.replace(tmp, self.out_dir / INDEX_FILE)
