"""The CUDA code paths: NCCL, bf16 training, models built on the GPU, the numeric gates there.

Skipped without CUDA (CI has none). On a GPU machine: `python -m pytest -q -s tests/gpu`.
Each test prints what it measured. Transformer Engine is used when it is importable;
without it the local layer spec runs on the GPU.
"""
from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    from gptoss_model.checkpoint.tiny import write_tiny_checkpoint
    from tests.train.data import write_tiny_pretrain_dataset

    root = tmp_path_factory.mktemp("gpu")
    return {"root": root, "hf": write_tiny_checkpoint(root / "hf", dtype="float32", seed=0),
            "prefixes": write_tiny_pretrain_dataset(root / "dataset")}


@pytest.fixture(scope="module")
def converted(tiny):
    """The conversion on a CUDA machine (where torch's writer orders tensors by size)."""
    from gptoss_model.convert.hf_to_megatron import convert_hf_to_megatron

    out = tiny["root"] / "megatron"
    convert_hf_to_megatron(tiny["hf"], out, dtype="float32")
    return out


def test_conversion_parity_gate_runs_on_a_cuda_machine(tiny, converted):
    from gptoss_model.verify.parity import default_tolerance, enforce_parity, parity_check

    gate = parity_check(converted, tiny["hf"], dtype="float32")
    print(f"\nparity on {torch.cuda.get_device_name(0)}: {gate}")
    enforce_parity(gate, default_tolerance("float32"), "the tiny conversion on CUDA")


def test_layer_wise_verification_on_a_cuda_machine(tiny, converted):
    from gptoss_model.model.config import GptOssModelConfig
    from gptoss_model.verify.parity import fixed_batch
    from gptoss_model.verify.layers import HFSide, MegatronSide, default_tolerance, verify_layerwise

    cfg = GptOssModelConfig.from_hf_config(tiny["hf"])
    ids = fixed_batch(cfg.vocab_size, 2, 2 * cfg.sliding_window + 8)
    reference = HFSide(tiny["hf"])
    with MegatronSide(converted, cfg) as candidate:
        reference.round_to = candidate.storage_dtype
        report = verify_layerwise(reference, candidate, ids, tolerance=default_tolerance("float32"))
    print(f"\nlayer-wise on CUDA machine: passed={report.passed} in {report.seconds:.1f} s, "
          f"GPU memory {torch.cuda.max_memory_allocated() / 1e9:.3f} GB\n{report.table()}")
    assert report.passed, report.first_failure


def test_training_with_nccl_in_bf16_then_export_passes_the_gate(tiny):
    from gptoss_model.export.megatron_to_hf import export_megatron_to_hf
    from gptoss_model.recipes import tiny_pretrain_config
    from gptoss_model.training.config import save_yaml
    from gptoss_model.training.launch import torchrun_command
    from gptoss_model.training.metrics import read_metrics
    from gptoss_model.verify.parity import default_tolerance, verify_whole_model

    run_dir = tiny["root"] / "run"
    run = tiny_pretrain_config(data_paths=tiny["prefixes"], dir=str(run_dir), hf_path=str(tiny["hf"]),
                               pretrained_checkpoint=str(tiny["hf"]), train_iters=30)
    run.scheduler.lr_decay_iters = 30
    config = tiny["root"] / "run.yaml"
    save_yaml(run, config)
    done = subprocess.run(torchrun_command(config, 1), cwd=REPO, capture_output=True, text=True, timeout=600)
    print(done.stdout[-3000:], done.stderr[-3000:], sep="\n")
    assert done.returncode == 0

    recs = [r for r in read_metrics(run_dir / "metrics.jsonl") if "loss" in r]
    first, last = recs[0]["loss"], sum(r["loss"] for r in recs[-5:]) / 5
    print(f"\nbf16 on CUDA, TE={importlib.util.find_spec('transformer_engine') is not None}: loss {first:.4f} -> "
          f"{last:.4f}; {recs[-1]['tokens_per_s']:.0f} tok/s; device memory {recs[-1]['mem_gb']:.3f} GB")
    assert len(recs) == 30 and last < first - 0.5
    assert all(r["mem_gb"] > 0 for r in recs)  # CUDA's allocator, not the host's RSS

    exported = tiny["root"] / "exported"
    export_megatron_to_hf(run.save_dir(), exported, config=tiny["hf"], weight_format="bfloat16")
    result = verify_whole_model(exported, run.save_dir(), candidate_kind="megatron",
                                tolerance=default_tolerance("bfloat16"))
    print(f"export gate on CUDA: { {k: v for k, v in result.items() if not isinstance(v, list)} }")
    assert not result["failures"], result["failures"]



@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 GPUs")
def test_two_agents_on_the_gpus_of_one_machine_train_like_one_agent(tiny):
    """The multi-node path (2 torchrun agents, c10d rendezvous, NCCL across them) on one machine's GPUs:
    the same losses as one agent with 2 processes."""
    from gptoss_model.recipes import tiny_pretrain_config
    from gptoss_model.training.config import save_yaml
    from gptoss_model.training.launch import launch
    from gptoss_model.training.metrics import read_metrics

    got = {}
    for nodes, procs in ((1, 2), (2, 1)):
        run_dir = tiny["root"] / f"agents-{nodes}x{procs}"
        run = tiny_pretrain_config(data_paths=tiny["prefixes"], dir=str(run_dir), hf_path=str(tiny["hf"]),
                                   pretrained_checkpoint=str(tiny["hf"]), train_iters=10)
        run.parallelism.expert_model_parallel_size = 2
        run.checkpoint.save_interval, run.checkpoint.save_final, run.train.eval_interval = 0, False, 0
        config = tiny["root"] / f"agents-{nodes}x{procs}.yaml"
        save_yaml(run, config)
        lines: list[str] = []
        # the launcher gives each agent its own GPU (each agent's rank is LOCAL_RANK 0)
        rc = launch(config, nproc_per_node=procs, nnodes=nodes, pid_file=tiny["root"] / "agents.pid",
                    on_line=lines.append, cwd=REPO)
        assert rc == 0, "\n".join(lines[-40:])
        got[nodes] = [(r["iteration"], r["loss"]) for r in read_metrics(run_dir / "metrics.jsonl") if "loss" in r]
    print(f"\n2 agents x 1 GPU vs 1 agent x 2 GPUs over 10 steps: {got[2][-1]} vs {got[1][-1]}")
    assert got[2] == got[1]


if __name__ == "__main__":
    sys.exit(pytest.main([__file__, "-q", "-s"]))
