"""JSONL corpora -> megatron indexed datasets, in two resumable, parallel phases.

1. Tokenise: every work unit (a byte range of a plain file, or a whole compressed file;
   see `sources`) is tokenised in batches into parts (`unit_NNNNNN.{key}.tok` with the
   ids back to back, `.len.npy` with one int64 length per document) in the `parts`
   workspace; the unit's `.json` summary is put last and marks it done.
2. Assemble: shard boundaries are cut on the GLOBAL document stream (all units in order),
   so they depend only on the corpus and the options, never on how it was split into files
   or units, nor on how many workers ran. Each shard copies its byte ranges out of the
   parts into `shard_NNNNN_{key}_document.bin` + `.idx` in the `out` workspace; its
   summary (`shard_NNNNN.json` in `parts`, with each file's size and, from an uploading
   workspace, sha256) is put last.

A rerun after a crash skips the units and shards already done. Both phases take a
`map_fn(function, jobs) -> results in order`, so they run in-process, in a local process
pool, or on any cluster engine that can call a picklable top-level function; the
workspaces (see `workspace`) are local directories or an object-store prefix that every
machine of such a cluster reaches.
"""
from __future__ import annotations

import functools
import hashlib
import io
import json
import os
import queue
import socket
import threading
from concurrent.futures import ProcessPoolExecutor, ThreadPoolExecutor, as_completed
from dataclasses import dataclass, field
from multiprocessing import get_context
from typing import Callable, Sequence

import numpy as np

from gptoss_model.data.indexed import index_bytes
from gptoss_model.data.sources import (
    DEFAULT_UNIT_BYTES,
    MAX_RECORD_BYTES,
    auto_unit_bytes,
    BadRecords,
    CorpusError,
    RecordReader,
    WorkUnit,
    expand_sources,
    plan_units,
)
from gptoss_model.data.progress import CorpusProgress, ProgressFn
from gptoss_model.data.tokenizer import BatchEncoder, TokenizerSpec
from gptoss_model.data.workspace import Workspace, as_workspace

Progress = Callable[[int, int, int], None]  # (documents, tokens, input bytes) since the last call (CorpusProgress)
# map_fn(function, jobs, on_done) -> results in job order; on_done(result) as each finishes
MapFn = Callable[[Callable, list, Callable[[dict], None] | None], list]


@dataclass(frozen=True)
class PretrainOptions:
    json_keys: tuple[str, ...] = ("text",)
    append_eod: bool = True
    bad_input: str = "fail"            # "fail" | "skip"
    shard_tokens: int | None = None    # a shard closes after the document reaching this; None: one shard
    unit_bytes: int | None = None      # None: auto_unit_bytes for the local workers (DEFAULT on a map_fn)
    batch_bytes: int = 4 << 20         # text handed to the tokenizer at once
    tokenizer_engine: str = "tokenizers"  # or "tiktoken" (see tiktoken_engine), same ids
    engine_check_chars: int = 256 << 10   # per unit and key, re-encoded by tokenizers on the tiktoken engine
    max_record_bytes: int = MAX_RECORD_BYTES  # a longer JSONL line is bad input (memory is ~180x a record)


@dataclass(frozen=True)
class UnitJob:
    unit: WorkUnit
    tokenizer: TokenizerSpec
    options: PretrainOptions
    parts: Workspace
    storage_options: dict = field(default_factory=dict)


@dataclass(frozen=True)
class ShardJob:
    index: int
    pieces: tuple[tuple[int, int, int], ...]   # (unit index, first document, end document)
    keys: tuple[str, ...]
    dtype: str
    parts: Workspace
    out: Workspace


def shard_prefix(index: int, key: str) -> str:
    return f"shard_{index:05d}_{key}_document"


def _unit_stem(index: int) -> str:
    return f"unit_{index:06d}"


def _read_json(space: Workspace, rel: str) -> dict | None:
    data = space.get_bytes(rel)
    return None if data is None else json.loads(data)


