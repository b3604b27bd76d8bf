"""Training on CPU with the tiny GPT-OSS (gloo): layouts, loss, resume, LoRA/DoRA, SFT.

Launches (kept few: each torchrun start costs ~15 s here):
  1. world-of-one reference runs (`python -m gptoss_model.train`): 3 pretraining steps, and
     LoRA SFT (the TP2+SP adapter run's reference);
  2. one 2-process torchrun running, in turn: TP2+SP, PP2 (3 steps each), EP2
     (30 steps, checkpoints every 10: the uninterrupted run), LoRA SFT on the packed
     format and DoRA pretraining, both at EP2, LoRA SFT at TP2+SP, and DP2 with the
     distributed optimizer: 6 steps straight versus 3 then a resume to 6;
  3. `torchrun -m gptoss_model.train` at EP2, killed with SIGKILL (whole process
     group) right after its step-10 checkpoint; then a half-written iter_0000015/ is
     planted; 4. the same command again resumes to step 20.
"""
from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

from gptoss_model.training.metrics import read_metrics
from tests.torchrun import run_torchrun

WORKER = Path(__file__).with_name("worker.py")
REPO = Path(__file__).resolve().parents[2]
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore", "PYTHONPATH": str(REPO)}
NO_SAVE = ["checkpoint.save_interval=0", "checkpoint.save_final=false", "train.eval_interval=0"]
LAYOUTS = {"tp2_sp": ["parallelism.tensor_model_parallel_size=2", "parallelism.sequence_parallel=true"],
           "pp2": ["parallelism.pipeline_model_parallel_size=2"]}
EP2 = ["parallelism.expert_model_parallel_size=2"]
PEFT_STEPS = 8


def _dir(env, name):
    return f"dir={env['root'] / 'runs' / name}"


@pytest.fixture(scope="module")
def reference(train_env):
    """World of one, same global batch: the losses every layout must reproduce."""
    cmd = [sys.executable, "-m", "gptoss_model.train", str(train_env["config"]), _dir(train_env, "world1"),
           "train.train_iters=3", *NO_SAVE]
    out = subprocess.run(cmd, env=ENV, capture_output=True, text=True, timeout=300, cwd=REPO)
    assert out.returncode == 0, out.stderr[-4000:]
    return read_metrics(train_env["root"] / "runs" / "world1" / "metrics.jsonl")


def _sft(env):
    return ["data.kind=sft", f"data.data_paths=[{', '.join(env['sft_prefixes'])}]"]


def _peft_overrides(method):
    dim, alpha = (4, 4) if method == "lora" else (4, 8)
    return [f"peft.method={method}", f"peft.dim={dim}", f"peft.alpha={alpha}", f"train.train_iters={PEFT_STEPS}",
            f"checkpoint.save_interval={PEFT_STEPS}", "train.eval_interval=0", "optimizer.lr=1e-2"]


@pytest.fixture(scope="module")
def lora_reference(train_env):
    """LoRA on the packed SFT data at world 1: what the TP2+SP adapter run must reproduce."""
    cmd = [sys.executable, "-m", "gptoss_model.train", str(train_env["config"]), _dir(train_env, "lora_world1"),
           *_peft_overrides("lora"), *_sft(train_env), "checkpoint.save_interval=0", "checkpoint.save_final=false"]
    out = subprocess.run(cmd, env=ENV, capture_output=True, text=True, timeout=300, cwd=REPO)
    assert out.returncode == 0, out.stderr[-4000:]
    return [r for r in read_metrics(train_env["root"] / "runs" / "lora_world1" / "metrics.jsonl") if "loss" in r]


