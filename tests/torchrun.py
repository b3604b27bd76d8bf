"""Launch a test worker script under torchrun (2 CPU processes, gloo) and read its JSON result."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest


def run_torchrun(worker: Path, *args, result: Path, nproc: int = 2, timeout: float = 240) -> dict:
    """Run `torchrun worker *args`; the worker writes its figures as JSON to `result` (its last arg)."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(nproc), "--standalone",
           "--max-restarts", "0", str(worker), *map(str, args), str(result)]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    # Own process group: on a hang, the launcher *and* its workers are killed.
    proc = subprocess.Popen(cmd, env=env, text=True, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            start_new_session=True)
    try:
        stdout, stderr = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        stdout, stderr = proc.communicate()
        pytest.fail(f"torchrun timed out:\n{stdout[-4000:]}\n{stderr[-8000:]}")
    if proc.returncode != 0:
        pytest.fail(f"torchrun failed ({proc.returncode}):\n{stdout[-4000:]}\n{stderr[-8000:]}")
    return json.loads(Path(result).read_text())
