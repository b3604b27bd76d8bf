"""JSONL corpora -> megatron indexed datasets, in two resumable, parallel phases.

1. Tokenise: every work unit (a byte range of a plain file, or a whole compressed file;
   see `sources`) is tokenised in batches into a part (`unit_NNNNNN.{key}.tok` with the
   ids back to back, `.len` with one int64 length per document) under `parts_dir`; a
   unit's `.json` summary is written last and marks it done.
2. Assemble: shard boundaries are cut on the GLOBAL document stream (all units in order),
   so they depend only on the corpus and the options, never on how it was split into files
   or units, nor on how many workers ran. Each shard copies its byte ranges out of the
   parts into `{out_dir}/shard_NNNNN_{key}_document.bin`, then writes the `.idx`
   (atomically, last): its presence marks the shard done.

A rerun after a crash skips the units and shards already done. Both phases take a
`map_fn(function, jobs) -> results in order`, so they run in-process, in a local process
pool, or on any cluster engine that can call a picklable top-level function.
"""
from __future__ import annotations

import json
import os
import queue
import socket
import threading
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import dataclass, field
from multiprocessing import get_context
from pathlib import Path
from typing import Callable, Sequence

import numpy as np

from gptoss_model.data.indexed import dtype_code, read_index_summary, write_index
from gptoss_model.data.sources import (
    DEFAULT_UNIT_BYTES,
    BadRecords,
    CorpusError,
    RecordReader,
    WorkUnit,
    expand_sources,
    plan_units,
)
from gptoss_model.data.tokenizer import BatchEncoder, TokenizerSpec

Progress = Callable[[int, int, int], None]  # (documents, tokens, input bytes) done since the last call
# map_fn(function, jobs, on_done) -> results in job order; on_done(result) as each finishes
MapFn = Callable[[Callable, list, Callable[[dict], None] | None], list]


@dataclass(frozen=True)
class PretrainOptions:
    json_keys: tuple[str, ...] = ("text",)
    append_eod: bool = True
    bad_input: str = "fail"            # "fail" | "skip"
    shard_tokens: int | None = None    # a shard closes after the document reaching this; None: one shard
    unit_bytes: int = DEFAULT_UNIT_BYTES
    batch_bytes: int = 4 << 20         # text handed to the tokenizer at once


@dataclass(frozen=True)
class UnitJob:
    unit: WorkUnit
    tokenizer: TokenizerSpec
    options: PretrainOptions
    parts_dir: str
    storage_options: dict = field(default_factory=dict)


@dataclass(frozen=True)
class ShardJob:
    index: int
    pieces: tuple[tuple[int, int, int], ...]   # (unit index, first document, end document)
    keys: tuple[str, ...]
    dtype: str
    parts_dir: str
    out_dir: str


def shard_prefix(index: int, key: str) -> str:
    return f"shard_{index:05d}_{key}_document"


def _unit_stem(parts_dir: str, index: int) -> Path:
    return Path(parts_dir) / f"unit_{index:06d}"


# ---------------------------------------------------------------- phase 1: tokenise a unit

def tokenize_unit(job: UnitJob, progress: Progress | None = None) -> dict:
    """Tokenise one unit into its part files; returns (or, when already done, re-reads) its summary."""
    stem = _unit_stem(job.parts_dir, job.unit.index)
    summary_path = stem.with_suffix(".json")
    identity = {"unit": job.unit.label, "keys": list(job.options.json_keys)}
    if summary_path.exists():
        summary = json.loads(summary_path.read_text())
        if summary.get("identity") == identity:
            return {**summary, "resumed": True}
    encoder = BatchEncoder(job.tokenizer)
    eod = job.tokenizer.eod_token_id
    if job.options.append_eod and eod is None:
        raise CorpusError(f"append_eod is on but the tokenizer {job.tokenizer.source} has no end-of-document token")
    reader = RecordReader(job.unit, job.options.json_keys, job.options.bad_input, job.storage_options)
    keys = job.options.json_keys
    token_files = {k: open(f"{stem}.{k}.tok.tmp", "wb") for k in keys}
    lengths: dict[str, list[np.ndarray]] = {k: [] for k in keys}
    documents = 0
    tokens = 0
    try:
        for batch, nbytes in _prefetched_batches(reader, job.options.batch_bytes):
            batch_tokens = 0
            for k_i, key in enumerate(keys):
                ids, lens = encoder.encode([record[k_i] for record in batch])
                if job.options.append_eod:
                    ends = np.cumsum(lens)[lens > 0]
                    ids = np.insert(ids, ends, np.asarray(eod, dtype=ids.dtype))
                    lens = lens + (lens > 0)
                token_files[key].write(ids.tobytes())
                lengths[key].append(lens)
                batch_tokens += int(ids.size)
            documents += len(batch)
            tokens += batch_tokens
            if progress:
                progress(len(batch), batch_tokens, nbytes)
    finally:
        for f in token_files.values():
            f.close()
    for key in keys:
        os.replace(f"{stem}.{key}.tok.tmp", f"{stem}.{key}.tok")
        np.save(f"{stem}.{key}.len.npy", np.concatenate(lengths[key]) if lengths[key] else np.zeros(0, np.int64))
    summary = {"identity": identity, "unit": job.unit.index, "documents": documents, "tokens": tokens,
               "process": f"{socket.gethostname()}:{os.getpid()}",
               "lines": reader.lines, "blank_lines": reader.blank_lines, "bad": reader.bad.as_dict()}
    tmp = summary_path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(summary))
    os.replace(tmp, summary_path)
    return {**summary, "resumed": False}


