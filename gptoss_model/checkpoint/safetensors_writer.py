"""Write a sharded safetensors checkpoint tensor by tensor, from many processes, without holding a shard.

`safetensors.torch.save_file` needs every tensor of a file at once; a 5 GB
shard would then be 5 GB of RSS. The format does not need that: a file is
an 8-byte little-endian header length, a JSON header giving each tensor's
dtype, shape and byte range, then the bytes back to back. All shapes and
dtypes are known before the first byte (from the model config), so every
shard is created first (header, then its full size), and each tensor, or
each leading-dim slice of one (one expert), is written at its own offset as
soon as it is produced, then dropped. Any process may write any tensor, in
any order: export workers write their layers side by side.

    plan = ShardPlan.make([TensorSpec(name, shape, dtype), ...], max_shard_bytes=5e9)
    files = ShardFiles(out_dir, plan)
    files.create()                                   # model-0000i-of-0000N.safetensors.partial
    writer = files.writer()                          # in each writing process
    writer.write_rows(name, tensor)                  # or (name, one_expert[None], first_row=e)
    writer.sync(); writer.close()
    files.finish()                                   # renamed into place, then the index

Shards are filled in plan order and a new one starts when the next tensor
would exceed the limit (a tensor larger than the limit gets a shard of its
own), which is how `transformers`' `save_pretrained` shards too; the index
is written even for one shard, so every export looks the same. Files are
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
import threading
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


def _evict(fd: int, offset: int = 0, length: int = 0) -> None:
    """Drop clean (fsynced) pages we will not read again: later writes stay fast once the export is
    larger than free RAM (left cached, each new page first has to reclaim one)."""
    if hasattr(os, "posix_fadvise"):
        os.posix_fadvise(fd, offset, length, os.POSIX_FADV_DONTNEED)


class ShardFiles:
    """The plan's shard files, written at known offsets by any number of processes, in any order."""

    def __init__(self, out_dir: str | Path, plan: ShardPlan):
        self.out_dir, self.plan = Path(out_dir), plan
        self.files = plan.file_names()
        self.headers = [_header(shard) for shard in plan.shards]
        self.sizes = [len(h) + sum(s.nbytes for s in shard) for h, shard in zip(self.headers, plan.shards)]
        self.specs: dict[str, TensorSpec] = {}
        self.locations: dict[str, tuple[int, int]] = {}  # name -> (shard, file offset of its first byte)
        for i, shard in enumerate(plan.shards):
            offset = len(self.headers[i])
            for spec in shard:
                self.specs[spec.name], self.locations[spec.name] = spec, (i, offset)
                offset += spec.nbytes

    def partial(self, shard: int) -> Path:
        return self.out_dir / (self.files[shard] + ".partial")

    def create(self, keep_existing: bool = False) -> None:
        """Each shard as `<file>.partial`: its header, then zeros up to its full size (sparse).

        `keep_existing`: a partial file of the right header and size stays as it is (a resumed export)."""
        self.out_dir.mkdir(parents=True, exist_ok=True)
        if keep_existing:  # an earlier `finish` may have begun: the directory is not complete again until it ends
            (self.out_dir / INDEX_FILE).unlink(missing_ok=True)
        for i, header in enumerate(self.headers):
            path, final = self.partial(i), self.out_dir / self.files[i]
            if keep_existing and not path.exists() and final.is_file() and final.stat().st_size == self.sizes[i]:
                os.replace(final, path)  # renamed by that `finish`: its bytes are done, keep them
            if keep_existing and path.is_file() and path.stat().st_size == self.sizes[i]:
                with open(path, "rb") as f:
                    if f.read(len(header)) == header:
                        continue
            with open(path, "wb") as f:
                f.write(header)
                f.truncate(self.sizes[i])

    def writer(self) -> "ShardWriter":
        return ShardWriter(self)

    def finish(self) -> None:
        """fsync and rename every shard into place, then write the index: the export is complete."""
        for i, name in enumerate(self.files):
            part = self.partial(i)
            fd = os.open(part, os.O_RDONLY)
            try:
                if os.fstat(fd).st_size != self.sizes[i]:
                    raise SafetensorsWriteError(f"{part}: {os.fstat(fd).st_size} bytes, the plan says "
                                                f"{self.sizes[i]}")
                os.fsync(fd)
                _evict(fd)
            finally:
                os.close(fd)
            os.replace(part, self.out_dir / name)
        weight_map = {spec.name: self.files[i] for i, shard in enumerate(self.plan.shards) for spec in shard}
        index = {"metadata": {"total_size": self.plan.total_size},
                 "weight_map": {k: weight_map[k] for k in sorted(weight_map)}}
        tmp = self.out_dir / (INDEX_FILE + ".partial")
        tmp.write_text(json.dumps(index, indent=2) + "\n")
        os.replace(tmp, self.out_dir / INDEX_FILE)


