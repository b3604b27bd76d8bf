"""Test datasets in the dataset artifact's formats, from real English text.

The text is the documentation of Python's standard library (real prose,
identical on every machine with the same Python), tokenised by the tiny
checkpoint's byte-level BPE tokenizer and written with megatron-core's
IndexedDatasetBuilder, exactly as the preprocess stage writes shards.
"""
from __future__ import annotations

import importlib
import pydoc
from pathlib import Path

import numpy as np

MODULES = ["argparse", "collections", "json", "pathlib", "logging", "itertools", "functools", "datetime",
           "subprocess", "threading", "random", "statistics", "textwrap", "string", "re", "csv", "shutil",
           "tempfile", "zipfile", "heapq", "bisect", "decimal", "fractions", "difflib", "email", "sqlite3"]


def real_text_documents() -> list[str]:
    docs = []
    for name in MODULES:
        mod = importlib.import_module(name)
        text = pydoc.getdoc(mod)
        for para in text.split("\n\n"):
            para = " ".join(para.split())
            if len(para) > 80:
                docs.append(para)
    return docs


def write_pretrain_shard(prefix: Path, tokenizer, eod_id: int, docs: list[str]) -> dict:
    """{prefix}.bin/.idx with one document per text, EOD appended (int32 ids)."""
    from megatron.core.datasets.indexed_dataset import IndexedDatasetBuilder

    builder = IndexedDatasetBuilder(f"{prefix}.bin", dtype=np.int32)
    tokens = 0
    for text in docs:
        ids = tokenizer.encode(text).ids + [eod_id]
        builder.add_document(np.asarray(ids, dtype=np.int32), [len(ids)])
        tokens += len(ids)
    builder.finalize(f"{prefix}.idx")
    return {"documents": len(docs), "tokens": tokens}


def write_tiny_pretrain_dataset(root: Path, shards: int = 2) -> list[str]:
    """Shards `shard_0000k_text_document` under root; returns the prefixes (absolute)."""
    from gptoss_model.checkpoint.tiny import build_tokenizer

    tok = build_tokenizer()
    eod = tok.token_to_id("<|endoftext|>")
    docs = real_text_documents()
    root.mkdir(parents=True, exist_ok=True)
    prefixes = []
    for k in range(shards):
        prefix = root / f"shard_{k:05d}_text_document"
        write_pretrain_shard(prefix, tok, eod, docs[k::shards])
        prefixes.append(str(prefix))
    return prefixes


def write_tiny_sft_dataset(root: Path, target_length: int = 64) -> list[str]:
    """A packed SFT artifact (sft.json + one shard) from real text: each document is a
    "user" paragraph start (mask 0) and its continuation as the "assistant" (mask 1),
    greedily packed to `target_length` through the preprocess stage's writer."""
    from gptoss_model.data.packed_sft import PackedSample, write_packed_sft, write_sft_metadata
    from gptoss_model.checkpoint.tiny import build_tokenizer

    tok = build_tokenizer()
    eod = tok.token_to_id("<|endoftext|>")
    docs = []
    for text in real_text_documents():
        ids = tok.encode(text).ids[: target_length // 2 - 1]
        if len(ids) < 8:
            continue
        cut = len(ids) // 3
        docs.append((ids + [eod], [0] * cut + [1] * (len(ids) - cut) + [1]))
    samples, current = [], []
    for doc in docs:
        if current and sum(len(t) for t, _ in current) + len(doc[0]) > target_length:
            samples.append(PackedSample.from_documents(current))
            current = []
        current.append(doc)
    if current:
        samples.append(PackedSample.from_documents(current))
    root.mkdir(parents=True, exist_ok=True)
    write_packed_sft(root / "shard_00000_sft", samples, target_length=target_length)
    write_sft_metadata(root, target_length=target_length, pad_token_id=eod, eod_token_id=eod,
                       prefixes=["shard_00000_sft"])
    return [str(root / "shard_00000_sft")]
