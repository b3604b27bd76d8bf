"""SFT: chat template rendering, assistant-only loss mask, packing."""
from __future__ import annotations

import json

import numpy as np
import pytest

from gptoss_model.data.packed_sft import PackedSFTDataset
from gptoss_model.data.sft import build_sft_dataset, pack_best_fit_decreasing, tokenize_conversation
from gptoss_model.data.sources import BadRecordError


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    from gptoss_model.checkpoint.tiny import build_tokenizer, _write_tokenizer

    out = tmp_path_factory.mktemp("ckpt")
    _write_tokenizer(out, build_tokenizer(), 1024)
    return out


CONVERSATION = [
    {"role": "user", "content": "What is the capital of France?"},
    {"role": "assistant", "content": "Paris is the capital of France."},
    {"role": "user", "content": "And of Italy?"},
    {"role": "assistant", "content": "Rome."},
]


def test_loss_mask_covers_exactly_the_assistant_content(checkpoint):
    from gptoss_model.data.tokenizer import load_hf_tokenizer

    tok = load_hf_tokenizer(checkpoint)
    conv = tokenize_conversation(tok, CONVERSATION)

    def ids(text):
        return tok.backend_tokenizer.encode(text, add_special_tokens=False).ids

    # The harmony-shaped template, written out by hand: (text, trained?) pieces in order.
    pieces = [("<|start|>user<|message|>", 0), ("What is the capital of France?", 0), ("<|end|>", 0),
              ("<|start|>assistant<|channel|>final<|message|>", 0), ("Paris is the capital of France.", 1),
              ("<|end|>", 0), ("<|start|>user<|message|>", 0), ("And of Italy?", 0), ("<|end|>", 0),
              ("<|start|>assistant<|channel|>final<|message|>", 0), ("Rome.", 1), ("<|return|>", 0)]
    expected_ids = [i for text, _ in pieces for i in ids(text)]
    expected_mask = [flag for text, flag in pieces for _ in ids(text)]
    assert conv.tokens.tolist() == expected_ids
    assert conv.loss_mask.tolist() == expected_mask
    trained = tok.decode(conv.tokens[conv.loss_mask == 1].tolist())
    assert trained == "Paris is the capital of France.Rome."


def test_best_fit_decreasing_packs_tightly_and_never_overflows():
    rng = np.random.default_rng(0)
    lengths = rng.integers(20, 700, size=400).tolist()
    bins = pack_best_fit_decreasing(lengths, 1024)
    assert sorted(i for b in bins for i in b) == list(range(400))
    assert all(sum(lengths[i] for i in b) <= 1024 for b in bins)
    lower_bound = -(-sum(lengths) // 1024)
    assert len(bins) <= lower_bound * 1.05, (len(bins), lower_bound)
    assert pack_best_fit_decreasing([5, 5, 5], 10) == [[0, 1], [2]]


def test_build_sft_dataset_end_to_end(tmp_path, checkpoint):
    rng = np.random.default_rng(1)
    words = "the quick brown fox jumps over a lazy dog and the assistant answers".split()
    records = []
    for i in range(60):
        reply = " ".join(rng.choice(words, size=int(rng.integers(3, 40))))
        records.append({"messages": [{"role": "user", "content": f"question {i}?"},
                                     {"role": "assistant", "content": reply}]})
    corpus = tmp_path / "chat.jsonl"
    corpus.write_text("".join(json.dumps(r) + "\n" for r in records))
    metrics = build_sft_dataset([str(corpus)], checkpoint, tmp_path / "out", target_length=256)
    print(f"\nSFT packing efficiency at 256: {metrics['packing_efficiency']:.4f} "
          f"({metrics['documents']} conversations -> {metrics['samples']} samples)")
    assert metrics["documents"] == 60 and metrics["packing_efficiency"] > 0.9
    [ds] = PackedSFTDataset.from_artifact(tmp_path / "out")
    assert len(ds) == metrics["samples"]
    assert int(ds.sample_lengths.max()) <= 256
    assert sum(int(ds[i]["doc_lengths"].size) for i in range(len(ds))) == 60
    assert sum(int(ds[i]["loss_mask"].sum()) for i in range(len(ds))) == metrics["loss_tokens"]


def test_sft_bad_input(tmp_path, checkpoint):
    corpus = tmp_path / "chat.jsonl"
    good = {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]}
    long = {"messages": [{"role": "user", "content": "x " * 400}, {"role": "assistant", "content": "ok"}]}
    corpus.write_text("\n".join([json.dumps(good), json.dumps({"messages": [{"role": "user", "content": "q"}]}),
                                 json.dumps(long)]) + "\n")
    with pytest.raises(BadRecordError, match=r"chat.jsonl:2: not a conversation: .*no assistant message"):
        build_sft_dataset([str(corpus)], checkpoint, tmp_path / "o", target_length=128)
    metrics = build_sft_dataset([str(corpus)], checkpoint, tmp_path / "o2", target_length=128, bad_input="skip")
    assert metrics["skipped_records"]["counts"] == {"not_a_conversation": 1, "too_long": 1}
    assert metrics["skipped_records"]["examples"]["too_long"][0].startswith(f"file://{corpus}:3")
