"""Packed, loss-masked SFT data: three aligned megatron indexed datasets per shard.

The shared contract between the preprocess stage (writer) and training (reader).
For a shard prefix `P` (e.g. `shard_00000_sft`):

- `P_tokens.bin/.idx`      int32 token ids of each packed sample (length <= target_length);
- `P_loss_mask.bin/.idx`   uint8, 1 on assistant-content tokens whose prediction is trained;
- `P_doc_lengths.bin/.idx` int32, the lengths of the documents packed into that sample, in
  order (they sum to the sample length), so training can restart position ids and block
  attention at every document boundary.

Each file is megatron-core's `IndexedDataset` format written by its
`IndexedDatasetBuilder`; sequence `i` of the three datasets describes packed sample `i`.

Loss-mask alignment: the mask is aligned to the TOKEN position. The label of position `i`
is token `i + 1`, and the mask value that applies to that label is `loss_mask[i + 1]`
(so in a shifted-label training loop, `labels = tokens[1:]` and `mask = loss_mask[1:]`).
A mask of 1 on the first token of a document is never used as a label inside that
document's attention span; the writer keeps it 0 anyway.

Samples are not padded on disk. `PackedSFTDataset.__getitem__` returns the stored
(unpadded) arrays; `padded(i)` pads to `target_length` with `pad_token_id` and mask 0.

`sft.json` at the artifact root describes the whole dataset:
`{"format": "gptoss-packed-sft", "version": 1, "target_length": N, "pad_token_id": ...,
"eod_token_id": ..., "prefixes": [...]}`.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np

from gptoss_model.errors import PermanentError

SFT_FORMAT = "gptoss-packed-sft"
SFT_FORMAT_VERSION = 1
SFT_META_FILE = "sft.json"
PARTS = ("tokens", "loss_mask", "doc_lengths")
_PART_DTYPES = {"tokens": np.int32, "loss_mask": np.uint8, "doc_lengths": np.int32}


class PackedSFTFormatError(PermanentError, ValueError):
    """A packed SFT dataset (or a sample handed to the writer) breaks the format's invariants."""


@dataclass(frozen=True)
class PackedSample:
    """One packed sample: documents back to back, each a (tokens, loss_mask) pair."""

    tokens: np.ndarray       # int32 [L]
    loss_mask: np.ndarray    # uint8 [L]
    doc_lengths: np.ndarray  # int32 [k], sums to L

    @classmethod
    def from_documents(cls, documents: Sequence[tuple[Sequence[int], Sequence[int]]]) -> "PackedSample":
        tokens = np.concatenate([np.asarray(t, dtype=np.int32) for t, _ in documents]) if documents \
            else np.zeros(0, np.int32)
        mask = np.concatenate([np.asarray(m, dtype=np.uint8) for _, m in documents]) if documents \
            else np.zeros(0, np.uint8)
        lengths = np.asarray([len(t) for t, _ in documents], dtype=np.int32)
        return cls(tokens, mask, lengths)


def part_prefix(prefix: str | os.PathLike, part: str) -> str:
    return f"{os.fspath(prefix)}_{part}"


def write_packed_sft(prefix: str | os.PathLike, samples: Iterable[PackedSample], *,
                     target_length: int) -> dict:
    """Write packed samples as the three aligned indexed datasets under `prefix`.

    Returns {"samples", "tokens", "documents", "loss_tokens"}. Refuses (before anything
    inconsistent is written) a sample whose arrays disagree or that exceeds `target_length`.
    """
    from megatron.core.datasets.indexed_dataset import IndexedDatasetBuilder

    builders = {part: IndexedDatasetBuilder(part_prefix(prefix, part) + ".bin", dtype=_PART_DTYPES[part])
                for part in PARTS}
    counts = {"samples": 0, "tokens": 0, "documents": 0, "loss_tokens": 0}
    for index, sample in enumerate(samples):
        _check_sample(sample, target_length, where=f"{prefix} sample {index}")
        builders["tokens"].add_document(sample.tokens, [len(sample.tokens)])
        builders["loss_mask"].add_document(sample.loss_mask, [len(sample.loss_mask)])
        builders["doc_lengths"].add_document(sample.doc_lengths, [len(sample.doc_lengths)])
        counts["samples"] += 1
        counts["tokens"] += int(len(sample.tokens))
        counts["documents"] += int(len(sample.doc_lengths))
        counts["loss_tokens"] += int(sample.loss_mask.sum())
    for part, builder in builders.items():
        builder.finalize(part_prefix(prefix, part) + ".idx")
    return counts


