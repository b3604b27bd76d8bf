"""Export and verify stages over the artifact store: lineage, cache hits, gates that fail the stage."""
from __future__ import annotations

import json
import shutil

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from gptoss_model.checkpoint.tiny import write_tiny_checkpoint
from tasks.common import StoreSettings
from tasks.store import ArtifactStore
from tests.artifacts import commit_directory


@pytest.fixture(scope="module")
def pipeline(tmp_path_factory):
    """An hf-checkpoint and its megatron-checkpoint, committed through the convert stage."""
    from tasks.convert import ConvertParams, run_convert

    root = tmp_path_factory.mktemp("stages")
    url = (root / "store").as_uri()
    store = ArtifactStore(url)
    hf = commit_directory(store, write_tiny_checkpoint(root / "hf", dtype="bfloat16", mxfp4=True, seed=31))
    meg = run_convert(ConvertParams(source=f"hf-checkpoint/{hf.name}", workdir=str(root / "w"),
                                    store=StoreSettings(url=url)), store).manifest
    return store, url, hf, meg, root


def test_export_stage_finds_tokenizer_through_lineage_and_round_trips(pipeline, tmp_path):
    from tasks.export import ExportParams, run_export

    store, url, hf, meg, _ = pipeline
    params = ExportParams(source=f"megatron-checkpoint/{meg.name}", weight_format="mxfp4",
                          workdir=str(tmp_path / "w"), store=StoreSettings(url=url))
    first = run_export(params, store)
    m = first.manifest
    assert m.kind == "hf-export" and not first.cache_hit
    assert {(i.kind, i.version) for i in m.inputs} == {("megatron-checkpoint", meg.version),
                                                         ("hf-checkpoint", hf.version)}
    assert m.metrics["weight_format"] == "mxfp4" and m.metrics["hf_source"] == hf.spec
    out, src = store.local_path(m), store.local_path(hf)
    assert (out / "chat_template.jinja").read_bytes() == (src / "chat_template.jinja").read_bytes()
    index = json.loads((src / "model.safetensors.index.json").read_text())
    for name, file in index["weight_map"].items():
        with safe_open(src / file, "pt") as f:
            want = f.get_tensor(name)
        got_file = json.loads((out / "model.safetensors.index.json").read_text())["weight_map"][name]
        with safe_open(out / got_file, "pt") as f:
            assert torch.equal(f.get_tensor(name), want), name
    assert run_export(params, store).cache_hit


def test_verify_stage_whole_model_and_layer_wise(pipeline, tmp_path):
    from tasks.export import ExportParams, run_export
    from tasks.verify import VerifyParams, run_verify

    store, url, hf, meg, _ = pipeline
    settings = StoreSettings(url=url)
    whole = run_verify(VerifyParams(candidate=f"megatron-checkpoint/{meg.name}", workdir=str(tmp_path / "a"),
                                    store=settings), store).manifest
    assert whole.kind == "verify-report" and whole.metrics["mode"] == "whole-model"
    assert whole.metrics["first_failure"] is None and whole.metrics["top1_agreement"] == 1.0
    layer = run_verify(VerifyParams(candidate=f"megatron-checkpoint/{meg.name}", mode="layer-wise",
                                    workdir=str(tmp_path / "b"), store=settings), store).manifest
    rows = layer.metrics["rows"]
    assert layer.metrics["passed"] and len(rows) == 1 + 4 * 4 + 1  # embedding, 4 ops x 4 layers, head
    assert "| layer 3 (full) | mlp |" in (store.local_path(layer) / "report.md").read_text()
    export = run_export(ExportParams(source=f"megatron-checkpoint/{meg.name}", workdir=str(tmp_path / "c"),
                                     store=settings), store).manifest
    checked = run_verify(VerifyParams(candidate=f"hf-export/{export.name}", mode="layer-wise",
                                      workdir=str(tmp_path / "d"), store=settings), store).manifest
    assert checked.metrics["passed"] and checked.metrics["reference"] == hf.spec


def test_verify_stage_fails_naming_the_layer_and_commits_nothing(pipeline, tmp_path):
    from tasks.verify import VerificationFailed, VerifyParams, run_verify

    store, url, hf, _, root = pipeline
    broken = tmp_path / "broken"
    shutil.copytree(store.local_path(hf), broken, ignore=shutil.ignore_patterns("MANIFEST.json"))
    for f in broken.glob("model-*.safetensors"):
        tensors = load_file(f)
        if "model.layers.1.self_attn.o_proj.weight" in tensors:
            tensors["model.layers.1.self_attn.o_proj.weight"] *= 1.5
            save_file(tensors, f, metadata={"format": "pt"})
    bad = commit_directory(store, broken, name="tiny/broken")
    params = VerifyParams(candidate=f"hf-checkpoint/{bad.name}", reference=hf.spec, mode="layer-wise",
                          workdir=str(tmp_path / "w"), store=StoreSettings(url=url))
    with pytest.raises(VerificationFailed, match=r"layer 1 \(full\).*attention"):
        run_verify(params, store)
    assert store.list("verify-report") == [] or all(m.name != bad.name for m in store.list("verify-report"))


