"""Start `torchrun -m gptoss_model.train` on this host, follow it, say why it ended, and stop all of it.

torchrun runs in its own session; its pid goes to a pid file, so whoever must stop it
later (a cancellation hook in another process) can. Killing torchrun's process group is
NOT enough: torchrun (torch 2.13) starts every rank with start_new_session=True, so the
ranks are session leaders of their own groups and keep training after torchrun dies.
`kill_tree` therefore collects the whole process tree first and kills every group in it;
and each rank asks the kernel to kill it when torchrun dies (gptoss_model.train sets
PR_SET_PDEATHSIG), so even a SIGKILL of torchrun alone leaves no rank behind, and each rank's
guard (`guard_process_group`) kills what the rank itself started. Every rank's lines (torchrun
tags them `[defaultN]:` under --tee 3) are handed to a callback as they come.

`supervise` runs it to the end and turns the ranks' exit codes into the error a caller's
retry policy needs: permanent (a refused config, a non-finite loss, diverged replicas, a
tampered checkpoint) or transient (a killed rank, a hang, a lost node).
"""

from __future__ import annotations

import hashlib
import logging
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING, Callable

from gptoss_model.system.processes import free_port
from gptoss_model.errors import PermanentError
from gptoss_model.settings import settings
from gptoss_model.training.config import ConfigError
from gptoss_model.training.launchers import TORCHRUN_ENV
from gptoss_model.training.exit_codes import (EXIT_CONFIG, EXIT_HANG, EXIT_NONFINITE, EXIT_PERMANENT,  # noqa: F401
                                             EXIT_REPLICAS, EXIT_SAVED)

if TYPE_CHECKING:
    from gptoss_model.training.launchers import Launch

log = logging.getLogger(__name__)

_RANK0 = re.compile(r"^\[default0\]:")
_OTHER_RANK = re.compile(r"^\[default[1-9]\d*\]:")
_RANK_EXIT = re.compile(r"^\s*exitcode\s*:\s*(-?\d+)")


class TrainingFailed(RuntimeError):
    """torchrun exited non-zero for a reason a retry may fix (a killed rank, a lost node, a hang)."""


class TrainingRefused(PermanentError, RuntimeError):
    """The training entry stopped on an error a retry cannot fix (a tampered checkpoint, bad data)."""


def pid_file(workdir: Path, run_key: str) -> Path:
    """Where the torchrun of the run `run_key` (any string naming it, e.g. its parameters) keeps its pid:
    found again from the key alone, so a cancellation hook needs nothing else to stop it."""
    return Path(workdir) / "train-pids" / f"{hashlib.sha256(run_key.encode()).hexdigest()[:24]}.pid"


def torchrun_command(config_yaml: str | Path, nproc_per_node: int, overrides: list[str] = (), *,
                     nnodes: int = 1, rdzv_endpoint: str = "127.0.0.1:0", rdzv_id: str = "none",
                     max_restarts: int = 0) -> list[str]:
    """One torchrun agent (one node's processes). Several agents with the same `rdzv_endpoint` and
    `rdzv_id` form one run; the first to reach the endpoint's host serves the c10d store."""
    # torchrun dies with whoever launched it, even a SIGKILLed flow process (gptoss_model.system.processes).
    return [sys.executable, "-m", "gptoss_model.system.processes", str(os.getpid()),
            sys.executable, "-m", "torch.distributed.run", "--nnodes", str(nnodes),
            "--nproc-per-node", str(nproc_per_node), "--rdzv-backend", "c10d", "--rdzv-endpoint", rdzv_endpoint,
            "--rdzv-id", rdzv_id, "--max-restarts", str(max_restarts),
            "--tee", "3", "-m", "gptoss_model.train", str(config_yaml), *overrides]


def _devices_of_agent(env: dict, agent: int, nnodes: int, nproc_per_node: int) -> dict:
    """Several agents on one host each pick GPUs by LOCAL_RANK (0..n-1): give each its own GPUs."""
    if nnodes == 1:
        return {}
    import torch

    visible = env.get("CUDA_VISIBLE_DEVICES")
    devices = visible.split(",") if visible else [str(i) for i in range(torch.cuda.device_count())]
    if len(devices) < nnodes * nproc_per_node:
        return {}  # CPU (gloo), or fewer GPUs than ranks: pre-flight speaks for the latter
    return {"CUDA_VISIBLE_DEVICES": ",".join(devices[agent * nproc_per_node:(agent + 1) * nproc_per_node])}


