"""Export of LoRA/DoRA runs: merged weights, and the PEFT directory on the base export.

Two real training runs (world of one, `python -m gptoss_model.train`, 3 steps, adapters on
attention and every expert) write adapter-only checkpoints on top of a converted tiny
base; the export combines each with its base. The references are megatron models with
the adapters applied (unmerged, `load_adapted_megatron`), all in fp32.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from gptoss_model.convert import hf_to_megatron as convert
from gptoss_model.bridge import AutoBridge
from gptoss_model.export.adapters import PEFT_DIR, AdapterExportError, load_adapted_megatron
from gptoss_model.model.config import GptOssModelConfig
from gptoss_model.export.megatron_to_hf import ExportError, export_megatron_to_hf
from gptoss_model.model.parallel import world_of_one
from gptoss_model.model.reference import load_reference_model
from gptoss_model.checkpoint.tiny import write_tiny_checkpoint
from gptoss_model.verify.parity import fixed_batch, logit_measures, megatron_logits
from tests.artifacts import commit_directory

REPO = Path(__file__).resolve().parents[2]
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore", "PYTHONPATH": str(REPO)}
STEPS = 3
GATE = 1e-4  # max |logit diff| / max |reference logit|, fp32 on both sides
METHODS = {"lora": ["peft.method=lora", "peft.dim=4", "peft.alpha=8"],
           "dora": ["peft.method=dora", "peft.dim=4", "peft.alpha=16"]}


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    from gptoss_model.training.config import save_yaml
    from gptoss_model.training.recipes import tiny_pretrain_config
    from tests.train.data import write_tiny_pretrain_dataset

    root = tmp_path_factory.mktemp("adapters")
    hf = write_tiny_checkpoint(root / "hf", dtype="float32", seed=31)
    base = root / "base"
    convert.convert_hf_to_megatron(hf, base, dtype="float32")
    run = tiny_pretrain_config(data_paths=write_tiny_pretrain_dataset(root / "data", shards=1), hf_path=str(hf),
                               pretrained_checkpoint=str(base), train_iters=STEPS, save_interval=STEPS,
                               eval_interval=0)
    run.checkpoint.save_optim = False
    run.scheduler.lr_warmup_iters = 1
    config = root / "run.yaml"
    save_yaml(run, config)
    procs = {m: subprocess.Popen([sys.executable, "-m", "gptoss_model.train", str(config), f"dir={root / m}",
                                  "optimizer.lr=3e-2", *overrides], env=ENV, cwd=REPO, stdout=subprocess.PIPE,
                                 stderr=subprocess.STDOUT, text=True)
             for m, overrides in METHODS.items()}
    for m, p in procs.items():
        out, _ = p.communicate(timeout=600)
        assert p.returncode == 0, f"{m} training failed:\n{out[-4000:]}"
    return {"hf": hf, "base": base, "cfg": GptOssModelConfig.from_hf_config(hf),
            **{m: root / m / "checkpoints" for m in METHODS}}


@pytest.fixture(scope="module")
def base_export(runs, tmp_path_factory):
    out = tmp_path_factory.mktemp("base-export") / "hf"
    export_megatron_to_hf(runs["base"], out, config=runs["hf"], weight_format="float32")
    return out


def _megatron_logits(runs, method: str, ids: torch.Tensor, experts: bool = True) -> torch.Tensor:
    """Logits of the adapted megatron model; `experts=False`: with the expert adapters made inert."""
    with world_of_one("the adapted reference"), torch.no_grad():
        model = load_adapted_megatron(runs["base"], runs[method], runs["cfg"])
        if not experts:
            for name, module in model.named_modules():
                if ".experts." in name and hasattr(module, "adapter"):
                    module.adapter.lora_b.zero_()  # LoRA: no delta; DoRA: and magnitude = |W| -> scale 1
                    if hasattr(module.adapter, "dora_magnitude"):
                        module.adapter.dora_magnitude.copy_(module.weight.float().norm(dim=1))
        return megatron_logits(model, ids)


def _hf_logits(model, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(ids).logits.float()


def _check(got, want, base_logits, what: str) -> dict:
    m = logit_measures(got, want)
    moved = logit_measures(base_logits, want)["rel_logit_diff"]
    print(f"\n{what}: max |diff| {m['max_abs_logit_diff']:.3g}, relative {m['rel_logit_diff']:.3g} "
          f"(the adapters move the logits by {moved:.3g} relative)")
    assert moved > 100 * GATE, "the adapters barely change the model: the test would not see a missing merge"
    assert m["rel_logit_diff"] < GATE and m["top1_agreement"] == 1.0
    return m


@pytest.mark.parametrize("method", list(METHODS))
def test_merged_export_equals_the_adapted_megatron_model(runs, base_export, tmp_path, method):
    out = tmp_path / "merged"
    report = AutoBridge.from_hf_pretrained(runs["hf"]).export_ckpt(
        megatron_path=runs[method], hf_path=out, weight_format="float32", base_megatron_path=runs["base"],
        peft_adapter=True, show_progress=False)
    print(json.dumps(report["adapters"], indent=1))
    assert report["adapters"]["method"] == method and report["adapters"]["merged"]
    # attention (qkv, proj) + 2 linears per expert, in each of the 4 layers
    assert report["adapters"]["modules"] == runs["cfg"].num_layers * (2 + 2 * runs["cfg"].num_experts)
    peft_report = report["adapters"]["peft_dir"]
    assert peft_report["target_modules"] == ["k_proj", "o_proj", "q_proj", "v_proj"]
    if method == "lora":  # experts through peft's target_parameters (LoRA only)
        assert peft_report["merged_only"] == []
        assert peft_report["target_parameters"] == ["mlp.experts.gate_up_proj", "mlp.experts.down_proj"]
    else:
        assert peft_report["merged_only"] == ["mlp.experts.linear_fc1", "mlp.experts.linear_fc2"]
    ids = fixed_batch(runs["cfg"].vocab_size, 2, 40)
    want = _megatron_logits(runs, method, ids)
    base_logits = _hf_logits(load_reference_model(base_export), ids)
    _check(_hf_logits(load_reference_model(out), ids), want, base_logits, f"{method} merged export vs megatron")


@pytest.mark.parametrize("method", list(METHODS))
def test_peft_directory_on_the_base_export_equals_the_adapted_megatron_model(runs, base_export, tmp_path, method):
    """LoRA: every adapter (experts included); DoRA: attention only (its expert adapters exist only merged)."""
    from peft import PeftModel, get_peft_model_state_dict
    from safetensors.torch import load_file

    out = tmp_path / "merged"
    export_megatron_to_hf(runs[method], out, config=runs["hf"], weight_format="bfloat16",
                          base_megatron_path=runs["base"], peft_adapter=True)
    config = json.loads((out / PEFT_DIR / "adapter_config.json").read_text())
    assert config["use_dora"] == (method == "dora")
    ids = fixed_batch(runs["cfg"].vocab_size, 2, 40)
    base = load_reference_model(base_export)
    base_logits = _hf_logits(base, ids)
    model = PeftModel.from_pretrained(base, out / PEFT_DIR).eval()
    # peft took every tensor of the directory (a misnamed one would be left at its init silently)
    written = load_file(out / PEFT_DIR / "adapter_model.safetensors")
    loaded = get_peft_model_state_dict(model)
    assert sorted(loaded) == sorted(written)
    assert all(torch.equal(loaded[k], v) for k, v in written.items())
    experts = method == "lora"
    want = _megatron_logits(runs, method, ids, experts=experts)
    if experts:  # the expert adapters alone move the logits: a wrong expert layout would show
        expert_effect = logit_measures(_megatron_logits(runs, method, ids, experts=False), want)
        print(f"\nexpert adapters alone move the logits by {expert_effect['rel_logit_diff']:.3g} relative")
        assert expert_effect["rel_logit_diff"] > 100 * GATE
    _check(_hf_logits(model, ids), want, base_logits, f"{method} PEFT dir on the base export vs megatron "
           f"({'all adapters' if experts else 'attention adapters'})")


def test_adapter_only_checkpoint_without_its_base_is_refused(runs, tmp_path):
    with pytest.raises(AdapterExportError, match="base_megatron_path"):
        export_megatron_to_hf(runs["lora"], tmp_path / "out", config=runs["hf"])
    with pytest.raises(ExportError, match="no LoRA/DoRA adapters"):
        export_megatron_to_hf(runs["base"], tmp_path / "out2", config=runs["hf"], base_megatron_path=runs["base"])


def test_export_and_verify_stages_find_an_adapter_run_s_base_through_lineage(runs, tmp_path):
    """hf-checkpoint -> convert -> megatron-checkpoint -> (a LoRA run's) train-checkpoint -> export -> verify."""
    from safetensors.torch import load_file

    from tasks.common import StoreSettings
    from tasks.convert import ConvertParams, run_convert
    from tasks.export import ExportParams, run_export
    from tasks.store import ArtifactStore

    url = (tmp_path / "store").as_uri()
    store = ArtifactStore(url)

    hf = commit_directory(store, runs["hf"], name="tiny/gpt-oss")
    meg = run_convert(ConvertParams(source=f"hf-checkpoint/{hf.name}", dtype="float32",
                                    workdir=str(tmp_path / "w"), store=StoreSettings(url=url)), store).manifest
    # What the train stage commits: the run's iteration dir + tracker, with the base among its inputs.
    trained = commit_directory(store, runs["lora"], kind="train-checkpoint", name="tiny-lora", stage="train",
                               params={"iteration": STEPS, "config": {"peft": {"method": "lora", "dim": 4}}},
                               inputs=[meg])
    params = ExportParams(source=f"train-checkpoint/{trained.name}", weight_format="float32", peft_adapter=True,
                          workdir=str(tmp_path / "w"), store=StoreSettings(url=url))
    m = run_export(params, store).manifest
    assert {(i.kind, i.version) for i in m.inputs} == {("train-checkpoint", trained.version),
                                                         ("megatron-checkpoint", meg.version),
                                                         ("hf-checkpoint", hf.version)}
    assert m.metrics["base_source"] == meg.spec and m.metrics["adapters"]["method"] == "lora"
    out = store.local_path(m)
    assert (out / PEFT_DIR / "adapter_config.json").is_file()
    # the same bytes as the library's export of that run onto the same base
    direct = tmp_path / "direct"
    export_megatron_to_hf(runs["lora"], direct, config=runs["hf"], weight_format="float32",
                          base_megatron_path=runs["base"])
    for shard in direct.glob("*.safetensors"):
        got, want = load_file(out / shard.name), load_file(shard)
        assert sorted(got) == sorted(want) and all(torch.equal(got[k], want[k]) for k in want), shard.name
    # verify runs the train-checkpoint on the same base (lineage), whole-model and layer-wise, against the export
    from tasks.verify import VerifyParams, run_verify

    for mode in ("whole-model", "layer-wise"):
        report = run_verify(VerifyParams(candidate=trained.spec, reference=m.spec, mode=mode,
                                         workdir=str(tmp_path / "w"), store=StoreSettings(url=url)), store).manifest
        assert ("megatron-checkpoint", meg.version) in {(i.kind, i.version) for i in report.inputs}
        print(f"\nverify {mode}: first failure {report.metrics['first_failure']}, "
              f"{ {k: report.metrics[k] for k in ('rel_logit_diff',) if k in report.metrics} }")
        assert report.metrics["first_failure"] is None
