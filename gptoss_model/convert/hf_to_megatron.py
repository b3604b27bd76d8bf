"""HF GPT-OSS checkpoint -> megatron-core torch_dist checkpoint, streamed tensor by tensor.

    report = convert_hf_to_megatron("/ckpt/gpt-oss-20b", "/out/megatron", dtype="bfloat16", workers=4)

Output layout (what Megatron-LM's `load_checkpoint` expects):

    out/latest_checkpointed_iteration.txt      "0"
    out/conversion_report.json                  what was converted (tensors, params, source sha...)
    out/iter_0000000/                           megatron-core dist_checkpointing, torch_dist backend
        metadata.json  common.pt  .metadata  __0_0.distcp ... __{L+1}_0.distcp

The state dict is Megatron-LM's: {"model": model.sharded_state_dict(),
"checkpoint_version": 3.0, "iteration": 0}; it loads at any TP/PP/EP layout
(dist_checkpointing reshards on load).

How it works, without materialising the model:
  1. The model is built on the *meta* device at world size 1 (local spec): its
     `sharded_state_dict()` gives every ShardedTensor's key, global shape,
     offset and dtype, and holds no data.
  2. `convert_plan` turns it into the DCP plan megatron's torch_dist strategy
     would make, split into structural chunks (embedding, each layer, head).
  3. `convert_writer` writes each chunk as one file with torch's
     FileSystemWriter, reading each item's tensor from safetensors just before
     it is written (one expert slice, one layer's q/k/v...), in this process
     or in `workers` spawned processes. Memory held per worker is one megatron
     tensor plus its source (the largest is the embedding / lm_head), and
     safetensors mappings are dropped every 64 MiB, so RSS does not grow
     with the number of layers.
  4. megatron's `dist_checkpointing.save` writes common.pt and metadata.json,
     with a strategy that only writes `.metadata` from the chunks' results.

The bytes depend only on the input and the dtype: one worker or eight, in
one go or resumed after a crash, the files are identical.

Resuming: `out/.convert/` records the plan and each finished chunk; a rerun
into the same `out` writes only the unfinished chunks (a chunk file is
renamed into place only once complete). The tracker file is written last: a
crash leaves no `latest_checkpointed_iteration.txt`, which Megatron-LM never
loads (and the stage never commits).

`hf_validate.open_validated_checkpoint` rejects non-GPT-OSS configs, missing/misshaped
tensors and unknown tensors before anything is written. Reading the result back
and comparing it with transformers is `verify.parity_check`; the directory layout
is `checkpoint_layout`.

No Prefect here: tasks/convert.py wraps this in a stage.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import time
from pathlib import Path
from typing import Callable

import torch

from gptoss_model.checkpoint import name_map as nm
from gptoss_model.checkpoint.layout import DTYPES, TRACKER_FILE, build_model, iter_dir_name, megatron_state_dict
from gptoss_model.convert.plan import Chunk, CheckpointPlan, input_fingerprint, plan_checkpoint
from gptoss_model.convert.writer import (MAPPED_BYTES_LIMIT, canonical_results, deterministic_writer,
                                          finished_chunks, start_workers, write_chunks)
from gptoss_model.errors import InvalidParameterError, PermanentError
from gptoss_model.checkpoint.hf_validate import open_validated_checkpoint
from gptoss_model.model.parallel import world_of_one
from gptoss_model.system.resources import peak_rss_mb, rss_mb
from gptoss_model.system.workers import cores, useful_workers

log = logging.getLogger(__name__)

ITER_DIR = iter_dir_name(0)
REPORT_FILE = "conversion_report.json"
STATE_DIR = ".convert"  # progress of an unfinished conversion; removed once it completes
PLAN_FILE = "plan.json"  # the input fingerprint a partial output was made from


class ConversionError(PermanentError, RuntimeError):
    """The conversion itself cannot proceed (e.g. an output dir holding something else)."""


def _finalizing_strategy(plan: CheckpointPlan, results: dict[int, list]):
    """megatron's torch_dist save strategy, reduced to its last step: the chunks are already written."""
    from megatron.core.dist_checkpointing.strategies.torch import TorchDistSaveShardedStrategy

    class FinalizeChunks(TorchDistSaveShardedStrategy):
        def __init__(self):
            super().__init__("torch_dist", 1, thread_count=1)

        def save(self, sharded_state_dict, checkpoint_dir):
            writer = deterministic_writer(Path(checkpoint_dir))
            writer.set_up_storage_writer(True)
            writer.finish(plan.metadata, canonical_results(plan.chunks, results))

    return FinalizeChunks()