@pytest.fixture(scope="module")
def two_process(train_env, tmp_path_factory):
    cfg = str(train_env["config"])
    runs = [{"name": n, "config": cfg, "overrides": [_dir(train_env, n), "train.train_iters=3", *NO_SAVE, *ov]}
            for n, ov in LAYOUTS.items()]
    runs.append({"name": "ep2", "config": cfg, "overrides": [_dir(train_env, "ep2"), *EP2,
                                                             "checkpoint.save_interval=10"]})
    # The distributed optimizer's resume, in-process: a run to 6 saving at 3, versus a run to 3
    # and a fresh Trainer on its directory resuming to 6 (the same path a restart takes).
    dist_opt = ["parallelism.use_distributed_optimizer=true", "train.eval_interval=0", "checkpoint.save_interval=3"]
    runs += [{"name": "distopt_straight", "config": cfg,
              "overrides": [_dir(train_env, "distopt_straight"), *dist_opt, "train.train_iters=6"]},
             {"name": "distopt_first", "config": cfg,
              "overrides": [_dir(train_env, "distopt_resumed"), *dist_opt, "train.train_iters=3"]},
             {"name": "distopt_resumed", "config": cfg,
              "overrides": [_dir(train_env, "distopt_resumed"), *dist_opt, "train.train_iters=6"]}]
    for name, method, layout, data in (("lora", "lora", EP2, _sft(train_env)), ("dora", "dora", EP2, []),
                                       ("lora_tp2", "lora", LAYOUTS["tp2_sp"], _sft(train_env))):
        runs.append({"name": name, "config": cfg, "overrides": [_dir(train_env, name), *layout,
                                                                *_peft_overrides(method), *data]})
    spec = tmp_path_factory.mktemp("spec") / "spec.json"
    spec.write_text(json.dumps({"runs": runs}))
    return run_torchrun(WORKER, spec, result=spec.with_name("out.json"), timeout=600)


def _rel(a, b):
    return abs(a - b) / abs(b)


@pytest.mark.distributed
@pytest.mark.slow
@pytest.mark.parametrize("layout", ["tp2_sp", "pp2", "ep2"])
def test_two_process_layouts_match_one_process(reference, two_process, layout):
    got = two_process[layout]["metrics"]
    for want, have in zip(reference[:3], [r for r in got if "loss" in r][:3]):
        print(f"\n{layout} iteration {want['iteration']}: loss {have['loss']:.8f} vs {want['loss']:.8f}, "
              f"grad norm {have['grad_norm']:.6f} vs {want['grad_norm']:.6f}")
        assert _rel(have["loss"], want["loss"]) < 1e-4
        assert _rel(have["grad_norm"], want["grad_norm"]) < 1e-4  # clipping sees the same norm


@pytest.mark.distributed
@pytest.mark.slow
def test_loss_falls_over_30_steps_on_real_text(two_process):
    recs = [r for r in two_process["ep2"]["metrics"] if "loss" in r]
    val = [r["val_loss"] for r in two_process["ep2"]["metrics"] if "val_loss" in r]
    first, last = recs[0]["loss"], sum(r["loss"] for r in recs[-5:]) / 5
    print(f"\nEP2: loss {first:.4f} -> {last:.4f} (mean of the last 5 of {len(recs)}); validation {val}")
    assert len(recs) == 30 and last < first - 0.5
    assert len(val) == 3 and val[-1] < val[0]
    assert all(r["tokens_per_s"] > 0 and r["tflops_per_s_per_rank"] > 0 and r["mem_gb"] > 0 for r in recs)


@pytest.mark.distributed
@pytest.mark.slow
@pytest.mark.parametrize("method", ["lora", "dora", "lora_tp2"])
def test_adapters_train_with_the_base_frozen(two_process, train_env, method):
    r = two_process[method]
    recs = [x for x in r["metrics"] if "loss" in x]
    print(f"\n{method}{'' if method.endswith('tp2') else ' EP2'}: loss {recs[0]['loss']:.4f} -> {recs[-1]['loss']:.4f}, trainable params/rank "
          f"{r['trainable']}")
    assert r["base_unchanged"]
    assert recs[-1]["loss"] < recs[0]["loss"] - 0.1
    runs = train_env["root"] / "runs"
    adapter = _size(runs / method / "checkpoints" / f"iter_{PEFT_STEPS:07d}")
    full = _size(runs / "ep2" / "checkpoints" / "iter_0000010")
    print(f"{method} checkpoint {adapter / 1e6:.2f} MB vs full training checkpoint {full / 1e6:.2f} MB")
    assert adapter < full / 3  # tiny model: dim 4 on width 64; at 20B, dim 32 on 2880


def _size(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def _launch(train_env, name, *overrides):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--standalone",
           "--max-restarts", "0", "-m", "gptoss_model.train", str(train_env["config"]), _dir(train_env, name),
           *EP2, "checkpoint.save_interval=10", *overrides]
    return subprocess.Popen(cmd, env=ENV, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, start_new_session=True)


