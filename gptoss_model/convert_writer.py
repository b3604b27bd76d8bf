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

Workers are spawned processes that import torch and safetensors but not
megatron; they die with their parent (PR_SET_PDEATHSIG), so killing the
converter kills the whole tree.
"""

from __future__ import annotations

import os
import pickle
import shutil
import signal
import sys
from concurrent.futures import FIRST_EXCEPTION, ProcessPoolExecutor, wait
from pathlib import Path
from typing import Callable

import torch

from gptoss_model.convert_plan import Chunk, item_key

MAPPED_BYTES_LIMIT = 256 * 2**20  # safetensors pages kept mapped by a worker before it unmaps them


class WorkerError(RuntimeError):
    """A conversion worker died or failed."""


def _checkpoint_value(ckpt, source, dtype: torch.dtype) -> torch.Tensor:
    """The whole world-1 megatron tensor `source.name` holds, read and transformed from HF."""
    from gptoss_model.load_hf import CheckpointError, read_for_param

    value = read_for_param(ckpt, source.match, source.param_shape, 0, 1, dtype=dtype).contiguous()
    if tuple(value.shape) != source.param_shape:
        raise CheckpointError(f"{ckpt.where(source.match.hf_names()[0])}: {list(source.match.hf_names())} -> "
                              f"{source.name} gives shape {list(value.shape)}, the model expects "
                              f"{list(source.param_shape)}")
    return value


class _ChunkPlanner:
    """The one planner method FileSystemWriter.write_data calls: item -> data, read on demand."""

    def __init__(self, chunk: Chunk, ckpt, on_item: Callable[[], None] | None):
        self.chunk, self.ckpt, self.on_item = chunk, ckpt, on_item
        self._cached: tuple[str, torch.Tensor] | None = None  # fc1's gate and up halves come in a row

    def resolve_data(self, write_item):
        import io

        key = item_key(write_item.index)
        if key not in self.chunk.sources:
            return io.BytesIO(self.chunk.byte_data[write_item.index.fqn])
        src = self.chunk.sources[key]
        if self._cached is None or self._cached[0] != src.name:
            self._cached = None  # drop the previous tensor before reading the next
            self._cached = (src.name, _checkpoint_value(self.ckpt, src, write_item.tensor_data.properties.dtype))
        full = self._cached[1]
        # The item is a view of the megatron parameter (all of it, or e.g. the gate or up
        # half of a GLU fc1): take the same view of the converted tensor.
        part = full.as_strided(src.size, src.stride, full.storage_offset() + src.storage_offset)
        td = write_item.tensor_data
        out = part.to(td.properties.dtype).reshape(tuple(td.chunk.sizes)).contiguous()
        if self.on_item is not None:
            self.on_item()
        return out


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
        results = deterministic_writer(tmp).write_data(plan, _ChunkPlanner(chunk, ckpt, on_item)).value()
        written = sorted(p.name for p in tmp.iterdir())
        if written != [chunk.file_name]:
            raise WorkerError(f"chunk {chunk.index} ({chunk.label}) wrote {written}, expected {chunk.file_name}")
        os.replace(tmp / chunk.file_name, iter_dir / chunk.file_name)
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
        results = pickle.loads(marker.read_bytes())
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
    if sys.platform.startswith("linux"):
        import ctypes

        libc = ctypes.CDLL("libc.so.6", use_errno=True)
        libc.prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG: die with the converter
    torch.set_num_threads(1)  # one process per core does the parallelism
    from gptoss_model.load_hf import HFCheckpoint

    _WORKER["ckpt"] = HFCheckpoint(hf_dir, max_mapped_bytes=mapped_limit)


def _worker_write(chunk: Chunk, iter_dir: str, state_dir: str) -> tuple[int, list]:
    with torch.no_grad():
        return chunk.index, write_chunk(chunk, _WORKER["ckpt"], Path(iter_dir), Path(state_dir))


def _worker_ready() -> int:
    return os.getpid()


def start_workers(hf_dir: Path, workers: int, mapped_limit: int = MAPPED_BYTES_LIMIT) -> ProcessPoolExecutor:
    """Spawn the worker processes now, so their imports overlap the planning in this process."""
    import multiprocessing as mp

    pool = ProcessPoolExecutor(max_workers=workers, mp_context=mp.get_context("spawn"),
                               initializer=_worker_init, initargs=(str(hf_dir), mapped_limit))
    for _ in range(workers):  # one submit spawns one process (while none is idle)
        pool.submit(_worker_ready)
    return pool


def write_chunks(chunks: list[Chunk], hf_dir: Path, iter_dir: Path, state_dir: Path,
                 pool: ProcessPoolExecutor | None, on_chunk: Callable[[Chunk], None],
                 on_item: Callable[[], None] | None = None,
                 mapped_limit: int = MAPPED_BYTES_LIMIT) -> dict[int, list]:
    """Write `chunks` in `pool`'s workers (None: in this process); {chunk index: write results}.

    A worker's exception is raised as is (a CheckpointError stays one); a worker that
    died (killed, out of memory) raises WorkerError. Chunks finished before that stay done.
    """
    from concurrent.futures.process import BrokenProcessPool

    results: dict[int, list] = {}
    if pool is None:
        from gptoss_model.load_hf import HFCheckpoint

        ckpt = HFCheckpoint(hf_dir, max_mapped_bytes=mapped_limit)
        for chunk in chunks:
            results[chunk.index] = write_chunk(chunk, ckpt, iter_dir, state_dir, on_item)
            on_chunk(chunk)
        return results

    by_index = {c.index: c for c in chunks}
    pending = {pool.submit(_worker_write, c, str(iter_dir), str(state_dir)) for c in chunks}
    try:
        while pending:
            finished, pending = wait(pending, return_when=FIRST_EXCEPTION)
            for fut in finished:
                try:
                    index, res = fut.result()
                except BrokenProcessPool as e:
                    raise WorkerError(f"a conversion worker died ({e}); the chunks it finished are kept "
                                      "and a rerun writes the others") from e
                results[index] = res
                on_chunk(by_index[index])
    finally:
        for fut in pending:
            fut.cancel()
    return results
