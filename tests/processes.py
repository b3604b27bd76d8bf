"""Kill a stage's process alone and check that everything it started dies with it."""
from __future__ import annotations

import os
import signal
import subprocess

import psutil


def kill_alone_and_count_survivors(proc: subprocess.Popen, what: str, within_s: float = 5.0) -> list[str]:
    """SIGKILL `proc` only (not its group: nothing of it can clean up), then wait `within_s` for the
    descendants it had; returns the survivors, described (empty: every child died with it)."""
    descendants = psutil.Process(proc.pid).children(recursive=True)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    _, alive = psutil.wait_procs(descendants, timeout=within_s)
    print(f"\nkilled {what}: {len(descendants)} descendants, {len(alive)} alive {within_s:g} s later")
    return [f"{p.pid} {' '.join(p.cmdline()[:5])}" for p in alive if p.is_running()]
