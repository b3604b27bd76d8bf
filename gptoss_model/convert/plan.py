"""Plan a converted checkpoint: every DCP write item, where its data comes from, and which chunk writes it.

The plan is what megatron-core's torch_dist save would do for a world-1 model
built on the *meta* device (so it holds no data): megatron's sharded state dict
-> torch.distributed.checkpoint (DCP) items, global metadata included. It is a
pure function of the HF config and the output dtype, so a rerun after a crash
(or another worker process) gets the same plan, the same chunks and the same
files, byte for byte.

Items are grouped into chunks by model structure, not by size or by worker
count: the embedding, one chunk per transformer layer, the output head. Each
chunk becomes one file `__{chunk}_0.distcp`, which makes the checkpoint's bytes
independent of how many workers wrote it and lets a retry skip every chunk a
previous attempt finished.
"""

from __future__ import annotations

import hashlib
import io
from dataclasses import dataclass, field
from pathlib import Path

import torch

from gptoss_model.errors import PermanentError
from gptoss_model.checkpoint import name_map as nm

PLAN_VERSION = "2"  # bump when the bytes a plan produces change (2: tensors in the writer's order)


class PlanError(PermanentError, RuntimeError):
    """The megatron state dict does not map onto the HF checkpoint."""


@dataclass(frozen=True)
class ItemSource:
    """Where one checkpoint item's data comes from: a view of one megatron parameter."""

    name: str  # megatron (world-1, global) parameter name
    match: nm.Match
    param_shape: tuple[int, ...]
    size: tuple[int, ...]  # the item's view of the parameter (without prepended axes)
    stride: tuple[int, ...]
    storage_offset: int


@dataclass
class Chunk:
    """The items one worker writes into one file, with everything needed to resolve their data."""

    index: int
    label: str  # "embedding", "layer 3", "output"
    items: list = field(default_factory=list)  # DCP WriteItems, in plan order
    sources: dict = field(default_factory=dict)  # (fqn, offset) -> ItemSource, tensor items only
    byte_data: dict = field(default_factory=dict)  # fqn -> serialized object, BYTE_IO items only
    nbytes: int = 0
    params: int = 0

    @property
    def file_name(self) -> str:
        return f"__{self.index}_0.distcp"


@dataclass
class CheckpointPlan:
    metadata: object  # DCP Metadata (state_dict_metadata, mcore data; storage_data filled at the end)
    chunks: list[Chunk]
    dtype: str
    fingerprint: str  # of the input checkpoint, the dtype and this code: guards resumes

    @property
    def params(self) -> int:
        return sum(c.params for c in self.chunks)

    @property
    def nbytes(self) -> int:
        return sum(c.nbytes for c in self.chunks)

    @property
    def num_items(self) -> int:
        return sum(len(c.items) for c in self.chunks)


def item_key(index) -> tuple[str, tuple[int, ...]]:
    return index.fqn, tuple(int(o) for o in index.offset or ())  # BYTE_IO items have no offset


def item_sources(model_sd: dict, params: dict) -> dict:
    """{(sharded key, global offset): ItemSource} for every ShardedTensor of the (factory-applied) state dict."""
    from megatron.core.dist_checkpointing.dict_utils import nested_values
    from megatron.core.dist_checkpointing.mapping import ShardedTensor

    sources = {}
    for local_name, value in model_sd.items():
        items = list(nested_values(value)) if isinstance(value, (dict, list)) else [value]
        for sh in items:
            if not isinstance(sh, ShardedTensor):  # ShardedObject (_extra_state): saved as bytes
                continue
            match = nm.match_megatron(local_name, "local")
            if match is None or local_name not in params:
                raise PlanError(f"megatron tensor {local_name!r} has no HF source in name_map.RULES")
            p = params[local_name]
            d = sh.data
            if d.untyped_storage().data_ptr() != p.untyped_storage().data_ptr() and d.device.type != "meta":
                raise PlanError(f"{local_name}: checkpoint item is not a view of the parameter")
            sources[(sh.key, tuple(int(o) for o in sh.global_offset))] = ItemSource(
                local_name, match, tuple(p.shape), tuple(d.shape), tuple(d.stride()),
                d.storage_offset() - p.storage_offset())
    return sources