@contextlib.contextmanager
def _quiet(logger_name: str):
    logger = logging.getLogger(logger_name)
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        logger.setLevel(level)


def _prepare_out_dir(out_dir: Path, plan: CheckpointPlan, resume: bool) -> str:
    """'new', 'resume' (a partial attempt of this very plan) or 'complete'; refuses anything else."""
    state_dir = out_dir / STATE_DIR
    if not out_dir.exists() or not any(out_dir.iterdir()):
        return "new"
    report_file = out_dir / REPORT_FILE
    if resume and (out_dir / TRACKER_FILE).is_file() and report_file.is_file():
        if json.loads(report_file.read_text()).get("input_fingerprint") == plan.fingerprint:
            return "complete"
    if resume and (state_dir / PLAN_FILE).is_file():
        if json.loads((state_dir / PLAN_FILE).read_text()).get("input_fingerprint") == plan.fingerprint:
            return "resume"
    raise ConversionError(f"output directory {out_dir} is not empty and holds no resumable attempt of "
                          f"this conversion (same input, dtype and code); use an empty directory")


@torch.no_grad()
def convert_hf_to_megatron(hf_dir: str | Path, out_dir: str | Path, *, dtype: str = "bfloat16",
                           source_sha: str | None = None, workers: int = 1, resume: bool = True,
                           progress: Callable[[int, int], None] | None = None) -> dict:
    """Convert `hf_dir` into a Megatron-LM style torch_dist checkpoint under `out_dir`.

    `workers` processes write disjoint chunks: this one plus `workers - 1` spawned ones. `out_dir` must be empty,
    absent, or (with `resume`) a previous attempt at the same conversion, whose finished
    chunks are kept. Returns the conversion report (for the manifest): tensors, params,
    bytes, dtype, source_sha, chunks (written / resumed), seconds, RSS in MB.
    `progress(done, total)` counts tensors (per tensor with 1 worker, per chunk otherwise).
    """
    if dtype not in DTYPES:
        raise InvalidParameterError(f"dtype must be one of {sorted(DTYPES)}, got {dtype!r}")
    if workers < 1:
        raise InvalidParameterError(f"workers must be >= 1, got {workers}")
    started = time.time()
    rss_before = rss_mb()
    ckpt = open_validated_checkpoint(hf_dir, max_mapped_bytes=MAPPED_BYTES_LIMIT)
    ckpt.close()
    hf_dir, out_dir = Path(hf_dir), Path(out_dir)
    requested, workers = workers, useful_workers(workers, ckpt.cfg.num_layers + 2)
    if workers < requested:
        log.info("conversion: %d workers asked for, %d used (%d chunks, %d cores available)", requested,
                 workers, ckpt.cfg.num_layers + 2, cores())
    pool = start_workers(hf_dir, workers - 1) if workers > 1 else None  # this process is one of them
    try:
        report = _convert(ckpt, hf_dir, out_dir, dtype, source_sha, workers, pool, resume, progress)
    finally:
        if pool is not None:
            pool.shutdown()
    report.update(workers=workers, workers_requested=requested, seconds=round(time.time() - started, 3),
                  rss_before_mb=rss_before,
                  rss_after_mb=rss_mb(), peak_rss_mb=peak_rss_mb())
    log.info("converted %s -> %s: %d tensors, %d params, %.1fs", hf_dir, out_dir, report["tensors"],
             report["params"], report["seconds"])
    return report


