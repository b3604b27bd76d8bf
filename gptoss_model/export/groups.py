"""What export writes, group by group: the plan of HF tensors and the code that produces them.

A structural group ("embedding", "layer i", "output") is the unit of work: one
process reads the group's megatron tensors (`megatron_reader`, one expert at a
time, the next one read in a background thread), maps them to HF names and
layouts (`name_map`), quantizes experts for MXFP4, and writes each tensor, or
each expert's rows of a stacked one, at its place in the shard files
(`safetensors_writer.ShardFiles`). A finished group is fsynced and then marked
done in the export's state dir, so a retry after a crash (kill -9 included)
writes only the other groups, and the bytes never depend on which process
wrote what. `export.py` plans, spreads the groups over workers and finishes.
"""

from __future__ import annotations

import hashlib
import json
import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, Iterator

import torch

from gptoss_model.checkpoint import mxfp4
from gptoss_model.checkpoint import name_map as nm
from gptoss_model.model.config import GptOssModelConfig
from gptoss_model.errors import PermanentError
from gptoss_model.checkpoint.megatron_reader import MegatronCheckpointReader
from gptoss_model.system.resources import peak_rss_mb
from gptoss_model.checkpoint.safetensors_writer import ShardFiles, ShardPlan, ShardWriter, TensorSpec

# Temporaries per quantize step of the float path (fp32 checkpoints; bf16 ones take mxfp4's table
# path, whose steps are fixed): 4 MiB (mxfp4's default) measured 4x slower than 128 MiB on this
# 2-core machine (per-step overhead); 128 MiB is small beside the layer held anyway.
QUANTIZE_CHUNK_BYTES = 128 << 20
EXPORT_LAYOUT_VERSION = 1  # part of the resume fingerprint: bump when the bytes for the same input change


class ExportError(PermanentError, ValueError):
    """The export cannot be made (bad format, non-empty output dir, config that does not fit)."""


def _tensor_dtype(weight_format: str) -> torch.dtype:
    return torch.float32 if weight_format == "float32" else torch.bfloat16


# ----------------------------------------------------------------- the plan
def _layer_groups(cfg: GptOssModelConfig, group: str) -> list[nm.Match]:
    """The name_map groups (rule, layer) of one structural group, in the order they are written."""
    if group == "embedding":
        return [m for m in nm.iter_groups(cfg) if m.rule.hf[0] == "model.embed_tokens.weight"]
    if group == "output":
        return [m for m in nm.iter_groups(cfg) if m.layer is None and m.rule.hf[0] != "model.embed_tokens.weight"]
    layer = int(group.split()[1])
    return [nm.Match(rule, layer) for rule in nm.RULES if "{layer}" in rule.hf[0]]


def hf_tensor_specs(cfg: GptOssModelConfig, weight_format: str, group: str) -> list[TensorSpec]:
    """What one structural group becomes in the HF checkpoint: names, shapes and dtypes, in file order."""
    dtype = _tensor_dtype(weight_format)
    specs = []
    for match in _layer_groups(cfg, group):
        for name, shape in zip(match.hf_names(), match.hf_shapes(cfg)):
            if weight_format == "mxfp4" and nm.is_mxfp4_stored(match.rule):
                if shape[1] % mxfp4.GROUP:  # HF [E, in, out]
                    raise ExportError(f"{name}: in_features {shape[1]} is not a multiple of {mxfp4.GROUP}; it "
                                      "cannot be stored as MXFP4 (export as bfloat16 instead)")
                blocks, scales = mxfp4.mxfp4_pair_names(name)
                blocks_shape, scales_shape = nm.mxfp4_stored_shapes(shape)
                specs.append(TensorSpec(blocks, blocks_shape, torch.uint8))
                specs.append(TensorSpec(scales, scales_shape, torch.uint8))
            else:
                specs.append(TensorSpec(name, tuple(shape), dtype))
    return specs


def group_names(cfg: GptOssModelConfig) -> list[str]:
    return ["embedding", *(f"layer {i}" for i in range(cfg.num_layers)), "output"]


def shard_plan(cfg: GptOssModelConfig, weight_format: str, max_shard_bytes: int) -> ShardPlan:
    specs = [s for g in group_names(cfg) for s in hf_tensor_specs(cfg, weight_format, g)]
    return ShardPlan.make(specs, max_shard_bytes)


# ------------------------------------------------------------- conversion
def _mxfp4_expert(match: nm.Match, megatron_expert: torch.Tensor, cfg: GptOssModelConfig):
    """One expert's megatron weight -> MXFP4 (blocks, scales) of its stored [out, in] rows.

    The megatron weight is a selection of stored rows (`stored_rows`: fc1 = even rows then odd
    rows, fc2 = all): its contiguous rows are quantized as they are and the results put in
    stored order. Quantization is row by row, so this is the quantization of the HF matrix's
    transpose, without materialising that transpose.
    """
    selections = match.rule.mapping.stored_rows
    if selections is None:
        (hf,) = match.rule.mapping.to_hf(megatron_expert, cfg)
        return mxfp4.quantize(hf.transpose(0, 1), max_chunk_bytes=QUANTIZE_CHUNK_BYTES)
    blocks, scales = mxfp4.quantize(megatron_expert, max_chunk_bytes=QUANTIZE_CHUNK_BYTES)
    stored_blocks, stored_scales = torch.empty_like(blocks), torch.empty_like(scales)
    start = 0
    for rows in selections:
        count = len(range(blocks.shape[0])[rows])
        stored_blocks[rows] = blocks[start:start + count]
        stored_scales[rows] = scales[start:start + count]
        start += count
    if start != blocks.shape[0]:
        raise ExportError(f"{match.megatron_name('local', 0)}: its stored-row selections cover {start} of "
                          f"{blocks.shape[0]} rows")
    return stored_blocks, stored_scales


