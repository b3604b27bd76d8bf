"""Training on CPU with the tiny GPT-OSS (gloo): layouts, loss, resume, LoRA/DoRA, SFT.

Launches (kept few: each torchrun start costs ~15 s here):
  1. world-of-one reference runs (`python -m gptoss_model.train`): 20 pretraining steps with
     clip_grad=1.0 biting (grad norms 1-2.6), and LoRA SFT (the TP2+SP adapter run's reference);
  2. one 2-process torchrun running, in turn: TP2+SP, TP2+SP+EP2 (20 steps each), PP2,
     EP2 (30 steps, checkpoints every 10: the uninterrupted run), a replica perturbed on
     one rank, LoRA SFT on the packed format and DoRA pretraining, both at EP2, LoRA SFT
     at TP2+SP, and DP2 with the distributed optimizer: 6 steps straight versus 3 then a
     resume to 6;
  3. one 4-process torchrun: TP2+SP+PP2 for 20 steps;
  4. `torchrun -m gptoss_model.train` at EP2, killed with SIGKILL (whole process group) at
     five points (start-up, mid-step, mid-save with the checkpoint writer alive, right after
     a save, during validation), the process table scanned after each; a half-written
     iter_* planted; a last launch resumes to step 20, bitwise the uninterrupted run.
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
TP2_SP = ["parallelism.tensor_model_parallel_size=2", "parallelism.sequence_parallel=true"]
EP2 = ["parallelism.expert_model_parallel_size=2"]
PP2 = ["parallelism.pipeline_model_parallel_size=2"]
# DP2 with the distributed optimizer overlapping its param all-gather with the next forward
# (the 20B/120B pretrain recipes): validation, checks and saves must see gathered weights.
DP2_OVERLAP = ["parallelism.use_distributed_optimizer=true", "parallelism.overlap_grad_reduce=true",
               "parallelism.overlap_param_gather=true"]
LAYOUTS = {"tp2_sp": TP2_SP, "tp2_sp_ep2": TP2_SP + EP2, "pp2": PP2, "dp2_overlap": DP2_OVERLAP}
FOUR_PROCESS_LAYOUTS = {"tp2_sp_pp2": TP2_SP + PP2}
LAYOUT_STEPS = 20
PERTURB = {"rank": 1, "after": 4, "param": "decoder.final_layernorm.weight"}
REPLICA_CHECK_EVERY = 3
PEFT_STEPS = 8


def _dir(env, name):
    return f"dir={env['root'] / 'runs' / name}"


@pytest.fixture(scope="module")
def reference(train_env):
    """World of one, same global batch: the losses every layout must reproduce."""
    cmd = [sys.executable, "-m", "gptoss_model.train", str(train_env["config"]), _dir(train_env, "world1"),
           f"train.train_iters={LAYOUT_STEPS}", *NO_SAVE]
    out = subprocess.run(cmd, env=ENV, capture_output=True, text=True, timeout=300, cwd=REPO)
    assert out.returncode == 0, out.stderr[-4000:]
    return [r for r in read_metrics(train_env["root"] / "runs" / "world1" / "metrics.jsonl") if "loss" in r]


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
    runs = [{"name": n, "config": cfg, "overrides": [_dir(train_env, n), f"train.train_iters={LAYOUT_STEPS}",
                                                     *NO_SAVE, *ov]}
            for n, ov in LAYOUTS.items()]
    runs.append({"name": "perturbed", "config": cfg, "perturb": PERTURB,
                 "overrides": [_dir(train_env, "perturbed"), *TP2_SP, *NO_SAVE, "train.train_iters=12",
                               f"train.replica_check_interval={REPLICA_CHECK_EVERY}"]})
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


@pytest.fixture(scope="module")
def four_process(train_env, tmp_path_factory):
    cfg = str(train_env["config"])
    runs = [{"name": n, "config": cfg, "overrides": [_dir(train_env, n), f"train.train_iters={LAYOUT_STEPS}",
                                                     *NO_SAVE, *ov]}
            for n, ov in FOUR_PROCESS_LAYOUTS.items()]
    spec = tmp_path_factory.mktemp("spec4") / "spec.json"
    spec.write_text(json.dumps({"runs": runs}))
    return run_torchrun(WORKER, spec, result=spec.with_name("out.json"), nproc=4, timeout=600)


def _rel(a, b):
    return abs(a - b) / abs(b)


@pytest.mark.distributed
@pytest.mark.slow
@pytest.mark.parametrize("layout", [*LAYOUTS, "ep2", *FOUR_PROCESS_LAYOUTS])
def test_parallel_layouts_match_one_process_with_clipping(reference, two_process, four_process, layout):
    """20 steps with clip_grad=1.0 biting: losses within 1e-6 of one process at every step, the
    grad norm equal on every rank at every step, and every parameter tensor parallelism does
    not split bitwise equal across the TP ranks at the end (they diverged before the
    expert-optimizer-tp-group patch: TP2+SP drifted to 1.8e-5 by step 10)."""
    result = (four_process if layout in FOUR_PROCESS_LAYOUTS else two_process)[layout]
    assert result["error"] is None, result["error"]  # the trainer's own replica check stopped the run
    got = [r for r in result["metrics"] if "loss" in r][:LAYOUT_STEPS]
    assert len(got) == len(reference) == LAYOUT_STEPS
    assert max(r["grad_norm"] for r in reference) > 1.0, "the clip never bit"
    worst = 0.0
    for want, have in zip(reference, got):
        worst = max(worst, _rel(have["loss"], want["loss"]))
        assert _rel(have["loss"], want["loss"]) < 1e-6, (layout, want["iteration"], have["loss"], want["loss"])
        assert _rel(have["grad_norm"], want["grad_norm"]) < 1e-6, (layout, want["iteration"])
    per_rank = list(result["grad_norms"].values())
    assert all(norms[:LAYOUT_STEPS] == per_rank[0][:LAYOUT_STEPS] for norms in per_rank), per_rank
    replicas = result["tp_replicas"]
    for rank, mine in replicas.items():
        for other in mine["tp_group"]:
            assert replicas[str(other)]["sha256"] == mine["sha256"], (layout, rank, other)
    print(f"\n{layout}: {LAYOUT_STEPS} steps, worst loss difference {worst:.2e} relative to one process; "
          f"grad norms equal on all {len(per_rank)} ranks; TP replicas bitwise equal")


@pytest.mark.distributed
@pytest.mark.slow
def test_the_replica_check_names_a_parameter_gone_astray(two_process):
    result = two_process["perturbed"]
    error = result["error"]
    assert error is not None, "a perturbed replica went unnoticed"
    caught_at = int(error.split("iteration ")[1].split(":")[0])
    print(f"\nperturbed after step {PERTURB['after']} on rank {PERTURB['rank']}, caught at step {caught_at}:\n{error}")
    assert PERTURB["after"] < caught_at <= PERTURB["after"] + REPLICA_CHECK_EVERY
    assert f"{PERTURB['param']} differs between rank" in error and "tensor-parallel" in error


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


def _run_groups(torchrun: psutil.Process) -> set[int]:
    """The process groups of a run: torchrun's and each rank's (a rank leads its own)."""
    groups = set()
    for p in [torchrun, *torchrun.children(recursive=True)]:
        with contextlib.suppress(ProcessLookupError):
            groups.add(os.getpgid(p.pid))
    return groups - {os.getpgid(0)}


def _run_processes(groups: set[int], run_dir: Path) -> list[psutil.Process]:
    """Every process in the run's groups (ranks, guards, forked checkpoint writers,
    multiprocessing helpers) or naming the run's directory."""
    found = []
    for p in psutil.process_iter(["cmdline"]):
        with contextlib.suppress(psutil.Error, ProcessLookupError):
            if os.getpgid(p.pid) in groups or str(run_dir) in " ".join(p.info["cmdline"] or []):
                found.append(p)
    return found


