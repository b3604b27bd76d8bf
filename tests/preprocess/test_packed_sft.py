"""The packed SFT format: writer and reader agree, files are megatron indexed datasets."""
from __future__ import annotations

import numpy as np
import pytest

from gptoss_model.data.packed_sft import (
    PackedSample,
    PackedSFTDataset,
    PackedSFTFormatError,
    read_sft_metadata,
    write_packed_sft,
    write_sft_metadata,
)


def _samples():
    return [
        PackedSample.from_documents([([5, 6, 7], [0, 1, 1]), ([8, 9], [0, 1])]),
        PackedSample.from_documents([([70000, 2, 3, 4, 1], [0, 0, 1, 1, 1])]),  # an id above uint16
        PackedSample.from_documents([([11], [0]), ([12], [0]), ([13, 14], [0, 1])]),
    ]


def test_round_trip_and_padding(tmp_path):
    prefix = tmp_path / "shard_00000_sft"
    counts = write_packed_sft(prefix, _samples(), target_length=6)
    assert counts == {"samples": 3, "tokens": 5 + 5 + 4, "documents": 6, "loss_tokens": 3 + 3 + 1}
    write_sft_metadata(tmp_path, target_length=6, pad_token_id=99, eod_token_id=1, prefixes=["shard_00000_sft"])

    [ds] = PackedSFTDataset.from_artifact(tmp_path)
    assert len(ds) == 3 and ds.sample_lengths.tolist() == [5, 5, 4]
    first = ds[0]
    assert first["tokens"].dtype == np.int32 and first["loss_mask"].dtype == np.uint8
    assert first["tokens"].tolist() == [5, 6, 7, 8, 9]
    assert first["loss_mask"].tolist() == [0, 1, 1, 0, 1]
    assert first["doc_lengths"].tolist() == [3, 2]
    assert ds[1]["tokens"].tolist() == [70000, 2, 3, 4, 1]
    assert ds[-1]["doc_lengths"].tolist() == [1, 1, 2]

    padded = ds.padded(2)
    assert padded["tokens"].tolist() == [11, 12, 13, 14, 99, 99]
    assert padded["loss_mask"].tolist() == [0, 0, 0, 1, 0, 0]
    assert padded["doc_lengths"].tolist() == [1, 1, 2]
    with pytest.raises(IndexError):
        ds[3]
    assert read_sft_metadata(tmp_path)["eod_token_id"] == 1


def test_files_are_megatron_indexed_datasets(tmp_path):
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    prefix = tmp_path / "p"
    write_packed_sft(prefix, _samples(), target_length=8)
    tokens = IndexedDataset(str(prefix) + "_tokens")
    masks = IndexedDataset(str(prefix) + "_loss_mask")
    lengths = IndexedDataset(str(prefix) + "_doc_lengths")
    assert tokens.index.dtype == np.int32 and masks.index.dtype == np.uint8
    assert len(tokens) == len(masks) == len(lengths) == 3
    assert tokens.document_indices.tolist() == [0, 1, 2, 3]
    assert lengths[2].tolist() == [1, 1, 2]


@pytest.mark.parametrize("sample, message", [
    (PackedSample(np.array([1, 2, 3], np.int32), np.array([0, 1], np.uint8), np.array([3], np.int32)),
     "2 mask values for 3 tokens"),
    (PackedSample(np.array([1, 2, 3], np.int32), np.array([0, 1, 1], np.uint8), np.array([2], np.int32)),
     "do not split"),
    (PackedSample.from_documents([(list(range(9)), [1] * 9)]), "exceed the target length 8"),
])
def test_writer_refuses_inconsistent_samples(tmp_path, sample, message):
    with pytest.raises(PackedSFTFormatError, match=message):
        write_packed_sft(tmp_path / "bad", [sample], target_length=8)


def test_reader_names_missing_part(tmp_path):
    prefix = tmp_path / "p"
    write_packed_sft(prefix, _samples(), target_length=8)
    (tmp_path / "p_loss_mask.idx").unlink()
    with pytest.raises(PackedSFTFormatError, match="p_loss_mask.bin/.idx: missing"):
        PackedSFTDataset(prefix)
