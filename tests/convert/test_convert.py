"""The convert stage: HF GPT-OSS (bf16/fp32/MXFP4) -> megatron-core torch_dist, streamed, parity-gated."""
from __future__ import annotations

import json
import shutil

import pytest
import torch

from gptoss_model.convert import hf_to_megatron as convert, writer as convert_writer
from gptoss_model.verify import parity as verify
from gptoss_model.model.config import NotGptOssConfigError
from gptoss_model.checkpoint.load_hf import CheckpointError
from gptoss_model.checkpoint.tiny import write_tiny_checkpoint
from tests.artifacts import commit_directory

LOGIT_TOL = 1e-4  # fp32 compute, same weights as the reference
BF16_REL_TOL = 2e-2  # relative to max |logit| of the full-precision reference


@pytest.fixture(scope="module")
def sources(tmp_path_factory):
    root = tmp_path_factory.mktemp("hf")
    return {
        "fp32": write_tiny_checkpoint(root / "fp32", dtype="float32", seed=0),
        "bf16": write_tiny_checkpoint(root / "bf16", dtype="bfloat16", seed=3),
        "mxfp4": write_tiny_checkpoint(root / "mxfp4", dtype="bfloat16", mxfp4=True, seed=1),
    }


@pytest.mark.parametrize("source,dtype", [("fp32", "float32"), ("bf16", "float32"), ("bf16", "bfloat16"),
                                          ("mxfp4", "float32"), ("mxfp4", "bfloat16")])
def test_convert_load_and_logits_match_transformers(sources, tmp_path, source, dtype):
    out = tmp_path / "megatron"
    report = convert.convert_hf_to_megatron(sources[source], out, dtype=dtype, source_sha="abc123")
    print(f"\n{source}->{dtype}: {report}")
    assert (out / "latest_checkpointed_iteration.txt").read_text() == "0"
    it = out / "iter_0000000"
    assert {"metadata.json", "common.pt", ".metadata"} <= {p.name for p in it.iterdir()}
    assert json.loads((it / "metadata.json").read_text())["sharded_backend"] == "torch_dist"
    cfg = json.loads((sources[source] / "config.json").read_text())
    from gptoss_model.checkpoint.tiny import num_params

    assert report["params"] == num_params(cfg)
    assert report["dtype"] == dtype and report["source_sha"] == "abc123"
    assert report["source_mxfp4"] == (source == "mxfp4")
    assert report["peak_rss_mb"] > 0 and report["seconds"] > 0
    # bf16 storage halves the bytes (RMSNorm weights stay fp32).
    elems = report["bytes"] / (2 if dtype == "bfloat16" else 4)
    assert elems == pytest.approx(report["params"], rel=0.01)

    gate = verify.parity_check(out, sources[source], dtype=dtype)
    print(gate)
    assert gate["max_abs_logit_diff"] < LOGIT_TOL
    # The sources hold bf16-representable values (bf16, or MXFP4 + bf16), so even the
    # bf16 output is within bf16 tolerance of the full-precision reference.
    assert gate["max_rel_logit_diff"] < (BF16_REL_TOL if dtype == "bfloat16" else LOGIT_TOL)


def test_streaming_reads_one_tensor_at_a_time(sources, tmp_path, monkeypatch):
    """Every item is read from safetensors on demand, while DCP writes: never the whole model."""
    from gptoss_model.checkpoint import load_hf

    seen, live = [], []
    real = load_hf.HFCheckpoint.read

    def spy(self, name, **kw):
        seen.append(name)
        return real(self, name, **kw)

    monkeypatch.setattr(load_hf.HFCheckpoint, "read", spy)
    import torch.distributed.checkpoint.filesystem as fs

    real_write = fs._write_item

    def write_spy(transforms, stream, data, item, *a, **k):
        live.append(len(seen))
        return real_write(transforms, stream, data, item, *a, **k)

    monkeypatch.setattr(fs, "_write_item", write_spy)
    convert.convert_hf_to_megatron(sources["fp32"], tmp_path / "m", dtype="float32")
    # Reads interleave with writes: by the first tensor written, at most one group was read.
    tensor_writes = [n for n in live if n > 0]
    # (the reader thread runs up to PREFETCH_ITEMS items ahead of the writer)
    assert tensor_writes[0] <= 3 + convert_writer.PREFETCH_ITEMS and tensor_writes[-1] == len(seen)
    assert len(set(tensor_writes)) > 100


