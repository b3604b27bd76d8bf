"""Export: megatron torch_dist checkpoint -> HF directory, bitwise round trips at any saved layout."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from gptoss_model.convert import hf_to_megatron as convert
from gptoss_model.bridge import AutoBridge
from gptoss_model.export.megatron_to_hf import ExportError, export_megatron_to_hf
from gptoss_model.checkpoint.megatron_reader import MegatronCheckpointError, MegatronCheckpointReader
from gptoss_model.model.reference import load_reference_model
from gptoss_model.checkpoint.tiny import write_tiny_checkpoint
from gptoss_model.verify.parity import fixed_batch
from tests.torchrun import run_torchrun

WORKER = Path(__file__).with_name("dist_save_worker.py")


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    """tiny HF checkpoints and their conversions (source dtype = checkpoint dtype)."""
    root = tmp_path_factory.mktemp("export-src")
    out = {}
    for name, kwargs, dtype in (("fp32", dict(dtype="float32", seed=21), "float32"),
                                ("bf16", dict(dtype="bfloat16", seed=22), "bfloat16"),
                                ("mxfp4", dict(dtype="bfloat16", mxfp4=True, seed=23), "bfloat16")):
        hf = write_tiny_checkpoint(root / f"hf-{name}", **kwargs)
        convert.convert_hf_to_megatron(hf, root / f"meg-{name}", dtype=dtype)
        out[name] = (hf, root / f"meg-{name}")
    return out


def _tensors(hf_dir: Path) -> dict[str, torch.Tensor]:
    index = json.loads((hf_dir / "model.safetensors.index.json").read_text())
    out = {}
    for file in sorted(set(index["weight_map"].values())):
        with safe_open(hf_dir / file, "pt") as f:
            out.update({k: f.get_tensor(k) for k in f.keys()})
    assert set(out) == set(index["weight_map"])
    return out


def _assert_bitwise(got: dict, want: dict) -> None:
    assert sorted(got) == sorted(want)
    for name, w in want.items():
        g = got[name]
        assert g.dtype == w.dtype and g.shape == w.shape, name
        assert torch.equal(g.view(torch.uint8), w.view(torch.uint8)) if g.dtype.is_floating_point else \
            torch.equal(g, w), f"{name} differs"


def _strict_load(hf_dir: Path):
    from transformers import GptOssForCausalLM, Mxfp4Config

    cfg = json.loads((hf_dir / "config.json").read_text())
    kw = {"quantization_config": Mxfp4Config(dequantize=True)} if "quantization_config" in cfg else {}
    model, info = GptOssForCausalLM.from_pretrained(hf_dir, dtype=torch.float32, attn_implementation="eager",
                                                    output_loading_info=True, **kw)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"], info
    return model.eval()


def _logits(model, vocab: int) -> torch.Tensor:
    with torch.no_grad():
        return model(fixed_batch(vocab, 2, 40)).logits


@pytest.mark.parametrize("source", ["fp32", "bf16"])
def test_round_trip_is_bitwise_and_loads_strictly(converted, tmp_path, source):
    hf, meg = converted[source]
    out = tmp_path / "export"
    report = AutoBridge.from_hf_pretrained(hf).export_ckpt(megatron_path=meg, hf_path=out,
                                                           weight_format="float32" if source == "fp32"
                                                           else "bfloat16", show_progress=False)
    print(report)
    original = _tensors(hf)
    exported = _tensors(out)
    _assert_bitwise(exported, original)
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert index["metadata"]["total_size"] == sum(t.numel() * t.element_size() for t in exported.values())
    assert report["bytes"] == index["metadata"]["total_size"]
    for side in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja", "generation_config.json"):
        assert (out / side).read_bytes() == (hf / side).read_bytes()
    config = json.loads((out / "config.json").read_text())
    assert config["dtype"] == ("float32" if source == "fp32" else "bfloat16")
    assert "quantization_config" not in config
    vocab = config["vocab_size"]
    assert torch.equal(_logits(_strict_load(out), vocab), _logits(load_reference_model(hf), vocab))


def test_stage_api_exports_bf16_of_fp32_checkpoint_and_iter_dir(converted, tmp_path):
    """An iteration dir works as input, and an fp32 checkpoint exports as bf16 (rounded once)."""
    hf, meg = converted["fp32"]
    out = tmp_path / "bf16"
    export_megatron_to_hf(meg / "iter_0000000", out, config=hf)
    got = _tensors(out)
    for name, want in _tensors(hf).items():
        assert got[name].dtype == torch.bfloat16 and torch.equal(got[name], want.to(torch.bfloat16)), name


def test_mxfp4_round_trip(converted, tmp_path):
    hf, meg = converted["mxfp4"]
    out = tmp_path / "mxfp4"
    report = export_megatron_to_hf(meg, out, config=hf, weight_format="mxfp4", max_shard_bytes=200_000)
    assert report["shards"] > 1
    _assert_bitwise(_tensors(out), _tensors(hf))  # _blocks/_scales and every bf16 tensor
    config = json.loads((out / "config.json").read_text())
    assert config["quantization_config"]["quant_method"] == "mxfp4"
    assert config["quantization_config"] == json.loads((hf / "config.json").read_text())["quantization_config"]
    vocab = config["vocab_size"]
    assert torch.equal(_logits(_strict_load(out), vocab), _logits(load_reference_model(hf), vocab))


def test_shards_respect_the_size_limit(converted, tmp_path):
    hf, meg = converted["bf16"]
    out = tmp_path / "small-shards"
    limit = 150_000
    report = export_megatron_to_hf(meg, out, config=hf, max_shard_bytes=limit)
    files = sorted(out.glob("model-*.safetensors"))
    assert len(files) == report["shards"] > 3
    assert all(f.name.endswith(f"-of-{len(files):05d}.safetensors") for f in files)
    biggest_tensor = max(t.numel() * t.element_size() for t in _tensors(out).values())
    for f in files:
        header = int.from_bytes(f.read_bytes()[:8], "little")
        payload = f.stat().st_size - 8 - header
        assert payload <= max(limit, biggest_tensor), f.name
    assert not list(out.glob("*.partial"))


def test_streams_one_tensor_at_a_time(converted, tmp_path, monkeypatch):
    """Each read is one megatron tensor (one expert), and a layer is written before the next is read."""
    from gptoss_model.checkpoint.safetensors_writer import ShardWriter

    hf, meg = converted["bf16"]
    events = []
    real_read, real_write = MegatronCheckpointReader.read, ShardWriter.write_rows

    def read(self, names):
        events.append(("read", names))
        return real_read(self, names)

    def write_rows(self, name, part, first_row=0):
        events.append(("write", name))
        return real_write(self, name, part, first_row)

    monkeypatch.setattr(MegatronCheckpointReader, "read", read)
    monkeypatch.setattr(ShardWriter, "write_rows", write_rows)
    export_megatron_to_hf(meg, tmp_path / "out", config=hf)
    reads = [names for kind, names in events if kind == "read"]
    assert all(len(names) == 1 for names in reads)
    experts = json.loads((hf / "config.json").read_text())["num_local_experts"]
    assert sum("local_experts" in names[0] for names in reads) == 4 * 4 * experts  # 4 kinds x 4 layers
    first_layer1_read = next(i for i, (k, v) in enumerate(events) if k == "read" and ".layers.1." in v[0])
    last_layer0_write = max(i for i, (k, v) in enumerate(events) if k == "write" and ".layers.0." in v)
    assert last_layer0_write < first_layer1_read
    # within a stacked expert tensor, reads run at most one expert ahead of the writes (the next
    # expert is read in the background while one is written): never all experts at once
    ahead = peak = writes = 0
    for kind, v in events:
        if kind == "read" and v[0].startswith("decoder.layers.0.mlp.experts.local_experts.") and \
                v[0].endswith("linear_fc2.weight"):
            ahead += 1
        elif kind == "write" and v == "model.layers.0.mlp.experts.down_proj":
            ahead, writes = ahead - 1, writes + 1
        peak = max(peak, ahead)
    assert writes == experts > 2 and ahead == 0 and peak <= 2


def test_bad_inputs_fail_clearly(converted, tmp_path):
    hf, meg = converted["bf16"]
    busy = tmp_path / "busy"
    busy.mkdir()
    (busy / "x").write_text("keep me")
    with pytest.raises(ExportError, match="not empty"):
        export_megatron_to_hf(meg, busy, config=hf)
    assert (busy / "x").read_text() == "keep me"
    with pytest.raises(ExportError, match="weight_format"):
        export_megatron_to_hf(meg, tmp_path / "a", config=hf, weight_format="int8")
    with pytest.raises(MegatronCheckpointError, match="neither"):
        export_megatron_to_hf(tmp_path, tmp_path / "b", config=hf)
    other = write_tiny_checkpoint(tmp_path / "wider", dtype="bfloat16", hidden_size=96)
    with pytest.raises(MegatronCheckpointError, match="embedding.word_embeddings.weight has global shape"):
        export_megatron_to_hf(meg, tmp_path / "c", config=other)
    with pytest.raises(ExportError, match="multiple of 32"):  # intermediate 48 cannot be MXFP4
        export_megatron_to_hf(meg, tmp_path / "d", config=hf, weight_format="mxfp4")
    assert not (tmp_path / "c").exists() or not any((tmp_path / "c").iterdir())


def test_exports_from_distributed_saves_are_bitwise_equal(converted, tmp_path):
    """Checkpoints saved by megatron at TP2+SP, EP2, PP2 and TP2+SP+EP2 export to the same bytes as world 1."""
    hf, meg = converted["mxfp4"]
    saved = run_torchrun(WORKER, meg, hf, tmp_path / "saved", result=tmp_path / "saved.json", timeout=400)
    reference = tmp_path / "world1"
    export_megatron_to_hf(meg, reference, config=hf, weight_format="mxfp4", max_shard_bytes=300_000)
    files = sorted(p.name for p in reference.iterdir())
    for layout, root in saved.items():
        out = tmp_path / f"from-{layout}"
        export_megatron_to_hf(root, out, config=hf, weight_format="mxfp4", max_shard_bytes=300_000)
        assert sorted(p.name for p in out.iterdir()) == files
        for name in files:
            assert (out / name).read_bytes() == (reference / name).read_bytes(), f"{layout}: {name} differs"


def _file_bytes(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.mark.parametrize("weight_format", ["bfloat16", "mxfp4"])
def test_worker_count_does_not_change_the_bytes(converted, tmp_path, weight_format):
    hf, meg = converted["mxfp4"]
    one = export_megatron_to_hf(meg, tmp_path / "one", config=hf, weight_format=weight_format,
                                max_shard_bytes=120_000, workers=1)
    two = export_megatron_to_hf(meg, tmp_path / "two", config=hf, weight_format=weight_format,
                                max_shard_bytes=120_000, workers=2)
    assert one["workers"] == 1 and two["workers"] == 2 and one["shards"] > 2
    assert two["groups_written"]["spawned_workers"] >= 1  # the second process really wrote some
    assert _file_bytes(tmp_path / "two") == _file_bytes(tmp_path / "one")


KILLED_EXPORT = '''
import pathlib, sys, time
from gptoss_model.export.megatron_to_hf import export_megatron_to_hf

def stall_after_first_group(done, total):
    if done:  # a group is durable and marked: tell the test, then wait to be killed
        pathlib.Path(sys.argv[3]).write_text(str(done))
        time.sleep(600)

if __name__ == "__main__":
    export_megatron_to_hf(sys.argv[1], sys.argv[2], config=sys.argv[4], weight_format="mxfp4",
                          max_shard_bytes=120_000, workers=2, progress=stall_after_first_group)
'''


def test_export_killed_mid_way_resumes_to_the_same_bytes(converted, tmp_path):
    """kill -9 with groups done and others half written: no worker survives, the shards stay
    .partial with no index, and a rerun into the same directory writes only the rest, bytewise
    what an uninterrupted export writes."""
    import os
    import subprocess
    import sys
    import time

    from tests.processes import kill_alone_and_count_survivors

    hf, meg = converted["mxfp4"]
    out, flag, script = tmp_path / "out", tmp_path / "first-group-done", tmp_path / "killed_export.py"
    script.write_text(KILLED_EXPORT)
    root = Path(__file__).resolve().parents[2]
    proc = subprocess.Popen([sys.executable, str(script), str(meg), str(out), str(flag), str(hf)], cwd=root,
                            env={**os.environ, "PYTHONPATH": str(root)})
    deadline = time.time() + 120
    while not flag.exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    assert flag.exists(), f"the export never finished a group (exit {proc.poll()})"
    time.sleep(0.3)  # let the spawned worker be mid-group
    assert kill_alone_and_count_survivors(proc, "an export with 2 workers") == []
    assert not (out / "model.safetensors.index.json").exists()
    partial = sorted(out.glob("*.safetensors.partial"))
    assert partial and not list(out.glob("*.safetensors"))
    # as if a finish had begun: one shard renamed into place and an index written
    partial[0].rename(partial[0].with_suffix(""))
    (out / "model.safetensors.index.json").write_text("{}")
    resumed = export_megatron_to_hf(meg, out, config=hf, weight_format="mxfp4", max_shard_bytes=120_000,
                                    workers=2)
    assert resumed["groups_resumed"] >= 1
    reference = export_megatron_to_hf(meg, tmp_path / "reference", config=hf, weight_format="mxfp4",
                                      max_shard_bytes=120_000)
    assert reference["groups_resumed"] == 0
    assert _file_bytes(out) == _file_bytes(tmp_path / "reference")
    with pytest.raises(ExportError, match="not empty"):  # a finished export is not resumed over
        export_megatron_to_hf(meg, out, config=hf, weight_format="bfloat16", max_shard_bytes=120_000)