def _check_sample(sample: PackedSample, target_length: int, *, where: str) -> None:
    n = len(sample.tokens)
    if len(sample.loss_mask) != n:
        raise PackedSFTFormatError(f"{where}: {len(sample.loss_mask)} mask values for {n} tokens")
    if int(np.sum(sample.doc_lengths, dtype=np.int64)) != n or (len(sample.doc_lengths) and
                                                               sample.doc_lengths.min() <= 0):
        raise PackedSFTFormatError(f"{where}: document lengths {sample.doc_lengths.tolist()} "
                                   f"do not split its {n} tokens")
    if n > target_length:
        raise PackedSFTFormatError(f"{where}: {n} tokens exceed the target length {target_length}")
    if n == 0:
        raise PackedSFTFormatError(f"{where}: empty sample")


def write_sft_metadata(root: str | os.PathLike, *, target_length: int, pad_token_id: int,
                       eod_token_id: int | None, prefixes: Sequence[str]) -> Path:
    meta = {"format": SFT_FORMAT, "version": SFT_FORMAT_VERSION, "target_length": int(target_length),
            "pad_token_id": int(pad_token_id),
            "eod_token_id": None if eod_token_id is None else int(eod_token_id),
            "prefixes": list(prefixes)}
    path = Path(root) / SFT_META_FILE
    path.write_text(json.dumps(meta, indent=2) + "\n")
    return path


def read_sft_metadata(root: str | os.PathLike) -> dict:
    path = Path(root) / SFT_META_FILE
    try:
        meta = json.loads(path.read_text())
    except FileNotFoundError:
        raise PackedSFTFormatError(f"{path}: missing; not a packed SFT dataset") from None
    if meta.get("format") != SFT_FORMAT or meta.get("version") != SFT_FORMAT_VERSION:
        raise PackedSFTFormatError(f"{path}: format {meta.get('format')!r} version {meta.get('version')!r}, "
                                   f"expected {SFT_FORMAT!r} version {SFT_FORMAT_VERSION}")
    return meta


class PackedSFTDataset:
    """Reads one shard prefix of packed SFT data (see the module docstring)."""

    def __init__(self, prefix: str | os.PathLike, *, target_length: int | None = None,
                 pad_token_id: int = 0) -> None:
        from megatron.core.datasets.indexed_dataset import IndexedDataset

        self.prefix = os.fspath(prefix)
        self.target_length = target_length
        self.pad_token_id = pad_token_id
        self._parts = {}
        for part in PARTS:
            path = part_prefix(self.prefix, part)
            if not (os.path.exists(path + ".bin") and os.path.exists(path + ".idx")):
                raise PackedSFTFormatError(f"{path}.bin/.idx: missing (packed SFT prefix {self.prefix!r})")
            self._parts[part] = IndexedDataset(path, mmap=True)
        sizes = {part: len(ds) for part, ds in self._parts.items()}
        if len(set(sizes.values())) != 1:
            raise PackedSFTFormatError(f"{self.prefix}: parts hold different sample counts {sizes}")
        for part, ds in self._parts.items():
            if ds.index.dtype != _PART_DTYPES[part]:
                raise PackedSFTFormatError(f"{self.prefix}_{part}.idx: dtype {ds.index.dtype.__name__}, "
                                           f"expected {_PART_DTYPES[part].__name__}")
        if not np.array_equal(self._parts["tokens"].sequence_lengths, self._parts["loss_mask"].sequence_lengths):
            raise PackedSFTFormatError(f"{self.prefix}: tokens and loss_mask lengths differ")

    @classmethod
    def from_artifact(cls, root: str | os.PathLike) -> list["PackedSFTDataset"]:
        """One dataset per prefix listed in `root/sft.json`, with its target length and pad id."""
        meta = read_sft_metadata(root)
        return [cls(Path(root) / prefix, target_length=meta["target_length"], pad_token_id=meta["pad_token_id"])
                for prefix in meta["prefixes"]]

    def __len__(self) -> int:
        return len(self._parts["tokens"])

    @property
    def sample_lengths(self) -> np.ndarray:
        return self._parts["tokens"].sequence_lengths

    def __getitem__(self, index: int) -> dict:
        if not -len(self) <= index < len(self):
            raise IndexError(f"sample {index} out of range for {len(self)} samples in {self.prefix}")
        index %= len(self)
        return {part: np.asarray(self._parts[part][index], dtype=_PART_DTYPES[part]) for part in PARTS}

    def padded(self, index: int) -> dict:
        """Sample `index` padded to `target_length` (pad id, mask 0); doc_lengths unchanged."""
        if self.target_length is None:
            raise PackedSFTFormatError(f"{self.prefix}: no target_length to pad to")
        sample = self[index]
        pad = self.target_length - len(sample["tokens"])
        if pad < 0:
            raise PackedSFTFormatError(f"{self.prefix} sample {index}: {len(sample['tokens'])} tokens exceed "
                                       f"the target length {self.target_length}")
        sample["tokens"] = np.concatenate([sample["tokens"], np.full(pad, self.pad_token_id, np.int32)])
        sample["loss_mask"] = np.concatenate([sample["loss_mask"], np.zeros(pad, np.uint8)])
        return sample