def _npy_bytes(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    np.save(buffer, array)
    return buffer.getvalue()


def unit_lengths(parts: Workspace, unit: int, key: str) -> np.ndarray:
    """Token count of every document of a tokenised unit, for one JSON key."""
    rel = f"{_unit_stem(unit)}.{key}.len.npy"
    data = parts.get_bytes(rel)
    if data is None:
        raise CorpusError(f"{parts.where(rel)}: missing (the unit's summary says it was written)")
    return np.load(io.BytesIO(data))


def _process() -> str:
    return f"{socket.gethostname()}:{os.getpid()}"


# ---------------------------------------------------------------- phase 1: tokenise a unit

def tokenize_unit(job: UnitJob, progress: Progress | None = None) -> dict:
    """Tokenise one unit into its part files; returns (or, when already done, re-reads) its summary."""
    stem = _unit_stem(job.unit.index)
    identity = {"unit": job.unit.label, "keys": list(job.options.json_keys)}
    summary = _read_json(job.parts, f"{stem}.json")
    if summary is not None and summary.get("identity") == identity:
        return {**summary, "resumed": True}
    encoder = _encoder(job.tokenizer, job.options.tokenizer_engine)
    eod = job.tokenizer.eod_token_id
    if job.options.append_eod and eod is None:
        raise CorpusError(f"append_eod is on but the tokenizer {job.tokenizer.source} has no end-of-document token")
    reader = RecordReader(job.unit, job.options.json_keys, job.options.bad_input, job.storage_options,
                          max_record_bytes=job.options.max_record_bytes)
    keys = job.options.json_keys
    lengths: dict[str, list[np.ndarray]] = {k: [] for k in keys}
    documents = 0
    tokens = 0
    with job.parts.scratch() as scratch:
        token_paths = {k: scratch / f"{stem}.{k}.tok.tmp" for k in keys}
        token_files = {k: open(path, "wb") for k, path in token_paths.items()}
        try:
            for batch, nbytes in _prefetched_batches(reader, job.options.batch_bytes):
                batch_tokens = 0
                check_chars = job.options.engine_check_chars if documents == 0 else 0  # the unit's first batch
                for k_i, key in enumerate(keys):
                    ids, lens = encoder.encode(
                        [record[k_i] for record in batch], verify_chars=check_chars,
                        describe=lambda i, key=key: f"{job.unit.label}: document {i + 1} of the unit, key {key!r}")
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
            job.parts.put_file(token_paths[key], f"{stem}.{key}.tok")
            job.parts.put_bytes(f"{stem}.{key}.len.npy",
                                _npy_bytes(np.concatenate(lengths[key]) if lengths[key] else np.zeros(0, np.int64)))
    summary = {"identity": identity, "unit": job.unit.index, "documents": documents, "tokens": tokens,
               "process": _process(),
               "lines": reader.lines, "blank_lines": reader.blank_lines, "bad": reader.bad.as_dict()}
    job.parts.put_bytes(f"{stem}.json", json.dumps(summary).encode())  # last: marks the unit done
    return {**summary, "resumed": False}


@functools.lru_cache(maxsize=2)
def _encoder(spec: TokenizerSpec, engine: str) -> BatchEncoder:
    """One tokenizer per process, reused by every unit it tokenises."""
    return BatchEncoder(spec, engine)


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
    """Copy the shard's document ranges out of the parts into `.bin` + `.idx` per key.

    The shard's summary (with the size of each file it wrote, and its sha256 where the `out`
    workspace computed it on the way) goes into the parts workspace last and marks the shard done."""
    identity = {"pieces": [list(p) for p in job.pieces], "keys": list(job.keys), "dtype": job.dtype}
    summary_rel = f"shard_{job.index:05d}.json"
    summary = _read_json(job.parts, summary_rel)
    if summary is not None and summary.get("identity") == identity:
        return {**summary, "resumed": True}
    dtype = np.dtype(job.dtype)
    files, documents, tokens = [], 0, 0
    with job.out.scratch() as scratch:
        for key in job.keys:
            prefix = shard_prefix(job.index, key)
            tmp_bin = scratch / f"{prefix}.bin.tmp"
            lengths = []
            with open(tmp_bin, "wb") as out:
                for unit, first, end in job.pieces:
                    doc_lengths = unit_lengths(job.parts, unit, key)
                    start_byte = int(doc_lengths[:first].sum()) * dtype.itemsize
                    count = int(doc_lengths[first:end].sum()) * dtype.itemsize
                    for block in job.parts.read_range(f"{_unit_stem(unit)}.{key}.tok", start_byte, count):
                        out.write(block)
                    lengths.append(doc_lengths[first:end])
            bin_size = tmp_bin.stat().st_size
            bin_sha256 = job.out.put_file(tmp_bin, f"{prefix}.bin")
            doc_lengths = np.concatenate(lengths) if lengths else np.zeros(0, np.int64)
            index = index_bytes(doc_lengths, dtype)
            job.out.put_bytes(f"{prefix}.idx", index)
            files += [{"path": f"{prefix}.bin", "size": bin_size, "sha256": bin_sha256},
                      {"path": f"{prefix}.idx", "size": len(index), "sha256": hashlib.sha256(index).hexdigest()}]
            documents = len(doc_lengths)
            tokens += int(doc_lengths.sum())
    summary = {"identity": identity, "shard": job.index, "documents": documents, "tokens": tokens,
               "bytes": sum(f["size"] for f in files), "files": files, "process": _process()}
    job.parts.put_bytes(summary_rel, json.dumps(summary).encode())
    return {**summary, "resumed": False}


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
                                 initializer=_init_worker, initargs=(workers, os.getpid())) as pool:
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


