"""Megatron indexed datasets (`.bin` / `.idx`), written byte for byte as megatron-core writes them.

`.idx`: magic `MMIDIDX\\x00\\x00`, u64 version 1, u8 dtype code, u64 sequence count,
u64 document-index length, int32 sequence lengths, int64 byte pointers, int64 document
indices. `.bin`: the token ids back to back.

Layout as Megatron-LM's `preprocess_data.py` produces it (no sentence splitting): each
document that produced tokens is one sequence; the document index gets one entry per
input document, so a document that produced no tokens repeats the previous entry (it is
an empty document, not a sequence). We keep that to stay byte-identical.
"""
from __future__ import annotations

import struct

import numpy as np

INDEX_MAGIC = b"MMIDIDX\x00\x00"
INDEX_VERSION = 1
DTYPE_CODES = {np.uint8: 1, np.int8: 2, np.int16: 3, np.int32: 4, np.int64: 5, np.float64: 6,
               np.float32: 7, np.uint16: 8}


def dtype_code(dtype) -> int:
    return DTYPE_CODES[np.dtype(dtype).type]


def index_bytes(document_lengths: np.ndarray, dtype) -> bytes:
    """The `.idx` content for documents of these token counts (0 = an empty document)."""
    document_lengths = np.asarray(document_lengths, dtype=np.int64)
    nonempty = document_lengths > 0
    sequence_lengths = document_lengths[nonempty]
    pointers = np.zeros(len(sequence_lengths), dtype=np.int64)
    if len(sequence_lengths) > 1:
        np.cumsum(sequence_lengths[:-1] * np.dtype(dtype).itemsize, out=pointers[1:])
    document_indices = np.concatenate([[0], np.cumsum(nonempty, dtype=np.int64)])
    if len(sequence_lengths) and sequence_lengths.max() > np.iinfo(np.int32).max:
        raise ValueError("a document longer than 2**31 tokens cannot be indexed")
    return b"".join([
        INDEX_MAGIC, struct.pack("<Q", INDEX_VERSION), struct.pack("<B", dtype_code(dtype)),
        struct.pack("<Q", len(sequence_lengths)), struct.pack("<Q", len(document_indices)),
        sequence_lengths.astype(np.int32).tobytes(), pointers.tobytes(), document_indices.tobytes(),
    ])