def launch(config_yaml: str | Path, *, nproc_per_node: int, pid_file: Path,
           on_line: Callable[[str], None] = print, env: dict | None = None, cwd: str | Path | None = None,
           poll: Callable[[], None] | None = None, nnodes: int = 1, max_restarts: int = 0) -> int:
    """Run training to completion on this host; returns the agents' exit code (the first non-zero).

    `nnodes` > 1 starts that many agents here, one node each, meeting at a c10d rendezvous on
    127.0.0.1: a multi-node run's path (rendezvous, restarts) on one machine. `poll()` is called
    about twice a second while it runs (checkpoint watching); if it raises, the run is killed."""
    import threading
    import uuid

    env = {**os.environ, **TORCHRUN_ENV, **(env or {})}
    env.setdefault("OMP_NUM_THREADS", "1")
    endpoint = "127.0.0.1:0" if nnodes == 1 else f"127.0.0.1:{free_port()}"
    rdzv_id = uuid.uuid4().hex[:12]
    agents = [subprocess.Popen(torchrun_command(config_yaml, nproc_per_node, nnodes=nnodes, rdzv_endpoint=endpoint,
                                                rdzv_id=rdzv_id, max_restarts=max_restarts),
                               env={**env, **_devices_of_agent(env, agent, nnodes, nproc_per_node)}, cwd=cwd,
                               stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, bufsize=1,
                               start_new_session=True)
              for agent in range(nnodes)]
    pid_file.parent.mkdir(parents=True, exist_ok=True)
    pid_file.write_text("\n".join(str(a.pid) for a in agents))
    try:
        def pump(agent):
            for line in agent.stdout:
                on_line(line.rstrip("\n"))

        readers = [threading.Thread(target=pump, args=(a,), daemon=True) for a in agents]
        for reader in readers:
            reader.start()
        while any(a.poll() is None for a in agents):
            if poll is not None:
                poll()
            time.sleep(0.5)
        for reader in readers:
            reader.join(timeout=10)
        if poll is not None:
            poll()
        return next((a.returncode for a in agents if a.returncode != 0), 0)
    except BaseException:
        for agent in agents:
            kill_tree(agent.pid)
        raise
    finally:
        if all(a.poll() is not None for a in agents):
            pid_file.unlink(missing_ok=True)


def guard_process_group() -> None:
    """Under torchrun, fork a watcher that SIGKILLs this rank's process group once the rank is gone.

    A rank's children do not inherit its die-with-torchrun setting: the checkpoint writer
    megatron forks per save (a copy of the rank, hundreds of MB), multiprocessing's
    manager and resource tracker outlived a killed run. torchrun makes every rank the
    leader of its own process group and all of them stay in it, so one killpg after the
    rank's death ends them all. Forked before torch is imported: the watcher stays small.
    """
    if settings().torchelastic_run_id is None or os.getpgid(0) != os.getpid():
        return  # not a torchrun rank leading its own group: the group may hold other programs
    rank_pid = os.getpid()
    if os.fork() != 0:
        return
    try:
        import ctypes

        ctypes.CDLL(None).prctl(15, b"gptoss-guard")  # PR_SET_NAME: tell it from the rank in ps/top
        devnull = os.open(os.devnull, os.O_RDWR)
        for fd in (0, 1, 2):  # hold none of the launcher's pipes open
            os.dup2(devnull, fd)
        for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
            signal.signal(sig, signal.SIG_IGN)  # a polite stop of the group is the rank's to handle
        while os.getppid() == rank_pid:
            time.sleep(0.1)
        os.killpg(rank_pid, signal.SIGKILL)
    finally:
        os._exit(0)


def kill_tree(pid: int, sig: int = signal.SIGTERM, grace_s: float = 5.0) -> bool:
    """Signal torchrun (`pid`) and every descendant, group by group; SIGKILL what is left after
    `grace_s`. Returns False when nothing was running."""
    import psutil

    try:
        root = psutil.Process(pid)
        procs = [root, *root.children(recursive=True)]
    except psutil.NoSuchProcess:
        return False
    groups = set()
    for p in procs:
        try:
            groups.add(os.getpgid(p.pid))
        except ProcessLookupError:
            pass
    for g in groups:
        with _gone_ok():
            os.killpg(g, sig)
    _, alive = psutil.wait_procs(procs, timeout=grace_s if sig != signal.SIGKILL else 5.0)
    for p in alive:
        with _gone_ok():
            p.kill()
    psutil.wait_procs(alive, timeout=5.0)
    return True


class _gone_ok:
    def __enter__(self):
        return self

    def __exit__(self, exc_type, exc, tb):
        import psutil

        return exc_type is not None and issubclass(exc_type, (ProcessLookupError, psutil.NoSuchProcess))


