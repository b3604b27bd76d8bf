"""The artifact kinds: the one place their names are spelled.

A kind is the first part of an artifact spec (`KIND/NAME[@VERSION|@REF]`) and the
top folder of the store. `Kind` is a `str` enum, so a kind read from a manifest
compares equal to its member and formats as its name.
"""
from __future__ import annotations

from enum import StrEnum


class Kind(StrEnum):
    HF_CHECKPOINT = "hf-checkpoint"              # a Hugging Face model dir (download)
    MEGATRON_CHECKPOINT = "megatron-checkpoint"  # megatron-core torch_dist (convert)
    DATASET = "dataset"                          # megatron indexed or packed SFT shards (preprocess)
    TRAIN_CHECKPOINT = "train-checkpoint"        # one checkpoint of a training run (train)
    HF_EXPORT = "hf-export"                      # a Hugging Face dir made from a megatron one (export)
    VERIFY_REPORT = "verify-report"              # numbers against the reference (verify)


MEGATRON_KINDS = (Kind.MEGATRON_CHECKPOINT, Kind.TRAIN_CHECKPOINT)
HF_KINDS = (Kind.HF_EXPORT, Kind.HF_CHECKPOINT)