def _alive(procs: list[psutil.Process]) -> list[str]:
    out = []
    for p in procs:
        with contextlib.suppress(psutil.NoSuchProcess):
            if p.is_running() and p.status() != psutil.STATUS_ZOMBIE:
                out.append(f"{p.pid} {p.name()} {' '.join(p.cmdline()[:4])}")
    return out


def _writer_alive(torchrun: psutil.Process) -> bool:
    """A rank's forked checkpoint writer is running (a grandchild of torchrun that is a copy of
    the rank, not the rank's guard)."""
    with contextlib.suppress(psutil.Error):
        for rank in torchrun.children():
            for child in rank.children():
                if child.name() != "gptoss-guard" and "gptoss_model.train" in " ".join(child.cmdline()):
                    return True
    return False


def _metrics(run_dir: Path) -> dict[int, dict]:
    try:
        return {r["iteration"]: r for r in read_metrics(run_dir / "metrics.jsonl") if "loss" in r}
    except (FileNotFoundError, ValueError):  # not written yet, or a line half written
        return {}


# (what, ready(torchrun, run dir) -> kill now?): each launch resumes from the last save.
KILL_POINTS = [
    ("start-up (before the first step)", lambda tr, d: len(tr.children()) >= 2 and time.sleep(3) is None),
    ("mid-step", lambda tr, d: len(_metrics(d)) >= 2),
    ("mid-save, the checkpoint writer alive", lambda tr, d: _writer_alive(tr)),
    ("right after a save", lambda tr, d: (d / "checkpoints" / "latest_checkpointed_iteration.txt").is_file()
     and int((d / "checkpoints" / "latest_checkpointed_iteration.txt").read_text()) >= 12),
    ("validation", lambda tr, d: max(_metrics(d), default=0) >= 14 and max(_metrics(d)) % 2 == 0),
]