class ShardWriter:
    """One process's handle on the shard files: `write_rows` puts bytes where the plan says they go.

    Every `sync_every` bytes the written ranges are made durable and dropped from the page cache
    in a background thread (the disk works while the caller computes the next tensor); `sync()`
    waits for all of it.
    """

    def __init__(self, files: ShardFiles, sync_every: int = 256 << 20):
        self.files, self.sync_every = files, sync_every
        self._fds: dict[int, int] = {}
        self._written: dict[int, list[tuple[int, int]]] = {}  # shard -> ranges not yet synced and evicted
        self._unsynced = 0
        self._syncing: threading.Thread | None = None
        self._sync_error: list[BaseException] = []
        self.bytes_written = 0

    def write_rows(self, name: str, part: torch.Tensor, first_row: int = 0) -> None:
        """Write `part` as rows `first_row..` of tensor `name` (all of it: `first_row` 0 and its full shape)."""
        spec = self.files.specs.get(name)
        if spec is None:
            raise SafetensorsWriteError(f"tensor {name!r} is not in the shard plan")
        rows = part.shape[0] if part.dim() else 1
        total = spec.shape[0] if spec.shape else 1
        if (part.dtype != spec.dtype or tuple(part.shape[1:]) != tuple(spec.shape[1:])
                or (not spec.shape and part.dim()) or first_row < 0 or first_row + rows > total):
            raise SafetensorsWriteError(f"tensor {name!r}: got {list(part.shape)} {part.dtype} at row {first_row}; "
                                        f"the plan says {list(spec.shape)} {spec.dtype}")
        shard, start = self.files.locations[name]
        offset = start + first_row * (spec.nbytes // total if total else 0)
        data = _tensor_bytes(part)
        fd = self._fd(shard)
        done = 0
        while done < len(data):
            done += os.pwrite(fd, data[done:], offset + done)
        self._written.setdefault(shard, []).append((offset, len(data)))
        self.bytes_written += len(data)
        self._unsynced += len(data)
        if self._unsynced >= self.sync_every:
            self._start_sync()

    def _fd(self, shard: int) -> int:
        if shard not in self._fds:
            self._fds[shard] = os.open(self.files.partial(shard), os.O_WRONLY)
        return self._fds[shard]

    def _start_sync(self) -> None:
        self._wait_sync()
        batch = [(self._fds[shard], ranges) for shard, ranges in self._written.items()]
        self._written, self._unsynced = {}, 0

        def run() -> None:
            try:
                for fd, ranges in batch:
                    os.fdatasync(fd)
                    for offset, length in ranges:
                        _evict(fd, offset, length)
            except BaseException as e:  # raised by the next sync()/write in the writing thread
                self._sync_error.append(e)

        self._syncing = threading.Thread(target=run, name="shard-sync", daemon=True)
        self._syncing.start()

    def _wait_sync(self) -> None:
        if self._syncing is not None:
            self._syncing.join()
            self._syncing = None
        if self._sync_error:
            raise self._sync_error.pop()

    def sync(self) -> None:
        """Make everything written so far durable, and drop it from the page cache."""
        self._start_sync()
        self._wait_sync()

    def close(self) -> None:
        try:
            self._wait_sync()
        finally:
            fds, self._fds = self._fds, {}
            for fd in fds.values():
                os.close(fd)