def _init_worker(workers: int, parent_pid: int) -> None:
    from gptoss_model.system.processes import die_with_parent

    die_with_parent(parent_pid)  # a killed preprocess run takes its workers with it
    os.environ.setdefault("RAYON_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // workers)))


def build_pretraining_dataset(sources: Sequence[str], tokenizer: TokenizerSpec, out: Workspace | str | os.PathLike,
                              parts: Workspace | str | os.PathLike, options: PretrainOptions = PretrainOptions(), *,
                              workers: int = 1, map_fn: MapFn | None = None, progress: ProgressFn | None = None,
                              storage_options: dict | None = None) -> dict:
    """Tokenise `sources` into shards in `out` (resuming what `parts` already holds).

    `progress(bytes done, bytes in all, note)`: the input read so far, the note counting documents,
    tokens and tokens/s.

    `out` and `parts` are workspaces (or local directories). Returns the metrics the dataset
    manifest carries, plus `output_files`: path, size and sha256 (None where `out` did not
    compute it, e.g. a local directory) of every file put in `out`.
    """
    out, parts = as_workspace(out), as_workspace(parts)
    _encoder(tokenizer, options.tokenizer_engine)  # a tokenizer the engine cannot run fails here, before any work
    files = expand_sources(sources, storage_options)
    unit_bytes = options.unit_bytes or (DEFAULT_UNIT_BYTES if map_fn is not None
                                        else auto_unit_bytes(sum(f.size for f in files), workers))
    units = plan_units(files, unit_bytes)
    jobs = [UnitJob(u, tokenizer, options, parts, dict(storage_options or {})) for u in units]
    meter = CorpusProgress(sum(f.size for f in files), progress)
    if map_fn is None and workers <= 1:
        summaries = [tokenize_unit(job, meter) for job in jobs]
    else:
        sizes = {u.index: u.end - u.start for u in units}

        def unit_done(summary: dict) -> None:
            meter(summary["documents"], summary["tokens"], sizes[summary["unit"]])

        summaries = (map_fn or local_map(workers))(tokenize_unit, jobs, unit_done)
    meter.finish()

    bad = BadRecords()
    for s in summaries:
        bad.merge(BadRecords.from_dict(s["bad"]))
    total_tokens = sum(s["tokens"] for s in summaries)
    if total_tokens == 0:
        raise CorpusError(f"the corpus ({', '.join(sources)}) yields no tokens"
                          + (f"; skipped records: {bad.counts}" if bad.counts else ""))
    keys = options.json_keys
    with ThreadPoolExecutor(16, thread_name_prefix="unit-lengths") as pool:  # many small reads, maybe remote
        totals = list(pool.map(lambda u: sum(unit_lengths(parts, u.index, k) for k in keys), units))
    dtype = np.dtype(tokenizer.token_dtype()).name
    shard_jobs = [ShardJob(i, pieces, keys, dtype, parts, out)
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
        "assembling_processes": sorted({s["process"] for s in shards}),
        "blank_lines": sum(s["blank_lines"] for s in summaries),
        "skipped_records": bad.as_dict(),
        "token_dtype": dtype,
        "tokenizer_engine": options.tokenizer_engine,
        "vocab_size": tokenizer.vocab_size,
        "eod_token_id": tokenizer.eod_token_id if options.append_eod else None,
        "shards": [{k: s[k] for k in ("shard", "documents", "tokens", "bytes")} for s in shards],
        "data_prefixes": [shard_prefix(s.index, k) for s in shard_jobs for k in keys],
        "output_files": [f for s in shards for f in s["files"]],
    }


__all__ = ["PretrainOptions", "build_pretraining_dataset", "tokenize_unit", "assemble_shard", "plan_shards",
           "local_map", "shard_prefix", "unit_lengths", "UnitJob", "ShardJob"]
