"""Pretraining preprocess (library level): golden bytes, determinism, readers, bad input."""
from __future__ import annotations

import gzip
import json
from pathlib import Path

import numpy as np
import pytest

from gptoss_model.data.pretrain import PretrainOptions, build_pretraining_dataset
from gptoss_model.data.sources import BadRecordError, CorpusError
from gptoss_model.data.tokenizer import tokenizer_spec
from tests.preprocess.fixtures import GOLDEN, corpus_lines, tokenizer_dir, write_split


@pytest.fixture(scope="module")
def specs(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("tok")
    return {kind: tokenizer_spec(tokenizer_dir(kind, tmp)) for kind in ("u16", "i32")}


def _bytes(out: Path, shard: int = 0) -> tuple[bytes, bytes]:
    prefix = out / f"shard_{shard:05d}_text_document"
    return (prefix.with_suffix(".bin").read_bytes(), prefix.with_suffix(".idx").read_bytes())


def _golden(name: str) -> tuple[bytes, bytes]:
    return ((GOLDEN / f"{name}_text_document.bin").read_bytes(), (GOLDEN / f"{name}_text_document.idx").read_bytes())


@pytest.mark.parametrize("engine", ["tokenizers", "tiktoken"])
@pytest.mark.parametrize("kind", ["u16", "i32"])
@pytest.mark.parametrize("eod", [True, False])
def test_golden_bytes_equal_megatron_lm(tmp_path, specs, kind, eod, engine):
    """Megatron-LM core_v0.16.1 tools/preprocess_data.py made the fixtures (golden/make_golden.sh)."""
    metrics = build_pretraining_dataset([str(GOLDEN / "corpus.jsonl")], specs[kind], tmp_path / "out",
                                        tmp_path / "parts", PretrainOptions(append_eod=eod, tokenizer_engine=engine))
    assert _bytes(tmp_path / "out") == _golden(f"{kind}_{'eod' if eod else 'noeod'}")
    assert metrics["token_dtype"] == ("uint16" if kind == "u16" else "int32")
    assert metrics["documents"] == len(corpus_lines())
    assert metrics["data_prefixes"] == ["shard_00000_text_document"]


def test_same_bytes_for_workers_files_units_and_compression(tmp_path, specs):
    """1 vs 2 workers, 1 vs 3 files, byte-range units, .gz and .zst inputs: identical shards."""
    import zstandard

    lines = corpus_lines()
    options = PretrainOptions(shard_tokens=8000)
    reference = build_pretraining_dataset([str(GOLDEN / "corpus.jsonl")], specs["u16"], tmp_path / "ref",
                                          tmp_path / "p0", options)
    assert len(reference["shards"]) > 2  # several shards, so the cut points are exercised too

    three = write_split(lines, tmp_path / "three", 3)
    (tmp_path / "zst").mkdir()
    compressed = [tmp_path / "three" / "part_000.jsonl.gz", tmp_path / "zst" / "part_001.jsonl.zst"]
    compressed[0].write_bytes(gzip.compress(three[0].read_bytes()))
    compressed[1].write_bytes(zstandard.ZstdCompressor().compress(three[1].read_bytes()))
    runs = {
        "2 workers, small units": ([str(GOLDEN / "corpus.jsonl")], dict(workers=2),
                                   PretrainOptions(shard_tokens=8000, unit_bytes=20_000)),
        "3 files (glob)": ([str(tmp_path / "three" / "*.jsonl")], {}, options),
        "gz + zst + plain": ([str(compressed[0]), str(compressed[1]), str(three[2])], {}, options),
    }
    for label, (sources, kw, opts) in runs.items():
        out = tmp_path / label.replace(" ", "_")
        metrics = build_pretraining_dataset(sources, specs["u16"], out, tmp_path / f"parts-{label}", opts, **kw)
        assert metrics["shards"] == reference["shards"], label
        for shard in range(len(reference["shards"])):
            assert _bytes(out, shard) == _bytes(tmp_path / "ref", shard), (label, shard)
    assert build_pretraining_dataset([str(GOLDEN / "corpus.jsonl")], specs["u16"], tmp_path / "w2", tmp_path / "pw2",
                                     PretrainOptions(shard_tokens=8000, unit_bytes=20_000),
                                     workers=2)["work_units"] == 4


def test_round_trip_through_megatron_core(tmp_path, specs):
    from megatron.core.datasets.indexed_dataset import IndexedDataset
    from tokenizers import Tokenizer

    spec = specs["i32"]
    metrics = build_pretraining_dataset([str(GOLDEN / "corpus.jsonl")], spec, tmp_path / "out", tmp_path / "parts",
                                        PretrainOptions(shard_tokens=5000))
    tok = Tokenizer.from_str(spec.backend_json)
    texts = [json.loads(line)["text"] for line in corpus_lines()]
    expected = [tok.encode(t, add_special_tokens=False).ids for t in texts]
    expected = [ids + [spec.eod_token_id] for ids in expected if ids]
    got = []
    for prefix in metrics["data_prefixes"]:
        ds = IndexedDataset(str(tmp_path / "out" / prefix))
        got += [ds[i].tolist() for i in range(len(ds))]
    assert got == expected
    assert max(max(ids) for ids in got) > 65535  # the int32 path carries ids uint16 cannot


def test_gpt_dataset_samples_of_requested_length(tmp_path, specs):
    from megatron.core.datasets.blended_megatron_dataset_builder import BlendedMegatronDatasetBuilder
    from megatron.core.datasets.gpt_dataset import GPTDataset, GPTDatasetConfig

    spec = specs["u16"]
    metrics = build_pretraining_dataset([str(GOLDEN / "corpus.jsonl")], spec, tmp_path / "out", tmp_path / "parts",
                                        PretrainOptions(shard_tokens=6000))

    class Tok:
        vocab_size, eod, unique_identifiers = spec.vocab_size, spec.eod_token_id, {"class": "test"}

    config = GPTDatasetConfig(random_seed=1, sequence_length=64, blend=([str(tmp_path / "out" / p)
                              for p in metrics["data_prefixes"]], None), split="1,0,0", tokenizer=Tok(),
                              reset_position_ids=False, reset_attention_mask=False, eod_mask_loss=False,
                              path_to_cache=None, mid_level_dataset_surplus=0.005)
    train, _, _ = BlendedMegatronDatasetBuilder(GPTDataset, [50, None, None], lambda: True, config).build()
    assert len(train) >= 50
    sample = train[7]
    assert sample["tokens"].shape == (64,) and sample["labels"].shape == (64,)


BAD_CASES = {
    "malformed_json": (b'{"text": "ok"}\n{"text": "broken"\n', 2),
    "missing_key": (b'{"text": "ok"}\n{"body": "no text"}\n', 2),
    "not_a_string": (b'{"text": "ok"}\n{"text": null}\n', 2),
    "invalid_utf8": (b'{"text": "ok"}\n{"text": "bad \xff byte"}\n', 2),
    "lone_surrogate": (b'{"text": "ok"}\n{"text": "half a pair \\ud800 here"}\n', 2),
    "empty_file": (b"", None),
}


@pytest.mark.parametrize("reason", list(BAD_CASES))
def test_bad_input_policy(tmp_path, specs, reason):
    content, line = BAD_CASES[reason]
    good = tmp_path / "a_good.jsonl"
    good.write_bytes(b'{"text": "a good document"}\n' * 3)
    bad = tmp_path / "b_bad.jsonl"
    bad.write_bytes(content)
    sources = [str(good), str(bad)]
    with pytest.raises(BadRecordError) as failed:
        build_pretraining_dataset(sources, specs["u16"], tmp_path / "out", tmp_path / "parts")
    where = f"{bad}:{line}" if line else str(bad)
    assert str(failed.value).startswith(f"file://{where}: {reason.replace('_', ' ')}"), str(failed.value)

    metrics = build_pretraining_dataset(sources, specs["u16"], tmp_path / "out2", tmp_path / "parts2",
                                        PretrainOptions(bad_input="skip"))
    assert metrics["skipped_records"]["counts"] == {reason: 1}
    assert metrics["skipped_records"]["examples"][reason][0].startswith(f"file://{where}")
    assert metrics["documents"] == 3 + (1 if line else 0)


def test_bad_record_line_number_inside_a_later_unit(tmp_path, specs):
    path = tmp_path / "big.jsonl"
    lines = [json.dumps({"text": f"document number {i}"}).encode() + b"\n" for i in range(400)]
    lines[317] = b'{"text": 5}\n'
    path.write_bytes(b"".join(lines))
    with pytest.raises(BadRecordError, match=r"big.jsonl:318: not a string"):
        build_pretraining_dataset([str(path)], specs["u16"], tmp_path / "o", tmp_path / "p",
                                  PretrainOptions(unit_bytes=2000), workers=2)


def test_a_record_above_max_record_bytes_is_bad_input_not_a_memory_blowup(tmp_path, specs):
    """A 50 MB single-line record took ~9 GB RSS to tokenise; above the limit it is refused
    (file:line named) or skipped and counted, and the rest of the corpus is tokenised."""
    import resource

    path = tmp_path / "one_huge_line.jsonl"
    huge = json.dumps({"text": "word " * (10 << 20)}).encode()  # 50 MB on one line
    path.write_bytes(b'{"text": "a short document"}\n' + huge + b'\n{"text": "another one"}\n')
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    with pytest.raises(BadRecordError, match=r"one_huge_line.jsonl:2: record too large: 52,428,\d+ bytes, above "
                                             r"max_record_bytes=8,388,608"):
        build_pretraining_dataset([str(path)], specs["u16"], tmp_path / "o", tmp_path / "p")
    skipped = build_pretraining_dataset([str(path)], specs["u16"], tmp_path / "o2", tmp_path / "p2",
                                        PretrainOptions(bad_input="skip"))
    grown_mb = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) / 1024
    print(f"\n50 MB record: refused, then skipped; peak RSS grew {grown_mb:.0f} MB (was ~9 GB)")
    assert skipped["documents"] == 2 and skipped["skipped_records"]["counts"] == {"record_too_large": 1}
    assert grown_mb < 1024


def test_corpus_without_tokens_is_an_error_under_any_policy(tmp_path, specs):
    path = tmp_path / "empty_docs.jsonl"
    path.write_text('{"text": ""}\n\n{"text": ""}\n')
    for policy in ("fail", "skip"):
        with pytest.raises(CorpusError, match="yields no tokens"):
            build_pretraining_dataset([str(path)], specs["u16"], tmp_path / policy, tmp_path / f"p{policy}",
                                      PretrainOptions(bad_input=policy))
    with pytest.raises(CorpusError, match="no such file"):
        build_pretraining_dataset([str(tmp_path / "missing.jsonl")], specs["u16"], tmp_path / "o", tmp_path / "p")


def test_uint16_refused_when_an_id_exceeds_it(specs):
    """Megatron-LM picks uint16 from the vocabulary size alone; ids above 65,535 need int32."""
    from dataclasses import replace

    assert specs["u16"].token_dtype() is np.uint16
    assert replace(specs["u16"], max_token_id=70_000).token_dtype() is np.int32
    assert specs["i32"].token_dtype() is np.int32