@pytest.mark.distributed
@pytest.mark.slow
def test_kill_at_five_points_leaves_no_process_and_resume_is_bitwise_exact(two_process, train_env):
    run_dir = train_env["root"] / "runs" / "killed"
    ckpts = run_dir / "checkpoints"
    # Saves every 2 steps and validation every 2 (one of each in flight most of the time);
    # neither changes the numbers, so every step must equal the uninterrupted EP2 run's.
    cadence = ["checkpoint.save_interval=2", "train.eval_interval=2", "train.train_iters=20"]
    for what, ready in KILL_POINTS:
        proc = _launch(train_env, "killed", *cadence)
        torchrun = psutil.Process(proc.pid)
        deadline = time.time() + 300
        while not ready(torchrun, run_dir):
            assert proc.poll() is None, f"run ended before {what}:\n{proc.stdout.read()[-4000:]}"
            assert time.time() < deadline, f"never reached {what}"
            time.sleep(0.02)
        groups = _run_groups(torchrun)
        procs = _run_processes(groups, run_dir)
        os.killpg(proc.pid, signal.SIGKILL)  # torchrun's group; the ranks lead groups of their own
        proc.wait()
        time.sleep(5)
        survivors = _alive(procs + _run_processes(groups, run_dir))
        print(f"\nkilled at {what} (iteration {max(_metrics(run_dir), default=0)}): {len(procs)} processes, "
              f"{len(survivors)} alive 5 s later")
        assert not survivors, f"outlived the kill at {what}: {survivors}"
    # A save that a crash cut short: files of a checkpoint, no tracker update.
    last = int((ckpts / "latest_checkpointed_iteration.txt").read_text())
    half = ckpts / f"iter_{last + 1:07d}"
    shutil.rmtree(half, ignore_errors=True)
    shutil.copytree(ckpts / f"iter_{last:07d}", half)
    (half / "metadata.json").unlink()
    for f in sorted(half.glob("*.distcp"))[:1]:
        f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])

    resumed = _launch(train_env, "killed", *cadence)
    log, _ = resumed.communicate(timeout=300)
    assert resumed.returncode == 0, log[-4000:]
    assert "resumed from" in log and f"iteration {last}" in log
    assert "ignoring" in log and half.name in log
    got = _metrics(run_dir)  # the last record of each iteration: what the finished run trained
    want = {r["iteration"]: r for r in two_process["ep2"]["metrics"] if "loss" in r}
    for it in range(1, 21):
        assert got[it]["loss"] == want[it]["loss"] and got[it]["grad_norm"] == want[it]["grad_norm"], it
        assert got[it]["lr"] == want[it]["lr"]
    print(f"resumed from iteration {last}; iterations 1-20 across six launches bitwise the uninterrupted run")
    assert (ckpts / "latest_checkpointed_iteration.txt").read_text() == "20"


@pytest.mark.distributed
@pytest.mark.slow
def test_a_killed_launcher_takes_torchrun_and_every_rank_process_with_it(train_env, tmp_path):
    """The flow's process (what `launch()` runs in) killed with SIGKILL: nothing can clean up, so
    torchrun must die with it (PR_SET_PDEATHSIG through exec), the ranks with torchrun, and each
    rank's guard must take the rest of its process group."""
    from gptoss_model.training.config import apply_overrides, load_yaml, save_yaml

    run_dir = tmp_path / "run"
    config = tmp_path / "run.yaml"
    save_yaml(apply_overrides(load_yaml(train_env["config"]), [f"dir={run_dir}", *EP2, "train.train_iters=1000",
                                                               "checkpoint.save_interval=2"]), config)
    pid_file = tmp_path / "torchrun.pid"
    code = ("from pathlib import Path; from gptoss_model.training.launch import launch; "
            f"launch({str(config)!r}, nproc_per_node=2, pid_file=Path({str(pid_file)!r}), on_line=lambda line: None)")
    launcher = subprocess.Popen([sys.executable, "-c", code], cwd=REPO, env=ENV, start_new_session=True)
    try:
        deadline = time.time() + 240
        while max(_metrics(run_dir), default=0) < 3:  # training, and a save behind it
            assert launcher.poll() is None and time.time() < deadline, "training never started"
            time.sleep(0.1)
        torchrun = psutil.Process(int(pid_file.read_text()))
        groups = _run_groups(torchrun)
        procs = [torchrun, *_run_processes(groups, run_dir)]
        os.kill(launcher.pid, signal.SIGKILL)
        launcher.wait()
        time.sleep(5)
        survivors = _alive(procs + _run_processes(groups, run_dir))
        print(f"\nlauncher killed: {len(procs)} processes of the run, {len(survivors)} alive 5 s later")
        assert not survivors, survivors
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(launcher.pid, signal.SIGKILL)


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