@pytest.mark.prefect
@pytest.mark.timeout(300)
def test_export_flow(prefect_harness, pipeline, tmp_path):
    from flows.export import export_flow
    from tasks.export import ExportParams

    store, url, _, meg, _ = pipeline
    manifest = export_flow(ExportParams(source=f"megatron-checkpoint/{meg.name}", weight_format="float32",
                                        workdir=str(tmp_path / "w"), store=StoreSettings(url=url)))
    assert manifest.kind == "hf-export" and manifest.metrics["weight_format"] == "float32"


def test_push_to_hub_then_download_stage_pulls_it_back_bitwise(pipeline, tmp_path, monkeypatch):
    import huggingface_hub.constants

    from tasks.download import DownloadParams, run_download
    from tasks.export import ExportParams, run_export
    from tests.hub_server import HubServer

    for var in ("HF_TOKEN", "HF_ENDPOINT", "HF_HUB_OFFLINE"):
        monkeypatch.delenv(var, raising=False)
    # The test Hub speaks the legacy LFS transfer, not Xet's.
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_DISABLE_XET", True)
    store, url, _, meg, _ = pipeline
    settings = StoreSettings(url=url)
    with HubServer() as hub:
        pushed = run_export(ExportParams(source=f"megatron-checkpoint/{meg.name}", name="tiny/pushed",
                                         push_to_hub="acme/tiny-export", hub_endpoint=hub.endpoint,
                                         max_shard_bytes=300_000, workdir=str(tmp_path / "e"), store=settings),
                            store).manifest
        back = run_download(DownloadParams(repo_id="acme/tiny-export", endpoint=hub.endpoint, name="acme/back",
                                           workdir=str(tmp_path / "d"), store=settings), store).manifest
    sent, got = store.local_path(pushed), store.local_path(back)
    names = sorted(f.path for f in pushed.files)
    assert len([n for n in names if n.endswith(".safetensors")]) > 1
    assert sorted(f.path for f in back.files) == names
    for name in names:
        assert (got / name).read_bytes() == (sent / name).read_bytes(), name


def test_push_to_a_hub_that_is_down_names_the_endpoint(tmp_path):
    import socket

    from tasks.export import HubUnreachable, push_folder

    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        down = f"http://127.0.0.1:{s.getsockname()[1]}"
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(HubUnreachable, match=rf"pushing acme/tiny to the Hub at {down}: ConnectError"):
        push_folder(tmp_path, "acme/tiny", token="hf_test", private=True, message="test", endpoint=down)


def test_a_bf16_export_of_fp32_weights_passes_the_gate_and_a_wrong_one_fails(tmp_path):
    """The pipeline's after-export check: the fp32 checkpoint against its bf16 export. Rounding
    alone moved logits past the bf16 gate (seed 2: 0.125 relative, MoE routing flipped); both sides
    rounded alike they differ by 5e-7 and are held to the fp32 gate, which a mutation still fails."""
    from tasks.convert import ConvertParams, run_convert
    from tasks.export import ExportParams, run_export
    from tasks.verify import VerificationFailed, VerifyParams, run_verify

    url = (tmp_path / "store").as_uri()
    store, settings = ArtifactStore(url), StoreSettings(url=url)
    hf = commit_directory(store, write_tiny_checkpoint(tmp_path / "hf", dtype="float32", seed=2), name="tiny/fp32")
    meg = run_convert(ConvertParams(source=hf.spec, dtype="float32", workdir=str(tmp_path / "w"), store=settings),
                      store).manifest
    export = run_export(ExportParams(source=meg.spec, weight_format="bfloat16", workdir=str(tmp_path / "e"),
                                     store=settings), store).manifest
    report = run_verify(VerifyParams(candidate=meg.spec, reference=export.spec, workdir=str(tmp_path / "v"),
                                     store=settings), store).manifest
    print(f"\nbf16 export vs its fp32 checkpoint, weights rounded alike: rel {report.metrics['rel_logit_diff']:.2e}, "
          f"top-1 {report.metrics['top1_agreement']}")
    assert report.metrics["weights_rounded_to"] == "bfloat16" and report.metrics["rel_logit_diff"] < 1e-5
    assert report.metrics["tolerance"]["max_rel_logit_diff"] == 1e-3  # the fp32 gate

    mutated = tmp_path / "mutated"
    shutil.copytree(store.local_path(export), mutated, ignore=shutil.ignore_patterns("MANIFEST.json"))
    for f in mutated.glob("model*.safetensors"):
        tensors = load_file(f)
        name = "model.layers.2.mlp.experts.down_proj"
        if name in tensors:
            tensors[name] = tensors[name].flip(0)  # experts swapped: a mapping error
            save_file(tensors, f, metadata={"format": "pt"})
    bad = commit_directory(store, mutated, name="tiny/mutated-export")
    with pytest.raises(VerificationFailed, match="logit"):
        run_verify(VerifyParams(candidate=meg.spec, reference=bad.spec, workdir=str(tmp_path / "b"),
                                store=settings), store)