def test_non_gpt_oss_config_is_rejected_before_writing(sources, tmp_path):
    bad = tmp_path / "llama"
    shutil.copytree(sources["fp32"], bad)
    cfg = json.loads((bad / "config.json").read_text())
    cfg.update(model_type="llama", architectures=["LlamaForCausalLM"])
    (bad / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(NotGptOssConfigError, match="llama|GPT-OSS|gpt_oss"):
        convert.convert_hf_to_megatron(bad, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_foreign_or_missing_tensors_are_rejected(sources, tmp_path):
    from safetensors.torch import save_file

    extra = tmp_path / "extra"
    shutil.copytree(sources["fp32"], extra)
    save_file({"model.vision_tower.weight": torch.zeros(2)}, str(extra / "model-extra.safetensors"))
    index = json.loads((extra / "model.safetensors.index.json").read_text())
    index["weight_map"]["model.vision_tower.weight"] = "model-extra.safetensors"
    (extra / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(CheckpointError, match="not part of GPT-OSS.*vision_tower"):
        convert.convert_hf_to_megatron(extra, tmp_path / "out")
    del index["weight_map"]["model.layers.1.self_attn.sinks"]
    (extra / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(CheckpointError, match="sinks.*missing"):
        convert.convert_hf_to_megatron(extra, tmp_path / "out")
    assert not (tmp_path / "out").exists()


# ------------------------------------------------------------------- the stage
def test_stage_commits_then_cache_hit(sources, tmp_path):
    from tasks.common import StoreSettings
    from tasks.convert import ConvertParams, run_convert
    from tasks.store import ArtifactStore

    url = (tmp_path / "store").as_uri()
    store = ArtifactStore(url)
    hf = commit_directory(store, sources["mxfp4"])
    params = ConvertParams(source="hf-checkpoint/tiny/gpt-oss", workdir=str(tmp_path / "work"),
                           store=StoreSettings(url=url))
    first = run_convert(params, store)
    m = first.manifest
    assert not first.cache_hit and m.kind == "megatron-checkpoint" and m.name == "tiny/gpt-oss"
    assert [(i.kind, i.name, i.version) for i in m.inputs] == [("hf-checkpoint", "tiny/gpt-oss", hf.version)]
    files = {f.path for f in m.files}
    assert {"latest_checkpointed_iteration.txt", "iter_0000000/.metadata", "iter_0000000/common.pt",
            "iter_0000000/metadata.json"} <= files
    assert m.metrics["max_abs_logit_diff"] < LOGIT_TOL and m.metrics["source_sha"] == hf.version
    assert m.metrics["dtype"] == "bfloat16" and m.metrics["tensors"] > 0
    print(f"\nstage metrics: {m.metrics}")

    # The committed artifact loads like any megatron checkpoint.
    gate = verify.parity_check(store.local_path(m), store.local_path(hf), dtype="bfloat16")
    assert gate["max_abs_logit_diff"] < LOGIT_TOL

    again = run_convert(params, store)
    assert again.cache_hit and again.manifest.version == m.version
    # By explicit version too.
    pinned = run_convert(params.model_copy(update={"source": f"hf-checkpoint/tiny/gpt-oss@{hf.version}"}), store)
    assert pinned.cache_hit and pinned.manifest.version == m.version


def test_stage_fails_its_parity_gate_and_commits_nothing(sources, tmp_path):
    from tasks.convert import ConvertParams, ParityError, run_convert
    from tasks.store import ArtifactStore

    store = ArtifactStore((tmp_path / "store").as_uri())
    commit_directory(store, sources["fp32"])
    params = ConvertParams(source="hf-checkpoint/tiny/gpt-oss", dtype="bfloat16", parity_tolerance=1e-12,
                           workdir=str(tmp_path / "work"))
    with pytest.raises(ParityError, match="parity gate failed"):
        run_convert(params, store)
    assert store.list("megatron-checkpoint") == []
    assert not list((tmp_path / "work").glob("convert-*")), "a retry would resume into the failed checkpoint"


def test_stage_rejects_wrong_input_kind_and_non_gpt_oss(sources, tmp_path):
    from tasks.convert import ConvertParams, run_convert
    from tasks.store import ArtifactStore, InvalidNameError

    store = ArtifactStore((tmp_path / "store").as_uri())
    with pytest.raises(InvalidNameError, match="hf-checkpoint"):
        run_convert(ConvertParams(source="dataset/tiny"), store)
    bad = tmp_path / "bad"
    shutil.copytree(sources["fp32"], bad)
    cfg = json.loads((bad / "config.json").read_text())
    cfg["model_type"] = "mixtral"
    (bad / "config.json").write_text(json.dumps(cfg))
    commit_directory(store, bad, name="not/gpt-oss")
    with pytest.raises(NotGptOssConfigError):
        run_convert(ConvertParams(source="hf-checkpoint/not/gpt-oss", workdir=str(tmp_path / "w")), store)
    assert store.list("megatron-checkpoint") == []


# Resharding on load (EP2, TP2+SP, PP2, TP2+SP+EP2 under torchrun) is checked end to end,
# Hub -> download -> convert -> load, in tests/e2e/test_hub_to_megatron.py.


# ------------------------------------------------------------------- the flow
@pytest.mark.prefect
@pytest.mark.timeout(120)
def test_flow_converts_then_fails_fast_on_non_gpt_oss(prefect_harness, sources, tmp_path):
    """The Prefect flow commits the artifact; a permanent error is not retried (delays 30/120 s)."""
    import time

    from flows.convert import convert_flow
    from tasks.common import StoreSettings
    from tasks.convert import ConvertParams
    from tasks.store import ArtifactStore

    url = (tmp_path / "store").as_uri()
    store = ArtifactStore(url)
    commit_directory(store, sources["bf16"])
    params = ConvertParams(source="hf-checkpoint/tiny/gpt-oss", workdir=str(tmp_path / "w"),
                           store=StoreSettings(url=url))
    manifest = convert_flow(params)
    assert manifest.kind == "megatron-checkpoint" and manifest.metrics["max_abs_logit_diff"] < LOGIT_TOL

    bad = tmp_path / "bad"
    shutil.copytree(sources["bf16"], bad)
    cfg = json.loads((bad / "config.json").read_text())
    cfg["architectures"] = ["MixtralForCausalLM"]
    (bad / "config.json").write_text(json.dumps(cfg))
    commit_directory(store, bad, name="not/gpt-oss")
    t0 = time.monotonic()
    state = convert_flow(params.model_copy(update={"source": "hf-checkpoint/not/gpt-oss"}), return_state=True)
    assert state.is_failed() and time.monotonic() - t0 < 20
    with pytest.raises(NotGptOssConfigError, match="not a GPT-OSS checkpoint"):
        state.result()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_mxfp4_experts_dequantize_straight_into_megatron_layout(sources, dtype):
    """The row-selection fast path equals dequantize -> HF layout -> name_map transform, bit for bit."""
    from gptoss_model.checkpoint import name_map as nm
    from gptoss_model.checkpoint.load_hf import HFCheckpoint, read_for_param

    ckpt = HFCheckpoint(sources["mxfp4"])
    checked = 0
    for name in ("decoder.layers.1.mlp.experts.local_experts.5.linear_fc1.weight",
                 "decoder.layers.1.mlp.experts.local_experts.5.linear_fc2.weight"):
        match = nm.match_megatron(name, "local")
        fast = read_for_param(ckpt, match, tp_rank=0, tp_size=1, dtype=dtype)
        hf_name = match.hf_names()[0]
        slow = match.rule.mapping.to_megatron([ckpt.read(hf_name, expert=5)], ckpt.cfg).to(dtype)
        assert fast.dtype == dtype and fast.shape == slow.shape
        assert torch.equal(fast, slow), name
        rows = fast.shape[0]
        for window in ((0, rows // 2), (rows // 2, rows), (3, rows - 5)):  # fc1's gate, up; any window
            part = read_for_param(ckpt, match, tp_rank=0, tp_size=1, dtype=dtype, rows=window)
            assert torch.equal(part, slow[window[0]:window[1]]), (name, window)
        checked += 1
    assert checked == 2


def test_bad_files_are_named_and_nothing_is_written(sources, tmp_path):
    """Truncated weights, invalid JSON and a wrong dtype: one error naming the file (and tensor)."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    def copy(name):
        d = tmp_path / name
        shutil.copytree(sources["fp32"], d)
        return d

    truncated = copy("truncated")
    shard = sorted(truncated.glob("*.safetensors"))[0]
    shard.write_bytes(shard.read_bytes()[:100])
    with pytest.raises(CheckpointError, match=f"{shard.name}: not a readable safetensors file"):
        convert.convert_hf_to_megatron(truncated, tmp_path / "out")

    bad_json = copy("bad-json")
    (bad_json / "config.json").write_text('{"model_type": "gpt_oss",')
    with pytest.raises(CheckpointError, match=r"config\.json: not valid JSON"):
        convert.convert_hf_to_megatron(bad_json, tmp_path / "out")

    int8_head = copy("int8-head")
    index = json.loads((int8_head / "model.safetensors.index.json").read_text())
    file = int8_head / index["weight_map"]["lm_head.weight"]
    with safe_open(file, "pt") as f:
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    tensors["lm_head.weight"] = tensors["lm_head.weight"].to(torch.int8)
    save_file(tensors, str(file), metadata={"format": "pt"})
    with pytest.raises(CheckpointError, match="'lm_head.weight' is stored as I8; expected BF16 or F16 or F32"):
        convert.convert_hf_to_megatron(int8_head, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_worker_count_is_capped_by_chunks_and_cores():
    import os

    from gptoss_model.system.workers import useful_workers

    cores = len(os.sched_getaffinity(0))
    assert useful_workers(11, items=6) == min(6, cores)
    assert useful_workers(1, items=6) == 1
    assert useful_workers(256, items=1000) == cores
