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
from pathlib import Path

import numpy as np

INDEX_MAGIC = b"MMIDIDX\x00\x00"
INDEX_VERSION = 1
DTYPE_CODES = {np.uint8: 1, np.int8: 2, np.int16: 3, np.int32: 4, np.int64: 5, np.float64: 6,
               np.float32: 7, np.uint16: 8}


HEADER_BYTES = len(INDEX_MAGIC) + 8 + 1 + 8 + 8


def dtype_code(dtype) -> int:
    return DTYPE_CODES[np.dtype(dtype).type]


def check_indexed(prefix: str) -> tuple[np.dtype, int, int]:
    """(token dtype, sequences, documents) of `{prefix}.idx`, after checking that the index holds the
    arrays its header announces and `{prefix}.bin` the tokens they point at (reads the header and
    two entries). ValueError, saying what is wrong, for a foreign, truncated or mismatched pair."""
    idx, binary = Path(prefix + ".idx"), Path(prefix + ".bin")
    with open(idx, "rb") as f:
        head = f.read(HEADER_BYTES)
        if len(head) < HEADER_BYTES or head[: len(INDEX_MAGIC)] != INDEX_MAGIC:
            raise ValueError("not a megatron indexed dataset index (bad header)")
        version, code, sequences, documents = struct.unpack("<QBQQ", head[len(INDEX_MAGIC):])
        dtype = next((np.dtype(t) for t, c in DTYPE_CODES.items() if c == code), None)
        if version != INDEX_VERSION or dtype is None:
            raise ValueError(f"unsupported index version {version} / dtype code {code}")
        # lengths int32[seq], pointers int64[seq], document indices int64[doc] (+ optional modes int8[seq])
        arrays = sequences * (4 + 8) + documents * 8
        size = idx.stat().st_size
        if size - HEADER_BYTES not in (arrays, arrays + sequences):
            raise ValueError(f"{size} bytes, but its header announces {sequences} sequences and {documents} "
                             f"documents ({HEADER_BYTES + arrays} bytes): truncated or not IndexedDatasetBuilder's")
        if sequences:
            f.seek(HEADER_BYTES + (sequences - 1) * 4)
            (last_length,) = struct.unpack("<i", f.read(4))
            f.seek(HEADER_BYTES + sequences * 4 + (sequences - 1) * 8)
            (last_pointer,) = struct.unpack("<q", f.read(8))
            want = last_pointer + last_length * dtype.itemsize
            if binary.stat().st_size != want:
                raise ValueError(f"{binary} holds {binary.stat().st_size} bytes, its index points to {want}: "
                                 "truncated or from another dataset")
    return dtype, sequences, documents


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
