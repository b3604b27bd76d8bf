"""SFT batches from the packed, loss-masked dataset artifact (gptoss_model.data.packed_sft).

A packed sample of documents d1 d2 ... (lengths from `doc_lengths`) becomes:
  tokens        the sample padded to data.seq_length with the pad id;
  labels[i]     tokens[i + 1] (the pad id at the end);
  loss_mask[i]  loss_mask[i + 1] of the stored mask (the format's alignment), and 0
                where i is the last token of a document (its "next token" belongs to
                another document) and on padding;
  position_ids  restart at 0 at every document (padding counts as one more document);
  attention     block-diagonal causal: a token sees only earlier tokens of its own
                document (`attention_mask`, True = masked, megatron's convention).
Order: the samples of all prefixes, permuted once with data.seed, the last
`valid` share of data.split held out for validation.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from gptoss_model.training.config import ConfigError, RunConfig


def sample_to_batch(sample: dict, seq_length: int, pad_id: int) -> dict[str, torch.Tensor]:
    tokens = np.asarray(sample["tokens"], dtype=np.int64)
    mask = np.asarray(sample["loss_mask"], dtype=np.float32)
    docs = [int(x) for x in sample["doc_lengths"]]
    n = len(tokens)
    if n > seq_length:
        raise ConfigError(f"data.seq_length={seq_length}: a packed sample has {n} tokens; set seq_length to "
                          "the dataset's target_length (sft.json) or more")
    if sum(docs) != n:
        raise ValueError(f"packed sample: doc_lengths sum to {sum(docs)}, the sample has {n} tokens")
    pad = seq_length - n
    if pad:
        docs.append(pad)
    full = np.concatenate([tokens, np.full(pad, pad_id, np.int64)])
    labels = np.concatenate([full[1:], [pad_id]])
    loss = np.zeros(seq_length, np.float32)
    loss[: n - 1] = mask[1:n]
    positions = np.concatenate([np.arange(d) for d in docs])
    doc_id = np.repeat(np.arange(len(docs)), docs)
    ends = np.cumsum(docs) - 1
    loss[ends] = 0.0  # the label after a document's last token is another document's
    same_doc = doc_id[:, None] == doc_id[None, :]
    causal = np.tril(np.ones((seq_length, seq_length), dtype=bool))
    return {"tokens": torch.from_numpy(full), "labels": torch.from_numpy(labels),
            "loss_mask": torch.from_numpy(loss), "position_ids": torch.from_numpy(positions.astype(np.int64)),
            "attention_mask": torch.from_numpy(~(same_doc & causal))[None]}


class PackedSFTSplit:
    """A view of some samples of several packed shards, as batch dicts of one sequence each."""

    def __init__(self, shards: list, index: np.ndarray, seq_length: int, pad_id: int):
        self.shards, self.index, self.seq_length, self.pad_id = shards, index, seq_length, pad_id

    def __len__(self) -> int:
        return len(self.index)

    def __getitem__(self, i: int) -> dict:
        shard, j = self.index[i]
        return sample_to_batch(self.shards[shard][int(j)], self.seq_length, self.pad_id)


def _metadata(prefix: str) -> dict:
    from gptoss_model.data.packed_sft import SFT_META_FILE, read_sft_metadata

    root = Path(prefix).parent
    return read_sft_metadata(root) if (root / SFT_META_FILE).is_file() else {}


def build_sft_datasets(run: RunConfig):
    """(train, valid) splits over the packed SFT prefixes in data.data_paths."""
    from gptoss_model.data.packed_sft import PackedSFTDataset

    d = run.data
    metas = [_metadata(p) for p in d.data_paths]
    pad_id = d.pad_token_id if d.pad_token_id is not None else next(
        (m["pad_token_id"] for m in metas if "pad_token_id" in m), d.eod_token_id)
    for p, m in zip(d.data_paths, metas):
        if m.get("target_length", 0) > d.seq_length:
            raise ConfigError(f"data.seq_length={d.seq_length} is shorter than {p}'s packed target_length "
                              f"{m['target_length']} (sft.json)")
    shards = [PackedSFTDataset(p) for p in d.data_paths]
    index = np.array([(s, j) for s, ds in enumerate(shards) for j in range(len(ds))], dtype=np.int64)
    if not len(index):
        raise ConfigError(f"data.data_paths: no packed samples in {d.data_paths}")
    index = index[np.random.default_rng(d.seed).permutation(len(index))]
    shares = [float(x) for x in d.split.split(",")]
    n_valid = int(round(len(index) * shares[1] / sum(shares)))
    train = PackedSFTSplit(shards, index[: len(index) - n_valid], d.seq_length, pad_id)
    valid = PackedSFTSplit(shards, index[len(index) - n_valid:], d.seq_length, pad_id) if n_valid else None
    return train, valid