@pytest.mark.distributed
@pytest.mark.slow
def test_resume_after_kill_is_bitwise_exact_and_ignores_incomplete_saves(two_process, train_env):
    ckpts = train_env["root"] / "runs" / "killed" / "checkpoints"
    proc = _launch(train_env, "killed")
    tracker = ckpts / "latest_checkpointed_iteration.txt"
    deadline = time.time() + 300
    while not (tracker.is_file() and tracker.read_text().strip() == "10"):
        assert proc.poll() is None, f"run ended before its step-10 checkpoint:\n{proc.stdout.read()[-4000:]}"
        assert time.time() < deadline, "no step-10 checkpoint within 300 s"
        time.sleep(0.05)
    ranks = psutil.Process(proc.pid).children()
    os.killpg(proc.pid, signal.SIGKILL)  # torchrun's group, mid-training: the ranks are in their own
    proc.wait()                          # sessions, so they must die of PR_SET_PDEATHSIG
    _, alive = psutil.wait_procs(ranks, timeout=20)
    assert not alive, f"ranks outlived the killed torchrun: {[p.pid for p in alive]}"
    for r in ranks:  # idle multiprocessing helpers of the checkpoint writer stay in the ranks' groups
        with contextlib.suppress(ProcessLookupError):
            os.killpg(r.pid, signal.SIGKILL)
    # A save that a crash cut short: files of a checkpoint, no tracker update.
    half = ckpts / "iter_0000015"
    shutil.copytree(ckpts / "iter_0000010", half)
    (half / "metadata.json").unlink()
    for f in sorted(half.glob("*.distcp"))[:1]:
        f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])
    killed_at = max(r["iteration"] for r in read_metrics(ckpts.parent / "metrics.jsonl"))
    assert 10 <= killed_at < 30

    resumed = _launch(train_env, "killed", "train.train_iters=20")
    log, _ = resumed.communicate(timeout=300)
    assert resumed.returncode == 0, log[-4000:]
    assert "resumed from" in log and "iteration 10" in log
    assert "ignoring" in log and "iter_0000015" in log
    got = {r["iteration"]: r for r in read_metrics(ckpts.parent / "metrics.jsonl") if "loss" in r}
    want = {r["iteration"]: r for r in two_process["ep2"]["metrics"] if "loss" in r}
    for it in range(11, 21):
        print(f"iteration {it}: resumed {got[it]['loss']!r} uninterrupted {want[it]['loss']!r}")
        assert got[it]["loss"] == want[it]["loss"] and got[it]["grad_norm"] == want[it]["grad_norm"]
        assert got[it]["lr"] == want[it]["lr"]
    assert (ckpts / "latest_checkpointed_iteration.txt").read_text() == "20"


@pytest.mark.distributed
@pytest.mark.slow
def test_lora_under_tp2_sp_trains_the_same_adapter_as_one_process(two_process, lora_reference):
    """B starts at zero, so step 1 only checks the base; steps 2+ run through the adapter's
    TP2+SP forward (column/row splits, sequence gather/reduce-scatter) and its gradients
    (replicated A/B tensors summed over the TP ranks): every step must match world 1."""
    got = [r for r in two_process["lora_tp2"]["metrics"] if "loss" in r]
    assert len(got) == len(lora_reference) == PEFT_STEPS
    for want, have in zip(lora_reference, got):
        print(f"LoRA TP2+SP iteration {want['iteration']}: loss {have['loss']:.8f} vs {want['loss']:.8f}, "
              f"grad norm {have['grad_norm']:.6f} vs {want['grad_norm']:.6f}")
        assert _rel(have["loss"], want["loss"]) < 1e-4
        assert _rel(have["grad_norm"], want["grad_norm"]) < 1e-4


@pytest.mark.distributed
@pytest.mark.slow
def test_distributed_optimizer_resume_is_bitwise_exact(two_process):
    assert two_process["distopt_resumed"]["summary"]["resumed_from"] == 3
    got = {r["iteration"]: r for r in two_process["distopt_resumed"]["metrics"] if "loss" in r}
    want = {r["iteration"]: r for r in two_process["distopt_straight"]["metrics"] if "loss" in r}
    for it in range(4, 7):
        print(f"distributed optimizer, iteration {it}: resumed {got[it]['loss']!r} uninterrupted {want[it]['loss']!r}")
        assert got[it]["loss"] == want[it]["loss"] and got[it]["grad_norm"] == want[it]["grad_norm"]