def _prefetched_batches(reader: RecordReader, batch_bytes: int):
    """Batches of records, read and parsed on a thread while the tokenizer (GIL released) encodes."""
    handoff: queue.Queue = queue.Queue(maxsize=2)
    stop = threading.Event()

    def produce():
        try:
            batch, size = [], 0
            for record in reader:
                batch.append(record)
                size += sum(len(v) for v in record)
                if size >= batch_bytes:
                    handoff.put((batch, size))
                    batch, size = [], 0
                    if stop.is_set():
                        return
            if batch:
                handoff.put((batch, size))
            handoff.put(None)
        except BaseException as e:  # handed to the consumer, which re-raises it
            handoff.put(e)

    thread = threading.Thread(target=produce, daemon=True, name="jsonl-reader")
    thread.start()
    try:
        while True:
            item = handoff.get()
            if item is None:
                return
            if isinstance(item, BaseException):
                raise item
            yield item
    finally:
        stop.set()
        while thread.is_alive():  # unblock a producer waiting on a full queue
            try:
                handoff.get(timeout=0.1)
            except queue.Empty:
                pass


# ---------------------------------------------------------------- phase 2: assemble shards

def plan_shards(unit_lengths: Sequence[np.ndarray], shard_tokens: int | None) -> list[tuple[tuple[int, int, int], ...]]:
    """Cut the global document stream (units in order) into shards; per shard its unit pieces."""
    counts = np.array([len(x) for x in unit_lengths], dtype=np.int64)
    total_docs = int(counts.sum())
    doc_lengths = np.concatenate(unit_lengths) if total_docs else np.zeros(0, np.int64)
    if shard_tokens is None:
        bounds = [(0, total_docs)]
    else:
        cumulative = np.cumsum(doc_lengths)
        bounds, start = [], 0
        while start < total_docs:
            base = cumulative[start - 1] if start else 0
            end = min(int(np.searchsorted(cumulative, base + shard_tokens, side="left")) + 1, total_docs)
            bounds.append((start, end))
            start = end
    unit_starts = np.concatenate([[0], np.cumsum(counts)])
    shards = []
    for first, end in bounds:
        pieces = []
        for u in range(len(counts)):
            lo, hi = max(first, unit_starts[u]), min(end, unit_starts[u + 1])
            if lo < hi:
                pieces.append((u, int(lo - unit_starts[u]), int(hi - unit_starts[u])))
        shards.append(tuple(pieces))
    return shards


def assemble_shard(job: ShardJob) -> dict:
    dtype = np.dtype(job.dtype)
    metrics = {"shard": job.index, "documents": 0, "tokens": 0, "bytes": 0, "resumed": True}
    for key in job.keys:
        prefix = Path(job.out_dir) / shard_prefix(job.index, key)
        idx_path = prefix.with_name(prefix.name + ".idx")
        if not idx_path.exists():
            metrics["resumed"] = False
            lengths = []
            tmp_bin = prefix.with_name(prefix.name + ".bin.tmp")
            with open(tmp_bin, "wb") as out:
                for unit, first, end in job.pieces:
                    stem = _unit_stem(job.parts_dir, unit)
                    unit_lengths = np.load(f"{stem}.{key}.len.npy")
                    start_byte = int(unit_lengths[:first].sum()) * dtype.itemsize
                    count = int(unit_lengths[first:end].sum()) * dtype.itemsize
                    _copy_range(f"{stem}.{key}.tok", start_byte, count, out)
                    lengths.append(unit_lengths[first:end])
            os.replace(tmp_bin, prefix.with_name(prefix.name + ".bin"))
            write_index(idx_path, np.concatenate(lengths) if lengths else np.zeros(0, np.int64), dtype)
        summary = read_index_summary(idx_path)
        if summary["dtype_code"] != dtype_code(dtype):
            raise CorpusError(f"{idx_path}: written with dtype code {summary['dtype_code']}, expected {dtype}")
        metrics["documents"] = summary["documents"]
        metrics["tokens"] += summary["tokens"]
        metrics["bytes"] += summary["bin_bytes"] + idx_path.stat().st_size
    return metrics


