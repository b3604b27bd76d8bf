"""Read a megatron-core torch_dist checkpoint back one structural group at a time, unsharded.

    with MegatronCheckpointReader("/ckpt/run/checkpoints", cfg) as reader:
        for group in reader.groups():                 # "embedding", "layer 0", ..., "output"
            tensors = reader.read_group(group)        # {world-1 megatron name: tensor}

Whatever TP/PP/EP the checkpoint was saved with, its tensors carry global
keys and offsets; megatron's `dist_checkpointing.load` reshards them into
one world-1 view. A world-1 model built on the *meta* device (no memory)
says, through its sharded state dict, which box of which stored tensor each
parameter is (its layer and expert offsets on the prepended axes); then just
the saved chunks overlapping the boxes asked for are read, into buffers of the
stored dtype (from the DCP metadata: bf16 stays bf16, fp32 norms stay fp32,
values come back bitwise). A chunk's bytes are read straight from its
`torch.save` record into the buffer (`dcp_records`); one stored any other way
goes through torch's DCP reader. No process group is needed to read, and
memory held is what was asked for: one group (the largest is a layer's
experts, or the embedding), independent of the number of layers. A reader
pickles without its open files, for worker processes.

The checkpoint's sharded keys do not depend on the layer spec (megatron maps
the local spec's norms to the Transformer Engine names), so checkpoints saved
with either spec read the same.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

import torch

from gptoss_model.checkpoint.layout import TRACKER_FILE, build_model, checkpoint_iter_dir
from gptoss_model.model.config import GptOssModelConfig
from gptoss_model.checkpoint.dcp_records import RecordSpan, read_into, record_span
from gptoss_model.errors import PermanentError
from gptoss_model.model.parallel import world_of_one


class MegatronCheckpointError(PermanentError, ValueError):
    """Not a readable torch_dist checkpoint of this model (missing tensor, wrong shape, no tracker)."""


def resolve_iter_dir(path: str | Path) -> Path:
    """A checkpoint root (with the tracker file) -> its latest iteration dir; an iteration dir as is."""
    path = Path(path)
    if (path / TRACKER_FILE).is_file():
        iter_dir = checkpoint_iter_dir(path)
    elif (path / "metadata.json").is_file():
        iter_dir = path
    else:
        raise MegatronCheckpointError(f"{path}: neither a megatron checkpoint directory (no {TRACKER_FILE}) nor "
                                      "an iteration directory (no metadata.json)")
    meta = iter_dir / "metadata.json"
    if not meta.is_file():
        raise MegatronCheckpointError(f"{iter_dir}: no metadata.json; the tracker file names an iteration that "
                                      "was not (completely) saved")
    backend = json.loads(meta.read_text()).get("sharded_backend")
    if backend != "torch_dist":
        raise MegatronCheckpointError(f"{meta}: sharded_backend {backend!r}; only torch_dist checkpoints are read")
    return iter_dir


def group_of(local_name: str) -> str:
    """The structural group of a world-1 megatron parameter name."""
    if local_name.startswith("decoder.layers."):
        return f"layer {int(local_name.split('.')[2])}"
    if local_name.startswith("embedding."):
        return "embedding"
    return "output"


@dataclass(frozen=True)
class Region:
    """Where one world-1 megatron parameter lives in the checkpoint: a box of one stored tensor."""

    key: str  # the checkpoint (sharded) key
    offsets: tuple[int, ...]  # global offsets, prepended (layer, expert) axes included
    sizes: tuple[int, ...]  # box size: 1 on prepended axes, then the parameter's shape
    shape: tuple[int, ...]  # the parameter's shape


def _regions(sharded_state_dict: dict) -> dict[str, Region]:
    """{parameter name: Region} from a world-1 model's sharded state dict (factories resolved to one box)."""
    from megatron.core.dist_checkpointing.dict_utils import nested_values
    from megatron.core.dist_checkpointing.mapping import ShardedTensor, ShardedTensorFactory

    out = {}
    for name, entry in sharded_state_dict.items():
        if isinstance(entry, ShardedTensorFactory):
            built = entry.build()
            parts = [t for t in (nested_values(built) if isinstance(built, (dict, list)) else [built])
                     if isinstance(t, ShardedTensor)]
            shape = tuple(entry.data.shape)
        elif isinstance(entry, ShardedTensor):
            parts, shape = [entry], tuple(entry.data.shape)
        else:  # ShardedObject (_extra_state): nothing to export
            continue
        keys = {p.key for p in parts}
        if len(keys) != 1:
            raise MegatronCheckpointError(f"{name}: saved under several keys {sorted(keys)}; not a GPT-OSS layout")
        lo = [min(p.global_offset[d] for p in parts) for d in range(len(parts[0].global_offset))]
        hi = [max(p.global_offset[d] + ((1,) * p.prepend_axis_num + tuple(p.local_shape))[d] for p in parts)
              for d in range(len(lo))]
        sizes = tuple(h - l for h, l in zip(hi, lo))
        volume = 1
        for d in sizes:
            volume *= d
        if volume != entry.data.numel():
            raise MegatronCheckpointError(f"{name}: its checkpoint pieces do not form one box of its shape "
                                          f"{list(shape)}")
        out[name] = Region(keys.pop(), tuple(lo), sizes, shape)
    return out