def _read_ahead(reader, names: list[str]) -> Iterator[torch.Tensor]:
    """The tensors `names`, in order, each read in a background thread while the previous one is
    being transformed and written (the read waits on the disk, the transform on the CPU)."""
    with ThreadPoolExecutor(1, thread_name_prefix="export-read") as pool:
        pending = pool.submit(reader.read, names[:1]) if names else None
        for i, name in enumerate(names):
            value = pending.result()[name]
            pending = pool.submit(reader.read, names[i + 1:i + 2]) if i + 1 < len(names) else None
            yield value


def write_group(reader: MegatronCheckpointReader, writer: ShardWriter, cfg: GptOssModelConfig,
                weight_format: str, group: str, on_tensor: Callable[[], None]) -> None:
    """Read one structural group from the checkpoint and write its HF tensors where the plan puts them.

    Stacked expert tensors are produced one expert at a time (read, map, write its rows), so memory
    is one expert's tensor, not a layer's experts (6 GB of bf16 per layer for gpt-oss-120b).
    """
    dtype = _tensor_dtype(weight_format)
    for match in _layer_groups(cfg, group):
        mapping, hf_name = match.rule.mapping, match.hf_names()[0]
        if not mapping.per_expert:
            name = match.megatron_name("local")
            for out_name, value in nm.megatron_to_hf(reader.read([name]), cfg):
                writer.write_rows(out_name, value.to(dtype))
                on_tensor()
            continue
        experts = [match.megatron_name("local", e) for e in range(cfg.num_experts)]
        if weight_format == "mxfp4" and nm.is_mxfp4_stored(match.rule):
            blocks_name, scales_name = mxfp4.mxfp4_pair_names(hf_name)
            for e, expert in enumerate(_read_ahead(reader, experts)):
                blocks, scales = _mxfp4_expert(match, expert, cfg)
                writer.write_rows(blocks_name, blocks.unsqueeze(0), e)
                writer.write_rows(scales_name, scales.unsqueeze(0), e)
            on_tensor()
            on_tensor()
            continue
        for e, expert in enumerate(_read_ahead(reader, experts)):
            (value,) = mapping.to_hf(expert, cfg)
            writer.write_rows(hf_name, value.to(dtype).unsqueeze(0), e)
        on_tensor()
    writer.sync()


# ------------------------------------------------------- groups and workers
@dataclass(frozen=True)
class ExportJob:
    """What a process needs to write one group: picklable, sent with each group to a worker."""

    reader: object  # MegatronCheckpointReader or AdaptedReader (both pickle without open files)
    files: ShardFiles
    cfg: GptOssModelConfig
    weight_format: str
    state_dir: Path
    fingerprint: str


def _marker(state_dir: Path, group: str) -> Path:
    return state_dir / f"{group.replace(' ', '-')}.done"


def run_group(job: ExportJob, group: str, on_tensor: Callable[[], None] | None = None) -> tuple[int, float]:
    """Write one group, make it durable, then mark it done; returns (pid, peak RSS MB)."""
    writer = job.files.writer()
    try:
        write_group(job.reader, writer, job.cfg, job.weight_format, group, on_tensor or (lambda: None))
    finally:
        writer.close()
    marker = _marker(job.state_dir, group)
    tmp = marker.with_suffix(f".tmp-{os.getpid()}")
    tmp.write_text(json.dumps({"group": group, "fingerprint": job.fingerprint}))
    os.replace(tmp, marker)
    return os.getpid(), peak_rss_mb()


def imported() -> None:
    """A worker's initializer: unpickling it imports this module (torch, DCP: ~2 s), all the warm-up needed."""


def run_group_in_worker(job: ExportJob, group: str) -> tuple[int, float]:
    with torch.no_grad():  # the reader arrives with its settings (evict_after_read) as the exporter set them
        return run_group(job, group)


def finished_groups(state_dir: Path, fingerprint: str) -> set[str]:
    done = set()
    for marker in state_dir.glob("*.done"):
        try:
            entry = json.loads(marker.read_text())
        except (OSError, ValueError):
            continue  # a marker being replaced or damaged: that group is written again
        if isinstance(entry, dict) and entry.get("fingerprint") == fingerprint:
            done.add(str(entry.get("group")))
    return done


def export_fingerprint(reader, cfg: GptOssModelConfig, files: ShardFiles) -> str:
    """What the bytes of an export depend on: the source checkpoint(s), the config and the shard plan."""
    digest = hashlib.sha256(f"gptoss-export/{EXPORT_LAYOUT_VERSION}".encode())
    sources = [reader.base.iter_dir, reader.iter_dir] if hasattr(reader, "base") else [reader.iter_dir]
    for iter_dir in sources:
        digest.update(hashlib.sha256((Path(iter_dir) / ".metadata").read_bytes()).digest())
    digest.update(json.dumps(asdict(cfg), sort_keys=True, default=str).encode())
    for header in files.headers:
        digest.update(header)
    return digest.hexdigest()