def _copy_range(path: str, start: int, count: int, out) -> None:
    with open(path, "rb") as f:
        f.seek(start)
        while count > 0:
            block = f.read(min(count, 16 << 20))
            if not block:
                raise CorpusError(f"{path}: truncated part (wanted {count} more bytes)")
            out.write(block)
            count -= len(block)


# ---------------------------------------------------------------- the whole build

def local_map(workers: int) -> MapFn:
    """In-process for one worker; otherwise a spawned process pool (tokenizers are not fork-safe)."""
    def run(function, jobs, on_done=None):
        if workers <= 1 or len(jobs) <= 1:
            results = []
            for job in jobs:
                results.append(function(job))
                if on_done:
                    on_done(results[-1])
            return results
        with ProcessPoolExecutor(max_workers=min(workers, len(jobs)), mp_context=get_context("spawn"),
                                 initializer=_share_cores, initargs=(workers,)) as pool:
            futures = [pool.submit(function, job) for job in jobs]
            try:
                for future in as_completed(futures):
                    if on_done:
                        on_done(future.result())
                return [f.result() for f in futures]
            except BaseException:
                for f in futures:
                    f.cancel()
                raise
    return run


def _share_cores(workers: int) -> None:
    os.environ.setdefault("RAYON_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // workers)))


def build_pretraining_dataset(sources: Sequence[str], tokenizer: TokenizerSpec, out_dir: str | os.PathLike,
                              parts_dir: str | os.PathLike, options: PretrainOptions = PretrainOptions(), *,
                              workers: int = 1, map_fn: MapFn | None = None, progress: Progress | None = None,
                              storage_options: dict | None = None) -> dict:
    """Tokenise `sources` into shards under `out_dir` (resuming what `parts_dir` already holds).

    Returns the metrics the dataset manifest carries.
    """
    Path(out_dir).mkdir(parents=True, exist_ok=True)
    Path(parts_dir).mkdir(parents=True, exist_ok=True)
    files = expand_sources(sources, storage_options)
    units = plan_units(files, options.unit_bytes)
    jobs = [UnitJob(u, tokenizer, options, str(parts_dir), dict(storage_options or {})) for u in units]
    if map_fn is None and workers <= 1:
        summaries = [tokenize_unit(job, progress) for job in jobs]
    else:
        sizes = {u.index: u.end - u.start for u in units}

        def unit_done(summary: dict) -> None:
            if progress:
                progress(summary["documents"], summary["tokens"], sizes[summary["unit"]])

        summaries = (map_fn or local_map(workers))(tokenize_unit, jobs, unit_done)

    bad = BadRecords()
    for s in summaries:
        bad.merge(BadRecords.from_dict(s["bad"]))
    total_tokens = sum(s["tokens"] for s in summaries)
    if total_tokens == 0:
        raise CorpusError(f"the corpus ({', '.join(sources)}) yields no tokens"
                          + (f"; skipped records: {bad.counts}" if bad.counts else ""))
    keys = options.json_keys
    totals = [sum(np.load(f"{_unit_stem(str(parts_dir), u.index)}.{k}.len.npy") for k in keys)
              if len(keys) > 1 else np.load(f"{_unit_stem(str(parts_dir), u.index)}.{keys[0]}.len.npy")
              for u in units]
    dtype = np.dtype(tokenizer.token_dtype()).name
    shard_jobs = [ShardJob(i, pieces, keys, dtype, str(parts_dir), str(out_dir))
                  for i, pieces in enumerate(plan_shards(totals, options.shard_tokens))]
    shards = (map_fn or local_map(1))(assemble_shard, shard_jobs, None)
    return {
        "documents": sum(s["documents"] for s in summaries),
        "tokens": total_tokens,
        "input_files": len(files),
        "input_bytes": sum(f.size for f in files),
        "work_units": len(units),
        "resumed_units": sum(bool(s["resumed"]) for s in summaries),
        "tokenizing_processes": sorted({s["process"] for s in summaries}),
        "resumed_shards": sum(bool(s["resumed"]) for s in shards),
        "blank_lines": sum(s["blank_lines"] for s in summaries),
        "skipped_records": bad.as_dict(),
        "token_dtype": dtype,
        "vocab_size": tokenizer.vocab_size,
        "eod_token_id": tokenizer.eod_token_id if options.append_eod else None,
        "shards": [{k: v for k, v in s.items() if k != "resumed"} for s in shards],
        "data_prefixes": [shard_prefix(s.index, k) for s in shard_jobs for k in keys],
    }


__all__ = ["PretrainOptions", "build_pretraining_dataset", "tokenize_unit", "assemble_shard", "plan_shards",
           "local_map", "shard_prefix", "UnitJob", "ShardJob"]