def kill_from_pid_file(pid_file: Path) -> bool:
    """Stop everything recorded in `pid_file` (a cancellation/failure hook's job): each torchrun agent
    started here (a pid), the Slurm job (`slurm:JOBID`) or the Kubernetes Job
    (`kubernetes:NAMESPACE/JOB`) holding them."""
    from gptoss_model.training import kubernetes, slurm

    try:
        entries = Path(pid_file).read_text().split()
    except FileNotFoundError:
        return False
    stopped = []
    for entry in entries:
        if entry.startswith(slurm.JOB_FILE_PREFIX):
            slurm.cancel(entry.removeprefix(slurm.JOB_FILE_PREFIX))
            stopped.append(True)
        elif entry.startswith(kubernetes.JOB_FILE_PREFIX):
            namespace, _, name = entry.removeprefix(kubernetes.JOB_FILE_PREFIX).partition("/")
            stopped.append(kubernetes.delete(namespace, name))
        elif entry.isdigit():
            stopped.append(kill_tree(int(entry)))
    Path(pid_file).unlink(missing_ok=True)
    return any(stopped)


class _RankReport:
    """What the ranks said: rank 0's lines (and any rank's errors) to the log, exit codes, errors."""

    def __init__(self):
        self.exit_codes: set[int] = set()
        self.errors: list[str] = []

    def __call__(self, line: str) -> None:
        if _OTHER_RANK.match(line) and "error: " not in line:
            return  # rank 0 speaks for the run; another rank only when it reports an error (a hang rank 0 is in)
        log.info("%s", _RANK0.sub("", line))
        if reported := _RANK_EXIT.search(line):  # torchrun's failure report, one per failed rank
            self.exit_codes.add(int(reported.group(1)))
        if "error: " in line:
            self.errors.append(line.split("error: ", 1)[1])


def supervise(config_yaml: Path, launcher: "Launch", *, pid_file: Path, poll: Callable[[], None],
              saved: Callable[[], list[int]], job_name: str = "gptoss-train", stop_file: Path | None = None) -> None:
    """Run training to its end where `launcher` says; raise what stopped it early, classified for a
    retry policy.

    `poll()` runs about twice a second (commit what was saved); `saved()` lists the iterations
    already safe, for the error messages (a retry resumes from the newest)."""
    from gptoss_model.training.launchers import KubernetesLaunch, LocalLaunch, SlurmLaunch
    from gptoss_model.training.loop import NonFiniteLossError
    from gptoss_model.training.replicas import ReplicaDivergenceError

    ranks = _RankReport()
    if isinstance(launcher, LocalLaunch):
        rc = launch(config_yaml, nproc_per_node=launcher.procs_per_node, pid_file=pid_file, on_line=ranks,
                    poll=poll, nnodes=launcher.nodes, max_restarts=launcher.max_restarts)
    elif isinstance(launcher, SlurmLaunch):
        from gptoss_model.training.slurm import run_job

        rc = run_job(launcher, Path(config_yaml), run_dir=Path(config_yaml).parent, job_name=job_name,
                     pid_file=pid_file, stop_file=stop_file or Path(config_yaml).with_name("save-and-stop"),
                     on_line=ranks, poll=poll)
    elif isinstance(launcher, KubernetesLaunch):
        from gptoss_model.training.kubernetes import run_job as run_kubernetes_job

        rc = run_kubernetes_job(launcher, Path(config_yaml), run_dir=Path(config_yaml).parent, job_name=job_name,
                                pid_file=pid_file, on_line=ranks, poll=poll)
    else:
        raise ConfigError(f"launcher.kind: {getattr(launcher, 'kind', launcher)!r} is not a launcher")
    if rc == 0:  # the run ended well, also after a restart or a requeue that earlier failures led to
        return
    codes = ranks.exit_codes
    if rc == EXIT_CONFIG or EXIT_CONFIG in codes:
        raise ConfigError(f"training refused its config (exit {EXIT_CONFIG}); see the log above ({config_yaml})")
    if EXIT_NONFINITE in codes:  # permanent: a retry resumes into the same overflow
        raise NonFiniteLossError(f"training stopped on a non-finite loss or gradient norm (see the log above); "
                                 f"checkpoints committed: {saved()}")
    if EXIT_REPLICAS in codes:
        raise ReplicaDivergenceError(f"training stopped: replicated parameters disagree across ranks (see the log "
                                     f"above); checkpoints committed: {saved()}")
    if EXIT_PERMANENT in codes:
        raise TrainingRefused(f"training stopped on an error a retry cannot fix: "
                              f"{ranks.errors[0] if ranks.errors else 'see the log'} (checkpoints committed: {saved()})")
    if EXIT_HANG in codes:  # transient: a retry resumes from the newest committed checkpoint
        hung = [e for e in ranks.errors if e.startswith("training hung:")]
        raise TrainingFailed(f"{hung[0] if hung else 'training hung: a rank made no progress for train.hang_timeout'}"
                             f" (checkpoints committed: {saved()})")
    if EXIT_SAVED in codes or rc == EXIT_SAVED:
        raise TrainingFailed(f"training saved and stopped when asked to (its stop file); checkpoints committed: "
                             f"{saved()} (a retry resumes from the newest)")
    if rc != 0:
        raise TrainingFailed(f"torchrun exited with {rc}; checkpoints committed so far: {saved()} "
                             "(a retry resumes from the newest)")
