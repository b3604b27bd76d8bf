"""Training data: megatron-core GPTDataset blends (pretraining) and micro-batch iteration.

Order is deterministic (the dataset seed fixes GPTDataset's shuffles) and
position-addressed: global sample k of the run is sample k of the train
split, so resuming at `consumed_samples` continues exactly where the
interrupted run was. Micro-batch j of a step holds, for data-parallel rank
r, the samples consumed + (j * dp + r) * mbs ... + mbs, the order of
Megatron-LM's pretraining sampler: any DP size sees the same global batch.
"""

from __future__ import annotations

import logging
from pathlib import Path
from dataclasses import dataclass
from typing import Iterator

import numpy as np
import torch

from gptoss_model.training.config import ConfigError, RunConfig

log = logging.getLogger(__name__)


@dataclass
class _TokenizerInfo:
    """What GPTDataset needs from a tokenizer (it never tokenises)."""

    vocab_size: int
    eod: int
    pad: int

    @property
    def unique_identifiers(self) -> dict:
        return {"class": "gptoss_model.training.data", "vocab_size": self.vocab_size, "eod": self.eod}


def build_pretrain_datasets(run: RunConfig, vocab_size: int, train_samples: int, valid_samples: int):
    """(train, valid) GPTDatasets over the blend of `data.data_paths` (valid may be None)."""
    from megatron.core.datasets.blended_megatron_dataset_builder import BlendedMegatronDatasetBuilder
    from megatron.core.datasets.gpt_dataset import GPTDataset, GPTDatasetConfig

    d = run.data
    run.data_cache_dir().mkdir(parents=True, exist_ok=True)
    tok = _TokenizerInfo(vocab_size=vocab_size, eod=d.eod_token_id,
                         pad=d.pad_token_id if d.pad_token_id is not None else d.eod_token_id)
    # Unweighted blends sample each prefix in proportion to its size (tokens on disk).
    weights = d.blend_weights or [float(Path(p + ".bin").stat().st_size) for p in d.data_paths]
    config = GPTDatasetConfig(
        random_seed=d.seed, sequence_length=d.seq_length, blend=(list(d.data_paths), weights),
        split=d.split, path_to_cache=str(run.data_cache_dir()), tokenizer=tok,
        reset_position_ids=d.reset_position_ids, reset_attention_mask=d.reset_attention_mask,
        eod_mask_loss=d.eod_mask_loss, create_attention_mask=d.reset_attention_mask,
        mmap_bin_files=True)
    train, valid, _ = BlendedMegatronDatasetBuilder(
        GPTDataset, [train_samples, valid_samples, 0], lambda: True, config).build()
    if train is None:
        raise ConfigError(f"data.split={d.split!r} leaves no training samples in {d.data_paths}")
    return train, valid


def _stack(samples: list[dict]) -> dict[str, torch.Tensor]:
    out = {}
    for k in samples[0]:
        v = [s[k] for s in samples]
        out[k] = torch.stack([x if torch.is_tensor(x) else torch.from_numpy(np.asarray(x)) for x in v])
    return out


class MicroBatches:
    """Micro-batches of one step, for this DP rank, from global sample `consumed` on."""

    def __init__(self, dataset, *, micro_batch_size: int, dp_size: int, dp_rank: int, wrap: bool = True):
        self.dataset, self.mbs, self.dp, self.rank, self.wrap = dataset, micro_batch_size, dp_size, dp_rank, wrap

    def step(self, consumed: int, num_microbatches: int) -> Iterator[dict]:
        n = len(self.dataset)
        for j in range(num_microbatches):
            start = consumed + (j * self.dp + self.rank) * self.mbs
            idx = [(start + i) % n if self.wrap else start + i for i in range(self.mbs)]
            yield _to_batch(_stack([self.dataset[i] for i in idx]))


def _to_batch(raw: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """GPTDataset's sample dict -> model inputs; the attention mask only where it is per-document."""
    batch = {"tokens": raw["tokens"].long(), "labels": raw["labels"].long(),
             "loss_mask": raw["loss_mask"].float(), "position_ids": raw["position_ids"].long()}
    if "attention_mask" in raw:
        batch["attention_mask"] = raw["attention_mask"].bool()
    return batch