def _convert(ckpt, hf_dir: Path, out_dir: Path, dtype: str, source_sha, workers: int, pool, resume: bool,
             progress) -> dict:
    from megatron.core import dist_checkpointing
    from megatron.core.dist_checkpointing.mapping import apply_factories

    cfg = ckpt.cfg
    iter_dir, state_dir = out_dir / ITER_DIR, out_dir / STATE_DIR
    with world_of_one("conversion"):
        model = build_model(cfg, DTYPES[dtype], device="meta")
        state = megatron_state_dict(model)
        apply_factories(state["model"])  # e.g. GLU fc1 -> separate gate and up items
        plan = plan_checkpoint({"model": state["model"]}, dict(model.state_dict(keep_vars=True)),
                               cfg.num_layers, dtype, input_fingerprint(hf_dir, ckpt.file_of, dtype))
        mode = _prepare_out_dir(out_dir, plan, resume)
        summary = {
            "format": "megatron-core torch_dist", "layout": f"{TRACKER_FILE} + {ITER_DIR}/",
            "dtype": dtype, "tensors": plan.num_items - sum(len(c.byte_data) for c in plan.chunks),
            "params": plan.params, "bytes": plan.nbytes, "chunks": len(plan.chunks),
            "source_sha": source_sha, "input_fingerprint": plan.fingerprint,
            "source_mxfp4": any(ckpt.is_mxfp4(n) for n in nm.expected_hf_shapes(cfg)),
            "num_layers": cfg.num_layers, "num_experts": cfg.num_experts,
        }
        done: dict[int, list] = {}
        by_pid: dict[int, int] = {}
        peak_by_pid: dict[int, float] = {}
        if mode != "complete":
            state_dir.mkdir(parents=True, exist_ok=True)
            iter_dir.mkdir(exist_ok=True)
            (state_dir / PLAN_FILE).write_text(json.dumps({"input_fingerprint": plan.fingerprint}))
            done = finished_chunks(state_dir, iter_dir) if mode == "resume" else {}
            todo = [c for c in plan.chunks if c.index not in done]
            total, counter = summary["tensors"], [sum(len(c.sources) for c in plan.chunks if c.index in done)]
            if progress is not None:
                progress(counter[0], total)

            def on_item() -> None:
                counter[0] += 1
                progress(counter[0], total)

            def on_chunk(chunk: Chunk, pid: int, peak_rss_mb: float) -> None:
                by_pid[pid] = by_pid.get(pid, 0) + 1
                peak_by_pid[pid] = max(peak_by_pid.get(pid, 0.0), peak_rss_mb)
                if pool is not None and progress is not None:
                    counter[0] += len(chunk.sources)
                    progress(counter[0], total)

            log.info("converting %s: %d chunks (%d done by an earlier attempt), %d workers",
                     hf_dir, len(plan.chunks), len(done), workers)
            results = {**done, **write_chunks(todo, ckpt, iter_dir, state_dir, pool, on_chunk,
                                              on_item if progress is not None and pool is None else None)}
            # megatron warns "Overwriting old incomplete / corrupted checkpoint" as the chunk files are there.
            with _quiet("megatron.core.dist_checkpointing.serialization"):
                dist_checkpointing.save(state, str(iter_dir), sharded_strategy=_finalizing_strategy(plan, results))
            (out_dir / REPORT_FILE).write_text(json.dumps(summary, indent=2, sort_keys=True) + "\n")
            (out_dir / TRACKER_FILE).write_text("0")  # last: from here on, Megatron-LM loads it
        shutil.rmtree(state_dir, ignore_errors=True)
        del model, state
    here = by_pid.pop(os.getpid(), 0)
    peak_by_pid.pop(os.getpid(), None)
    return {**summary, "chunks_resumed": len(done) if mode == "resume" else 0,
            "already_complete": mode == "complete",
            "chunks_written": {"this_process": here, "spawned_workers": sum(by_pid.values())},
            # each spawned worker's own peak, reported with every chunk it wrote
            "peak_worker_rss_mb": max(peak_by_pid.values()) if peak_by_pid else None}
