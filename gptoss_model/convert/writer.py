"""Write the chunks of a conversion plan: in this process or in N worker processes, resumably.

Each chunk is one DCP data file, written by torch's own `FileSystemWriter`
(so the bytes are exactly what `torch.distributed.checkpoint` reads back),
whose planner answers each item's `resolve_data` by reading that one tensor
from the HF safetensors files, transforming it with `name_map` and casting
it: memory held is one megatron tensor plus its HF source, never the model.

Crash safety, per chunk: the file is written into a private temp dir, fsynced,
renamed into the checkpoint, and only then is `{state}/{chunk}.done` (the
chunk's DCP write results) written, atomically. A retry reads the `.done`
files and writes only the other chunks; a half-written file is never renamed
into place.

With N workers, this process writes chunks too, alongside N-1 spawned
processes (`workers`) that import torch and safetensors but not megatron.
"""

from __future__ import annotations

import io
import os
import pickle
import queue
import shutil
import threading
from pathlib import Path
from typing import Callable

import torch

from gptoss_model.convert.plan import Chunk, item_key
from gptoss_model.checkpoint.hf_reader import CheckpointError
from gptoss_model.checkpoint.load_hf import read_for_param, reads_row_windows
from gptoss_model.system.resources import peak_rss_mb
from gptoss_model.system.safe_unpickle import UnsafePickleError, restricted_load_file
from gptoss_model.system.workers import WorkerError, WorkerPool, spread, start_pool

MAPPED_BYTES_LIMIT = 64 * 2**20  # safetensors pages a worker keeps mapped (and reads per piece of a big tensor)


PREFETCH_ITEMS = 2  # items converted ahead of the one being written


def _row_window(src) -> tuple[int, int] | None:
    """(a, b) when the item is rows a..b-1 of its parameter, contiguous; else None."""
    shape, size = src.param_shape, src.size
    if len(size) != len(shape) or size[1:] != shape[1:] or not size:
        return None
    row = 1
    for d in shape[1:]:
        row *= d
    expected_stride, acc = [], 1
    for d in reversed(size):
        expected_stride.insert(0, acc)
        acc *= d
    if tuple(src.stride) != tuple(expected_stride) or src.storage_offset % row:
        return None
    return src.storage_offset // row, src.storage_offset // row + size[0]