def _chunk_of(source: ItemSource | None, num_layers: int) -> tuple[int, str]:
    """Chunk 0 is the embedding (and the small serialized objects), 1..L the layers, L+1 the head."""
    if source is None:
        return 0, "embedding"
    if source.match.layer is not None:
        return 1 + source.match.layer, f"layer {source.match.layer}"
    if source.name.startswith("embedding."):
        return 0, "embedding"
    return num_layers + 1, "output"


def input_fingerprint(hf_dir: Path, file_of: dict[str, Path], dtype: str) -> str:
    """What a partial output must have been made from to be resumed: config, tensor layout, dtype, code."""
    from importlib.metadata import version

    h = hashlib.sha256()
    h.update((hf_dir / "config.json").read_bytes())
    file_sizes = {path: path.stat().st_size for path in set(file_of.values())}
    for name in sorted(file_of):
        h.update(f"{name}\0{file_of[name].name}\0{file_sizes[file_of[name]]}\n".encode())
    h.update(f"dtype={dtype};plan={PLAN_VERSION};torch={torch.__version__};"
             f"megatron-core={version('megatron-core')}".encode())
    return h.hexdigest()[:20]


def plan_checkpoint(sharded_state_dict: dict, model_params: dict, num_layers: int, dtype: str,
                    fingerprint: str) -> CheckpointPlan:
    """The DCP save plan of a megatron sharded state dict (world 1), split into structural chunks.

    `sharded_state_dict` is what megatron's torch_dist strategy receives in `save()`
    (factories applied, common part extracted); its tensors may live on meta.
    """
    from megatron.core.dist_checkpointing.strategies.torch import (
        MCoreSavePlanner, _replace_state_dict_keys_with_sharded_keys, mcore_to_pyt_state_dict)
    from torch.distributed.checkpoint.planner import WriteItemType

    sources = item_sources(sharded_state_dict.get("model", {}), model_params)
    sd, _, _ = _replace_state_dict_keys_with_sharded_keys(sharded_state_dict, True)
    pyt_sd = mcore_to_pyt_state_dict(sd, False)
    planner = MCoreSavePlanner(dedup_replicated_tensors=False, flatten_state_dict=False)
    planner.set_up_planner(pyt_sd, None, True)
    global_plans, metadata = planner.create_global_plan([planner.create_local_plan()])
    final = planner.finish_plan(global_plans[0])

    chunks: dict[int, Chunk] = {}
    for item in final.items:
        key = item_key(item.index)
        if item.type == WriteItemType.BYTE_IO:
            data = planner.resolve_data(item)
            source = None
        else:
            if key not in sources:
                raise PlanError(f"no HF source for checkpoint item {item.index.fqn} at offset {list(key[1])}")
            source = sources[key]
        idx, label = _chunk_of(source, num_layers)
        chunk = chunks.setdefault(idx, Chunk(idx, label))
        chunk.items.append(item)
        if source is None:
            chunk.byte_data[item.index.fqn] = data.getvalue() if isinstance(data, io.BytesIO) else bytes(data)
        else:
            chunk.sources[key] = source
            numel = 1
            for s in item.tensor_data.chunk.sizes:
                numel *= int(s)
            chunk.params += numel
            chunk.nbytes += numel * item.tensor_data.properties.dtype.itemsize
    for chunk in chunks.values():
        chunk.items = writer_order(chunk.items)
    return CheckpointPlan(metadata, [chunks[i] for i in sorted(chunks)], dtype, fingerprint)


def writer_order(items: list) -> list:
    """The order torch's FileSystemWriter asks for a plan's items, whichever loader it picks.

    Byte items come first; tensors come in plan order from its serial loader (no CUDA), but
    sorted by size (a stable sort) from its overlapping loader (CUDA available). A plan already
    sorted that way is asked for in the same order by both, which the converting reader thread
    relies on: it prepares tensors ahead in exactly this order."""
    from torch.distributed.checkpoint.planner import WriteItemType

    def nbytes(item) -> int:
        numel = 1
        for s in item.tensor_data.size:
            numel *= int(s)
        return numel * item.tensor_data.properties.dtype.itemsize

    byte_items = [i for i in items if i.type == WriteItemType.BYTE_IO]
    return byte_items + sorted((i for i in items if i.type != WriteItemType.BYTE_IO), key=nbytes)
