"""The tiktoken engine: same ids as tokenizers, refusal of what it cannot convert, and its
per-unit check against tokenizers. (Golden bytes on both engines: test_pretrain.py.)"""
from __future__ import annotations

import json
import numpy as np
import pytest

from gptoss_model.data.pretrain import PretrainOptions, build_pretraining_dataset
from gptoss_model.data.tiktoken_engine import GPT2_PATTERN, AddedTokenScan, EngineMismatch, NotConvertible, convert
from gptoss_model.data.tokenizer import BatchEncoder, TokenizerSpec, tokenizer_spec
from tests.preprocess.fixtures import GOLDEN, tokenizer_dir

TEXTS = [
    "plain ascii, numbers 12345 and   runs of spaces\n\n\tand tabs",
    "an added token inline: <|endoftext|> and <|start|>user<|message|>hi<|end|>",
    "overlapping heads <<|endoftext|>| and a near miss <|endoftex|>",
    "non-ASCII: café, naïve, 中文字符, emoji 😀👍🏽, Ελληνικά, العربية, \u00a0nbsp\u2003em",
    "",
    "control chars \x1c\x1d\x1e\x1f and \x85 next-line, \u2028 line separator",
]


@pytest.fixture(scope="module")
def u16(tmp_path_factory) -> TokenizerSpec:
    return tokenizer_spec(tokenizer_dir("u16", tmp_path_factory.mktemp("tok")))


def _spec_with(base: TokenizerSpec, edit) -> TokenizerSpec:
    spec = json.loads(base.backend_json)
    edit(spec)
    return TokenizerSpec(**{**base.__dict__, "backend_json": json.dumps(spec), "source": "edited-tokenizer"})


def test_same_ids_as_tokenizers_for_every_kind_of_text(u16, tmp_path):
    i32 = tokenizer_spec(tokenizer_dir("i32", tmp_path))
    for spec in (u16, i32):
        reference, fast = BatchEncoder(spec), BatchEncoder(spec, "tiktoken")
        texts = TEXTS + ([f"reserved <|reserved_{i}|> tokens" for i in (0, 77, 65_487)] if spec is i32 else [])
        want_ids, want_lengths = reference.encode(texts)
        got_ids, got_lengths = fast.encode(texts, verify_chars=10**9)
        assert got_lengths.tolist() == want_lengths.tolist()
        assert got_ids.dtype == want_ids.dtype and np.array_equal(got_ids, want_ids)


def test_added_token_scan_finds_every_occurrence_and_nothing_else():
    scan = AddedTokenScan(("<|endoftext|>", "<|end|>", "aa"))
    assert scan.found_in("x<<|end|>")          # a start inside another head's match
    assert scan.found_in("baaa") and scan.found_in("<|endoftext|>")
    assert not scan.found_in("<|endo|> <|end a")
    assert not AddedTokenScan(()).found_in("<|endoftext|>")


@pytest.mark.parametrize("edit, reason", [
    (lambda s: s.update(normalizer={"type": "NFC"}), "has a normalizer"),
    (lambda s: s.update(model={"type": "WordLevel", "vocab": s["model"]["vocab"], "unk_token": "<|endoftext|>"}),
     "not BPE"),
    (lambda s: s["model"].update(dropout=0.1), "dropout"),
    (lambda s: s.update(pre_tokenizer={"type": "Whitespace"}), "pre-tokenizer"),
    (lambda s: s["pre_tokenizer"].update(add_prefix_space=True), "pre-tokenizer"),
    (lambda s: s["model"]["merges"].reverse(), "merge order and ids disagree"),
    (lambda s: s["model"]["vocab"].pop("Ā"), "256 bytes have no token"),  # byte 0, in no merge
])
def test_refuses_a_tokenizer_it_cannot_run_with_the_same_ids(u16, edit, reason):
    spec = _spec_with(u16, edit)
    with pytest.raises(NotConvertible, match=reason) as err:
        BatchEncoder(spec, "tiktoken")
    assert "edited-tokenizer" in str(err.value)


