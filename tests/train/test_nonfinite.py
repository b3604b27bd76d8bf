"""A run whose loss overflows stops with a clear error and keeps its last good checkpoint.

Deterministic overflow, no test-only code path: warmup starts at LR 0 (iteration 1 leaves
the weights as they are), iteration 2 steps with LR 5e29, so Adam moves every weight by
about 5e29; iteration 3's forward pass then overflows fp32 (activations ~1e60) and its
loss and gradient norm are NaN. Checkpoints are saved every iteration, so iterations 1
and 2 are committed and the failing iteration 3 must not be.
"""
from __future__ import annotations

import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

from gptoss_model.train import EXIT_NONFINITE
from gptoss_model.training.metrics import read_metrics

REPO = Path(__file__).resolve().parents[2]
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore", "PYTHONPATH": str(REPO)}


@pytest.mark.slow
def test_nonfinite_loss_stops_the_run_and_keeps_the_last_good_checkpoint(train_env):
    run_dir = train_env["root"] / "runs" / "overflow"
    cmd = [sys.executable, "-m", "gptoss_model.train", str(train_env["config"]), f"dir={run_dir}",
           "train.train_iters=6", "train.eval_interval=0", "checkpoint.save_interval=1",
           "scheduler.lr_warmup_iters=2", "scheduler.lr_warmup_init=0.0", "scheduler.lr_decay_iters=6",
           "optimizer.lr=1e30", "optimizer.min_lr=1e30", "optimizer.weight_decay=0.0"]
    out = subprocess.run(cmd, env=ENV, capture_output=True, text=True, timeout=300, cwd=REPO)
    print(out.stderr[-1500:])
    assert out.returncode == EXIT_NONFINITE, (out.returncode, out.stderr[-4000:])
    error = [line for line in out.stderr.splitlines() if line.startswith("error: ")]
    assert error and "iteration 3:" in error[-1] and "loss is nan" in error[-1]
    assert "gradient norm is nan" in error[-1]
    assert "stopped without saving" in error[-1] and "iter_0000002" in error[-1]
    ckpts = run_dir / "checkpoints"
    assert (ckpts / "latest_checkpointed_iteration.txt").read_text().strip() == "2"
    assert sorted(p.name for p in ckpts.glob("iter_*")) == ["iter_0000001", "iter_0000002"]
    recs = [r for r in read_metrics(run_dir / "metrics.jsonl") if "loss" in r]
    assert [r["iteration"] for r in recs] == [1, 2]  # the non-finite step is not logged as a result
    assert all(math.isfinite(r["loss"]) and math.isfinite(r["grad_norm"]) for r in recs)