class _RegionLoadPlanner:
    """The part of DCP's LoadPlanner that FileSystemReader.read_data calls: where each read lands."""

    def __init__(self, buffers: dict[tuple[str, tuple[int, ...]], torch.Tensor]):
        self.buffers = buffers

    def resolve_tensor(self, read_item) -> torch.Tensor:
        target = self.buffers[(read_item.dest_index.fqn, tuple(read_item.dest_index.offset))]
        for dim, (off, length) in enumerate(zip(read_item.dest_offsets, read_item.lengths)):
            target = target.narrow(dim, off, length)
        return target

    def commit_tensor(self, read_item, tensor) -> None:  # the data was copied into our buffer view
        pass

    def load_bytes(self, read_item, value) -> None:
        raise MegatronCheckpointError(f"unexpected byte item {read_item.dest_index.fqn} in a tensor read")


class MegatronCheckpointReader:
    def __init__(self, path: str | Path, cfg: GptOssModelConfig, *, peft=None, adapters_only: bool = False):
        """`peft` (a training PeftConfig): the model carries these LoRA/DoRA adapters, so their tensors
        (`X.adapter.*`) are readable too; `adapters_only`: read (and require) only those."""
        from torch.distributed.checkpoint.metadata import TensorStorageMetadata

        self.iter_dir = resolve_iter_dir(path)
        self.cfg, self.peft, self.adapters_only = cfg, peft, adapters_only
        # Drop the pages of what was read from the page cache (export reads every byte once).
        self.evict_after_read = False
        self._fds: dict[str, int] = {}
        self._spans: dict[tuple[str, tuple[int, ...]], RecordSpan] = {}
        self._open_storage()
        self._tensor_md = {k: v for k, v in self._metadata.state_dict_metadata.items()
                           if isinstance(v, TensorStorageMetadata)}
        self.stored = {k: (tuple(v.size), v.properties.dtype) for k, v in self._tensor_md.items()}
        self._chunk_sizes = {(k, tuple(c.offsets)): tuple(c.sizes) for k, v in self._tensor_md.items()
                             for c in v.chunks}
        self.regions: dict[str, Region] = {}

    def __enter__(self) -> "MegatronCheckpointReader":
        # Which box of which stored tensor each parameter is: from a world-1 model built on the
        # meta device (no memory); megatron needs its parallel state for that, not for reading.
        with world_of_one("reading a megatron checkpoint"):
            model = build_model(self.cfg, torch.float32, device="meta")
            if self.peft is not None:
                from gptoss_model.model.peft import apply_adapters

                apply_adapters(model, self.peft)
            self.regions = _regions(dict(model.sharded_state_dict()))
            del model
        if self.adapters_only:
            self.regions = {n: r for n, r in self.regions.items() if ".adapter." in n}
        self.validate()
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def groups(self) -> list[str]:
        return ["embedding", *(f"layer {i}" for i in range(self.cfg.num_layers)), "output"]

    def validate(self) -> None:
        """Every tensor the model needs is in the checkpoint, and its box lies inside the stored tensor."""
        problems = []
        for name, r in self.regions.items():
            if r.key not in self.stored:
                problems.append(f"{r.key} (for {name}) is missing")
                continue
            size = self.stored[r.key][0]
            if len(size) != len(r.offsets) or any(o + s > d for o, s, d in zip(r.offsets, r.sizes, size)):
                problems.append(f"{r.key} has global shape {list(size)}; the config needs "
                                f"{list(r.sizes)} at {list(r.offsets)} for {name}")
        if problems:
            more = f" (+{len(problems) - 5} more)" if len(problems) > 5 else ""
            raise MegatronCheckpointError(f"checkpoint {self.iter_dir} does not match the GPT-OSS config "
                                          f"({self.cfg.num_layers} layers, hidden {self.cfg.hidden_size}, "
                                          f"{self.cfg.num_experts} experts): " + "; ".join(problems[:5]) + more)

    def stored_dtype(self, name: str) -> torch.dtype:
        return self.stored[self.regions[name].key][1]

    def __getstate__(self) -> dict:
        # What a worker process needs to read (open files are reopened there, lazily).
        state = dict(self.__dict__)
        state.pop("_storage")
        state.pop("_metadata")
        state["_fds"] = {}
        return state

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        self._open_storage()

    def _open_storage(self) -> None:
        from torch.distributed.checkpoint import FileSystemReader

        self._storage = FileSystemReader(str(self.iter_dir))
        self._metadata = self._storage.read_metadata()
        self._storage.set_up_storage_reader(self._metadata, True)

    def close(self) -> None:
        """Close the data files opened by `read` (reopened on the next read)."""
        fds, self._fds = self._fds, {}
        for fd in fds.values():
            os.close(fd)

    def _fd(self, relative_path: str) -> int:
        fd = self._fds.get(relative_path)
        if fd is None:
            fd = self._fds[relative_path] = os.open(self.iter_dir / relative_path, os.O_RDONLY)
        return fd

    def _read_direct(self, item, target: torch.Tensor) -> bool:
        """Read one item's stored chunk straight from the file into `target` (see dcp_records)."""
        info = self._storage.storage_data[item.storage_index]
        if info.transform_descriptors:
            return False
        key = (item.storage_index.fqn, tuple(item.storage_index.offset))
        chunk_sizes = self._chunk_sizes[key]
        dtype = self._tensor_md[key[0]].properties.dtype
        nbytes = dtype.itemsize
        for d in chunk_sizes:
            nbytes *= d
        fd = self._fd(info.relative_path)
        span = self._spans.get(key)
        if span is None:
            span = record_span(fd, info.offset, info.length, nbytes)
            if span is None:
                return False
            self._spans[key] = span
        whole = all(o == 0 for o in item.storage_offsets) and tuple(item.lengths) == chunk_sizes
        if whole and target.is_contiguous():
            read_into(fd, span, memoryview(target.view(torch.uint8).reshape(-1).numpy()) if nbytes else
                      memoryview(b""))
        else:
            stored = torch.empty(chunk_sizes, dtype=dtype)
            read_into(fd, span, memoryview(stored.view(torch.uint8).reshape(-1).numpy()))
            for dim, (off, length) in enumerate(zip(item.storage_offsets, item.lengths)):
                stored = stored.narrow(dim, off, length)
            target.copy_(stored)
        if self.evict_after_read and hasattr(os, "posix_fadvise"):
            os.posix_fadvise(fd, span.offset, span.nbytes, os.POSIX_FADV_DONTNEED)
        return True

    @torch.no_grad()
    def read(self, names: list[str]) -> dict[str, torch.Tensor]:
        """{world-1 megatron name: tensor in its stored dtype}, read (resharded) from the checkpoint."""
        from torch.distributed.checkpoint.metadata import ChunkStorageMetadata
        from torch.distributed.checkpoint.planner import LoadPlan
        from torch.distributed.checkpoint.planner_helpers import create_read_items_for_chunk_list

        out, buffers, items = {}, {}, []
        for name in names:
            r = self.regions[name]
            out[name] = torch.empty(r.shape, dtype=self.stored[r.key][1])
            buffers[(r.key, r.offsets)] = out[name].view(r.sizes)
            chunk = ChunkStorageMetadata(offsets=torch.Size(r.offsets), sizes=torch.Size(r.sizes))
            items += create_read_items_for_chunk_list(r.key, self._tensor_md[r.key], [chunk])
        planner = _RegionLoadPlanner(buffers)
        rest = [item for item in items if not self._read_direct(item, planner.resolve_tensor(item))]
        if rest:  # items stored some other way: torch's reader (torch.load of each item)
            self._storage.read_data(LoadPlan(rest), planner).wait()
        return out

    def read_group(self, group: str) -> dict[str, torch.Tensor]:
        """One structural group ("embedding", "layer i", "output")."""
        names = [n for n in self.regions if group_of(n) == group]
        if not names:
            raise KeyError(f"no tensors in group {group!r}; groups are {self.groups()[0]!r}..{self.groups()[-1]!r}")
        return self.read(names)