def test_refuses_a_vocabulary_whose_tokens_do_not_encode_to_themselves(tmp_path):
    """bc, then ab, then cd; abcd made from ab + cd is unreachable by merging a b c d (bc comes first),
    while tiktoken would take a piece 'abcd' whole."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    alphabet = pre_tokenizers.ByteLevel.alphabet()
    vocab = {c: i for i, c in enumerate(sorted(alphabet))}
    merges = [("b", "c"), ("a", "b"), ("c", "d"), ("ab", "cd")]
    for left, right in merges:
        vocab[left + right] = len(vocab)
    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    spec = TokenizerSpec(backend_json=tok.to_str(), vocab_size=len(vocab), max_token_id=len(vocab) - 1,
                         eod_token_id=None, pad_token_id=None, source="abcd-tokenizer")
    with pytest.raises(NotConvertible, match="'abcd'.*encodes to"):
        BatchEncoder(spec, "tiktoken")


def test_the_per_unit_check_stops_the_stage_where_the_engines_disagree(u16, tmp_path):
    """Onig (tokenizers) reads `$` as end of LINE, Rust's regex (tiktoken) as end of TEXT: a
    difference no vocabulary check can see, which the sample re-encoded by tokenizers catches."""
    split = {"type": "Split", "pattern": {"Regex": r"\w+$|\s+|\S"}, "behavior": "Isolated", "invert": False}
    spec = _spec_with(u16, lambda s: s.update(pre_tokenizer={"type": "Sequence", "pretokenizers": [
        split, {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": False}]}))
    corpus = tmp_path / "corpus.jsonl"
    corpus.write_text("".join(json.dumps({"text": t}) + "\n" for t in ["the end", "the\nthe", "x"]))
    options = PretrainOptions(tokenizer_engine="tiktoken")
    with pytest.raises(EngineMismatch, match=r"corpus.jsonl\[0:\d+\]: document 2 of the unit, key 'text'"):
        build_pretraining_dataset([str(corpus)], spec, tmp_path / "out", tmp_path / "parts", options)
    assert not (tmp_path / "out" / "shard_00000_text_document.bin").exists()
    # the tokenizers engine is the reference: the same corpus goes through
    build_pretraining_dataset([str(corpus)], spec, tmp_path / "out2", tmp_path / "parts2", PretrainOptions())


# o200k's split regex (tiktoken_ext/openai_public.py), which GPT-OSS's o200k_harmony uses
O200K_PATTERN = "|".join([
    r"""[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+(?i:'s|'t|'re|'ve|'m|'ll|'d)?""",
    r"""[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*(?i:'s|'t|'re|'ve|'m|'ll|'d)?""",
    r"""\p{N}{1,3}""", r""" ?[^\s\p{L}\p{N}]+[\r\n/]*""", r"""\s*[\r\n]+""", r"""\s+(?!\S)""", r"""\s+"""])


def test_gpt_oss_form_same_ids(u16, tmp_path):
    """GPT-OSS's tokenizer.json has the form transformers' TikTokenConverter writes: Split(o200k
    regex) + ByteLevel, every two-token split of a token as a merge (ties in result id), and
    ignore_merges. Built here from the u16 vocabulary's ranks, it converts and gives the same ids."""
    import base64

    from transformers.convert_slow_tokenizer import TikTokenConverter

    from gptoss_model.data.tiktoken_engine import byte_of_char

    to_byte = byte_of_char()
    vocab = json.loads(u16.backend_json)["model"]["vocab"]
    ranks = tmp_path / "u16.tiktoken"
    ranks.write_text("".join(f"{base64.b64encode(bytes(to_byte[c] for c in token)).decode()} {rank}\n"
                             for token, rank in vocab.items()))
    backend = TikTokenConverter(vocab_file=str(ranks), pattern=O200K_PATTERN,
                                extra_special_tokens=["<|endoftext|>"]).converted()
    spec = TokenizerSpec(**{**u16.__dict__, "backend_json": backend.to_str(), "source": "o200k-form"})
    model = json.loads(spec.backend_json)["model"]
    assert model["ignore_merges"] and len(model["merges"]) > len(vocab) - 256  # several merges per token
    conversion = convert(spec.backend_json, "o200k-form")
    assert conversion.pattern == O200K_PATTERN and conversion.added == ("<|endoftext|>",)

    texts = [json.loads(line)["text"] for line in (GOLDEN / "corpus.jsonl").read_text().splitlines()]
    texts += TEXTS + ["Don'T STOP, WE'LL go 12345678 times\r\n\r\n  a//b ΑΒΓ ßẞ"]
    want_ids, want_lengths = BatchEncoder(spec).encode(texts)
    got_ids, got_lengths = BatchEncoder(spec, "tiktoken").encode(texts, verify_chars=10**9)
    assert np.array_equal(got_lengths, want_lengths) and np.array_equal(got_ids, want_ids)


def test_byte_level_form_takes_gpt2s_pattern_and_the_added_tokens(u16):
    byte_level = convert(u16.backend_json, "u16")
    assert byte_level.pattern == GPT2_PATTERN  # what ByteLevel(use_regex=True) splits with
    assert "<|endoftext|>" in byte_level.added and len(byte_level.ranks) == 2000
