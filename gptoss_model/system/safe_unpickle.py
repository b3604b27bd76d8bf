"""Reading pickles that came from outside (the store, the Hub, a shared work dir) without running them.

A pickle can name any importable callable and call it while loading: `pickle.load`
of a planted file runs its author's code. torch_dist checkpoints keep their index in
`.metadata`, a pickle that torch's `FileSystemReader.read_metadata` loads with plain
`pickle.load`; a `megatron-checkpoint` or `train-checkpoint` version anyone can write
to the store (a shared bucket) would run code on every machine that exports,
verifies, trains or resumes from it. `RestrictedUnpickler` admits only the classes
that DCP metadata and write results are made of (dataclasses and enums of
`torch.distributed.checkpoint`, `torch.Size`, dtypes, layouts, memory formats); any
other global is refused with the file named, before anything is called.

The other pickles in a torch_dist checkpoint are torch.load'ed: `common.pt` and sharded
objects by megatron with torch's default (weights_only=True since torch 2.6), but the byte
items inside `.distcp` files (the RNG state, `_extra_state`) by torch's DefaultLoadPlanner
with weights_only=False. `install()` routes `FileSystemReader.read_metadata` through the
restricted unpickler and `DefaultLoadPlanner.load_bytes` through `safe_torch_load`
(weights-only, numpy arrays admitted), for every reader in the process (megatron-core's
dist_checkpointing and our own). `gptoss_model.checkpoint.layout` calls it when imported,
which every checkpoint path does.
"""

from __future__ import annotations

import contextlib
import io
import pickle
import re
from pathlib import Path

import torch

from gptoss_model.errors import PermanentError

_DCP_MODULES = ("torch.distributed.checkpoint.metadata", "torch.distributed.checkpoint.planner",
                "torch.distributed.checkpoint.storage", "torch.distributed.checkpoint.filesystem")
_BUILTINS = {"set", "frozenset", "slice", "complex"}
_COLLECTIONS = {"OrderedDict", "defaultdict"}


class UnsafePickleError(PermanentError, pickle.UnpicklingError):
    """A pickle from outside names something other than checkpoint metadata (names the file)."""


class RestrictedUnpickler(pickle.Unpickler):
    def __init__(self, file, what: str):
        super().__init__(file)
        self.what = what

    def find_class(self, module: str, name: str):
        if module in _DCP_MODULES and not name.startswith("__"):
            obj = super().find_class(module, name)
            if isinstance(obj, type):  # dataclasses, enums, named tuples: data, not behaviour
                return obj
        elif module == "torch" and (name == "Size" or isinstance(getattr(torch, name, None), torch.dtype)):
            return getattr(torch, name)
        elif module == "torch.serialization" and name == "_get_layout":
            return super().find_class(module, name)
        elif module == "builtins" and name in _BUILTINS:
            return super().find_class(module, name)
        elif module == "collections" and name in _COLLECTIONS:
            return super().find_class(module, name)
        raise UnsafePickleError(f"{self.what}: refused to unpickle {module}.{name}: only torch_dist checkpoint "
                                "metadata may be read from a checkpoint (the file may have been tampered with)")


def restricted_loads(data: bytes, what: str):
    return RestrictedUnpickler(io.BytesIO(data), what).load()


def restricted_load_file(path: str | Path):
    return restricted_loads(Path(path).read_bytes(), str(path))


def _read_metadata(self, *args, **kwargs):
    from torch.distributed.checkpoint.metadata import StorageMeta

    path = self._get_metadata_path(kwargs.get("rank"))
    with self.fs.create_stream(path, "rb") as f:
        metadata = RestrictedUnpickler(f, str(path)).load()
    if getattr(metadata, "storage_meta", None) is None:
        metadata.storage_meta = StorageMeta()
    metadata.storage_meta.load_id = self.load_id
    return metadata


def _numpy_globals() -> list:
    """What numpy arrays and RNG states (saved in a checkpoint's rng_state) are rebuilt from."""
    import numpy as np

    multiarray = getattr(np, "_core", None) or np.core
    return [multiarray.multiarray._reconstruct, np.ndarray, np.dtype, type(np.dtype(np.uint32)),
            type(np.dtype(np.float64)), type(np.dtype(np.int64))]


def safe_torch_load(value, what: str = "checkpoint bytes"):
    """torch.load with weights_only=True (tensors, containers, numpy arrays); the refusal names `what`."""
    try:
        with torch.serialization.safe_globals(_numpy_globals()):
            return torch.load(value, weights_only=True, map_location="cpu")
    except pickle.UnpicklingError as e:
        raise UnsafePickleError(f"{what}: refused to unpickle: {str(e).splitlines()[0]}") from e


def _load_bytes(self, read_item, value) -> None:
    """DefaultLoadPlanner.load_bytes (torch 2.13) with a weights-only load instead of weights_only=False."""
    from torch.distributed.checkpoint._traverse import set_element

    obj = safe_torch_load(value, f"checkpoint item {read_item.dest_index.fqn}")
    if self.flatten_state_dict:
        set_element(self.original_state_dict, self.mappings[read_item.dest_index.fqn], obj)
    else:
        self.state_dict[read_item.dest_index.fqn] = obj


@contextlib.contextmanager
def refusals_named():
    """Around a dist_checkpointing load: a refusal as the caller's error.

    torch's DCP reports a reader's exception as a CheckpointException (a BaseException, so
    an `except Exception` misses it) holding only its text; a refusal comes back out as
    UnsafePickleError (permanent, naming the file), anything unpickling refused as well."""
    from torch.distributed.checkpoint.api import CheckpointException

    try:
        yield
    except CheckpointException as e:
        found = re.search(r"(\S+: refused to unpickle[^\n]*)", str(e))
        if found:
            raise UnsafePickleError(found.group(1)) from None
        raise
    except pickle.UnpicklingError as e:  # torch.load's weights-only refusal of common.pt or an object file
        if isinstance(e, UnsafePickleError):
            raise
        raise UnsafePickleError(f"refused to unpickle a checkpoint file: {str(e).splitlines()[0]}") from e


def install() -> None:
    """Route torch's FileSystemReader.read_metadata through the restricted unpickler and the
    default load planner's byte items through a weights-only load (idempotent)."""
    from torch.distributed.checkpoint.default_planner import DefaultLoadPlanner
    from torch.distributed.checkpoint.filesystem import FileSystemReader

    if getattr(FileSystemReader.read_metadata, "_gptoss_restricted", False):
        return
    _read_metadata._gptoss_restricted = True
    FileSystemReader.read_metadata = _read_metadata
    DefaultLoadPlanner.load_bytes = _load_bytes