class _ChunkPlanner:
    """The one planner method FileSystemWriter.write_data calls: item -> data.

    A reader thread converts the chunk's tensors in plan order (the order the
    writer asks for them), up to PREFETCH_ITEMS ahead, so reading/dequantizing
    overlaps writing: the writer thread mostly waits on the disk, the reader on
    the CPU. Both release the GIL in torch and in file I/O.
    """

    def __init__(self, chunk: Chunk, ckpt, on_item: Callable[[], None] | None):
        self.chunk, self.ckpt, self.on_item = chunk, ckpt, on_item
        self._cached: tuple[str, torch.Tensor] | None = None  # fc1's gate and up halves come in a row
        self._ready: queue.Queue = queue.Queue(maxsize=PREFETCH_ITEMS)
        self._stop = threading.Event()
        self._reader = threading.Thread(target=self._read_all, name=f"convert-read-{chunk.index}", daemon=True)
        self._reader.start()

    def _read_all(self) -> None:
        try:
            with torch.no_grad():
                for item in self.chunk.items:
                    key = item_key(item.index)
                    if key in self.chunk.sources and not self._put((key, self._item_data(item, key), None)):
                        return
        except BaseException as e:  # handed to the writer's thread
            self._put((None, None, e))

    def _item_data(self, item, key) -> torch.Tensor:
        src, dtype = self.chunk.sources[key], item.tensor_data.properties.dtype
        window = _row_window(src)
        if window is not None and reads_row_windows(self.ckpt, src.match):
            # Just this item's rows (fc1's gate or up half): no whole-fc1 tensor, no clone.
            part = read_for_param(self.ckpt, src.match, tp_rank=0, tp_size=1, dtype=dtype, rows=window)
            self._check_shape(src, part, (window[1] - window[0], *src.param_shape[1:]))
        else:
            if self._cached is None or self._cached[0] != src.name:
                self._cached = None  # drop the previous tensor before reading the next
                full = read_for_param(self.ckpt, src.match, src.param_shape, tp_rank=0, tp_size=1,
                                      dtype=dtype).contiguous()
                self._check_shape(src, full, src.param_shape)
                self._cached = (src.name, full)
            full = self._cached[1]
            # The item is a view of the megatron parameter (all of it, or e.g. the gate or
            # up half of a GLU fc1): take the same view of the converted tensor.
            part = full.as_strided(src.size, src.stride, full.storage_offset() + src.storage_offset)
        out = part.to(dtype).reshape(tuple(item.tensor_data.chunk.sizes)).contiguous()
        if out.untyped_storage().nbytes() != out.numel() * out.element_size():
            out = out.clone()  # DCP would clone a view itself, in the writer's thread
        return out

    def _check_shape(self, src, value: torch.Tensor, expected) -> None:
        if tuple(value.shape) != tuple(expected):
            raise CheckpointError(f"{self.ckpt.where(src.match.hf_names()[0])}: {list(src.match.hf_names())} -> "
                                  f"{src.name} gives shape {list(value.shape)}, the model expects "
                                  f"{list(expected)}")

    def _put(self, entry) -> bool:
        while not self._stop.is_set():
            try:
                self._ready.put(entry, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def resolve_data(self, write_item):
        key = item_key(write_item.index)
        if key not in self.chunk.sources:
            return io.BytesIO(self.chunk.byte_data[write_item.index.fqn])
        got, data, error = self._ready.get()
        if error is not None:
            raise error
        if got != key:
            raise WorkerError(f"chunk {self.chunk.index}: the writer asked for {key[0]} but {got[0]} was read "
                              "next; DCP's write order changed")
        if self.on_item is not None:
            self.on_item()
        return data

    def close(self) -> None:
        self._stop.set()
        self._reader.join()


def deterministic_writer(path: Path):
    """torch's FileSystemWriter, one file per plan, fsynced, with no run-specific ids in what it writes."""
    from torch.distributed.checkpoint import FileSystemWriter
    from torch.distributed.checkpoint.metadata import StorageMeta

    class DeterministicWriter(FileSystemWriter):
        # The default StorageMeta holds the absolute path and a random save id; .metadata would
        # then differ between two conversions of the same input.
        def storage_meta(self):
            return StorageMeta(checkpoint_id=None, save_id="gptoss-convert")

    return DeterministicWriter(str(path), single_file_per_rank=True, sync_files=True, thread_count=1)


def _drop_cached_pages(path: Path) -> None:
    """Evict a written (fsynced, so clean) file from the page cache.

    A conversion writes more than RAM holds; left cached, the written pages fill memory
    and every later page allocation first has to reclaim them, which measured 3-4x slower
    writes past the first ~5 GB here. We will not read these pages again.
    """
    if hasattr(os, "posix_fadvise"):
        fd = os.open(path, os.O_RDONLY)
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def write_chunk(chunk: Chunk, ckpt, iter_dir: Path, state_dir: Path,
                on_item: Callable[[], None] | None = None) -> list:
    """Write one chunk's file into iter_dir, then mark it done; returns its DCP WriteResults."""
    from torch.distributed.checkpoint.filesystem import _StoragePrefix
    from torch.distributed.checkpoint.planner import SavePlan

    tmp = state_dir / f"tmp-{chunk.index}-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        plan = SavePlan(items=chunk.items, storage_data=_StoragePrefix(f"__{chunk.index}_"))
        planner = _ChunkPlanner(chunk, ckpt, on_item)
        try:
            results = deterministic_writer(tmp).write_data(plan, planner).value()
        finally:
            planner.close()
        written = sorted(p.name for p in tmp.iterdir())
        if written != [chunk.file_name]:
            raise WorkerError(f"chunk {chunk.index} ({chunk.label}) wrote {written}, expected {chunk.file_name}")
        os.replace(tmp / chunk.file_name, iter_dir / chunk.file_name)
        _drop_cached_pages(iter_dir / chunk.file_name)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
        ckpt.close()  # unmap the safetensors pages this chunk touched: RSS stays one chunk's worth
    done = state_dir / f"{chunk.index}.done"
    part = done.with_suffix(f".tmp-{os.getpid()}")
    part.write_bytes(pickle.dumps(results))
    os.replace(part, done)
    return results


def finished_chunks(state_dir: Path, iter_dir: Path) -> dict[int, list]:
    """{chunk index: write results} for chunks a previous attempt completed (file present, .done written)."""
    done = {}
    for marker in sorted(state_dir.glob("*.done")):
        if marker.stat().st_uid != os.getuid():  # the work dir may be shared: trust only our own markers
            raise UnsafePickleError(f"{marker}: written by uid {marker.stat().st_uid}, not by this user "
                                    f"({os.getuid()}); remove {state_dir} to convert from scratch")
        results = restricted_load_file(marker)  # and never run what one holds
        files = {r.storage_data.relative_path for r in results}
        if all((iter_dir / f).is_file() for f in files):
            done[int(marker.stem)] = results
    return done


def canonical_results(chunks: list[Chunk], results: dict[int, list]) -> list[list]:
    """The write results as `.metadata` should hold them, whoever wrote them.

    pickle encodes shared objects once: results made in this process share the plan's
    index objects, results from a worker or a `.done` file do not, and `.metadata` bytes
    would differ. Rebuilt on the plan's objects, the bytes depend only on the plan.
    """
    from torch.distributed.checkpoint.filesystem import _StorageInfo
    from torch.distributed.checkpoint.storage import WriteResult

    out = []
    for chunk in chunks:
        index_of = {item_key(item.index): item.index for item in chunk.items}
        file_name = chunk.file_name
        rebuilt = []
        for r in results[chunk.index]:
            info = r.storage_data
            if info.relative_path != file_name or item_key(r.index) not in index_of:
                raise WorkerError(f"chunk {chunk.index} ({chunk.label}): write result for {r.index.fqn} "
                                  f"in {info.relative_path} does not belong to it")
            rebuilt.append(WriteResult(index=index_of[item_key(r.index)], size_in_bytes=int(r.size_in_bytes),
                                       storage_data=_StorageInfo(file_name, int(info.offset), int(info.length),
                                                                 transform_descriptors=info.transform_descriptors)))
        out.append(rebuilt)
    return out


# ------------------------------------------------------------------ workers
_WORKER: dict = {}


def _worker_init(hf_dir: str, mapped_limit: int) -> None:
    from gptoss_model.checkpoint.hf_reader import HFCheckpoint

    _WORKER["ckpt"] = HFCheckpoint(hf_dir, max_mapped_bytes=mapped_limit)


def _worker_write(chunk: Chunk, iter_dir: str, state_dir: str) -> tuple[list, int, float]:
    with torch.no_grad():
        results = write_chunk(chunk, _WORKER["ckpt"], Path(iter_dir), Path(state_dir))
    return results, os.getpid(), peak_rss_mb()


def start_workers(hf_dir: Path, processes: int, mapped_limit: int = MAPPED_BYTES_LIMIT) -> WorkerPool:
    """Spawn the helper processes now, so their start-up (imports) overlaps the planning here."""
    return start_pool(processes, _worker_init, (str(hf_dir), mapped_limit))


def write_chunks(chunks: list[Chunk], ckpt, iter_dir: Path, state_dir: Path,
                 pool: WorkerPool | None, on_chunk: Callable[[Chunk, int, float], None],
                 on_item: Callable[[], None] | None = None) -> dict[int, list]:
    """Write `chunks` (reading `ckpt`): in this process and, given a `pool`, in each of its processes too.

    An exception is raised as is (a CheckpointError stays one); a pool process that died
    raises WorkerError. Chunks finished before a failure stay done for the next attempt.
    """
    results: dict[int, list] = {}

    def here(chunk: Chunk):
        return write_chunk(chunk, ckpt, iter_dir, state_dir, on_item if pool is None else None), os.getpid(), \
            peak_rss_mb()

    def done(chunk: Chunk, result) -> None:
        results[chunk.index] = result[0]
        on_chunk(chunk, result[1], result[2])

    spread(chunks, here=here, pool=pool, on_done=done,
           submit=lambda chunk: pool.submit(_worker_write, chunk, str(iter_dir), str(state_dir)),
           describe=lambda chunk: f"writing conversion chunk {chunk.index} ({chunk.label})")
    return results
