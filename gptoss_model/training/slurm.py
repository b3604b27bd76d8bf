"""Run training as a Slurm batch job: render infra/slurm/train.sbatch, `sbatch` it, follow it with
`squeue`/`scontrol` (no accounting database needed), stream its log as it grows, `scancel` it.

Written on Slurm's own command-line tools rather than a library (submitit pickles a Python
callable into the job, which this project's rule against unpickling shared-dir bytes forbids,
and hides the batch script a cluster admin wants to read); each tool's output is parsed in
one place here. The job's end state decides what a retry can do: see `end_state_error`.
"""
from __future__ import annotations

import logging
import re
import shlex
import shutil
import string
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from gptoss_model.errors import PermanentError
from gptoss_model.training.exit_codes import EXIT_SAVED
from gptoss_model.training.launchers import TORCHRUN_ENV, SlurmLaunch

log = logging.getLogger(__name__)

TEMPLATE = Path(__file__).resolve().parents[2] / "infra" / "slurm" / "train.sbatch"
# What the job sees besides the launcher's `env` names: enough to find this Python and its packages.
BASE_EXPORT = ("PATH", "HOME", "LANG", "PYTHONPATH", "VIRTUAL_ENV", "OMP_NUM_THREADS", "SLURM_CONF")
# Job states that end a job (scontrol's JobState), and those a requeue turns back into PENDING.
FINISHED = {"COMPLETED", "FAILED", "TIMEOUT", "CANCELLED", "NODE_FAIL", "PREEMPTED", "OUT_OF_MEMORY",
            "BOOT_FAIL", "DEADLINE"}
JOB_FILE_PREFIX = "slurm:"  # a line of the run's pid file naming a job, so a cancel hook can scancel it


class SlurmError(RuntimeError):
    """A Slurm command failed in a way a retry may fix (the controller unreachable, a node lost)."""


class SlurmJobRefused(PermanentError, RuntimeError):
    """The job cannot run as asked (no such partition, a bad request) or was cancelled outside this run."""


def tool(name: str) -> str:
    found = shutil.which(name)
    if found is None:
        raise SlurmJobRefused(f"launcher.kind: slurm needs `{name}` on this machine's PATH (Slurm's client tools)")
    return found


def run_tool(*args: str) -> str:
    out = subprocess.run([tool(args[0]), *args[1:]], capture_output=True, text=True, timeout=60)
    if out.returncode != 0:
        message = (out.stderr or out.stdout).strip().splitlines()
        raise SlurmError(f"{' '.join(args[:2])}: {message[-1] if message else f'exit {out.returncode}'}")
    return out.stdout


def partitions() -> list[str]:
    """The cluster's partitions (`sinfo`), to refuse an unknown one before submitting."""
    return sorted({p.strip().rstrip("*") for p in run_tool("sinfo", "-h", "-o", "%P").split() if p.strip()})


def render(launch: SlurmLaunch, *, config_yaml: Path, log_file: Path, job_name: str, stop_file: Path) -> str:
    optional = [f"#SBATCH --{flag}={value}" for flag, value in (
        ("partition", launch.partition), ("account", launch.account), ("qos", launch.qos),
        ("gpus-per-node", launch.gpus_per_node or None)) if value]
    if launch.requeue:
        optional.append("#SBATCH --requeue")
    return string.Template(TEMPLATE.read_text()).substitute(
        job_name=job_name, nodes=launch.nodes, procs_per_node=launch.procs_per_node, time_limit=launch.time_limit,
        log_file=log_file, export=",".join(dict.fromkeys([*BASE_EXPORT, *launch.env])),
        optional_directives="\n".join(optional), python=sys.executable, rdzv_port=launch.rdzv_port,
        max_restarts=launch.max_restarts, config_yaml=config_yaml, save_signal_seconds=launch.save_signal_seconds,
        stop_file=stop_file, exit_saved=EXIT_SAVED,
        torchrun_env="\n".join(f"export {k}={shlex.quote(v)}" for k, v in TORCHRUN_ENV.items()))


@dataclass
class JobState:
    state: str
    exit_code: int
    reason: str

    @property
    def finished(self) -> bool:
        return self.state in FINISHED

    def describe(self) -> str:
        return self.state + (f" ({self.reason})" if self.reason != "None" else "") + (
            f", exit {self.exit_code}" if self.finished else "")


def job_state(job_id: str) -> JobState | None:
    """The job's state from `scontrol show job` (None once Slurm has forgotten it)."""
    try:
        text = run_tool("scontrol", "show", "job", "-o", job_id)
    except SlurmError as e:
        if "Invalid job id" in str(e):
            return None
        raise
    fields = dict(re.findall(r"(\w+)=(\S*)", text))
    code = fields.get("ExitCode", "0:0").split(":")
    return JobState(fields.get("JobState", "UNKNOWN"), int(code[0] or 0) or int(code[-1] or 0),
                    fields.get("Reason", "None"))


def end_state_error(job_id: str, state: JobState) -> Exception | None:
    """What a job's end means for a retry: None (it completed); SlurmJobRefused (permanent: cancelled
    outside this run, or the job could not be started as asked); SlurmError (a retry resumes from the
    newest checkpoint: time limit, node failure, preemption, a failed node's processes)."""
    if state.state == "COMPLETED":
        return None
    what = f"Slurm job {job_id} ended {state.state} (exit {state.exit_code}, reason {state.reason})"
    if state.state in ("CANCELLED", "BOOT_FAIL", "DEADLINE"):
        return SlurmJobRefused(what)
    return SlurmError(what)  # TIMEOUT, NODE_FAIL, PREEMPTED, OUT_OF_MEMORY: a retry resumes


class LogFollower:
    """Hands each complete new line of a growing file to `on_line`."""

    def __init__(self, path: Path, on_line: Callable[[str], None]):
        self.path, self.on_line, self.offset, self.partial = path, on_line, 0, ""

    def __call__(self) -> None:
        try:
            with self.path.open("r", errors="replace") as f:
                f.seek(self.offset)
                text = f.read()
                self.offset = f.tell()
        except FileNotFoundError:
            return
        lines = (self.partial + text).split("\n")
        self.partial = lines.pop()
        for line in lines:
            self.on_line(line)


def run_job(launch: SlurmLaunch, config_yaml: Path, *, run_dir: Path, job_name: str, pid_file: Path,
            stop_file: Path, on_line: Callable[[str], None], poll: Callable[[], None] | None = None,
            interval: float = 1.0) -> int:
    """Submit the job, follow it to its end while streaming its log, return its exit code; raise what
    its end state means for a retry. Any exception on the way (a cancelled flow, a failed commit)
    cancels the job first."""
    if launch.partition is not None:
        known = partitions()
        if launch.partition not in known:
            raise SlurmJobRefused(f"launcher.partition: {launch.partition!r} is not a partition of this cluster "
                                  f"(sinfo: {', '.join(known)})")
    log_file = run_dir / "slurm.log"
    script = run_dir / "train.sbatch"
    script.write_text(render(launch, config_yaml=config_yaml, log_file=log_file, job_name=job_name,
                             stop_file=stop_file))
    try:
        out = run_tool("sbatch", "--parsable", str(script))
    except SlurmError as e:  # sbatch's own refusals (no such partition, account, QoS, too many nodes)
        raise SlurmJobRefused(f"sbatch refused {script}: {e}") from None
    job_id = out.strip().split(";")[0]
    pid_file.parent.mkdir(parents=True, exist_ok=True)
    pid_file.write_text(f"{JOB_FILE_PREFIX}{job_id}")
    log.info("submitted Slurm job %s (%d node(s) x %d process(es)); its log: %s", job_id, launch.nodes,
             launch.procs_per_node, log_file)
    follow = LogFollower(log_file, on_line)
    done = False
    said = None
    try:
        while True:
            state = job_state(job_id)
            if state != said:  # each change once in the run's log: PENDING (BeginTime), RUNNING, ...
                log.info("Slurm job %s: %s", job_id, state.describe() if state else "no longer known")
                said = state
            follow()
            if poll is not None:
                poll()
            if state is None or state.finished:
                break
            if state.state == "PENDING" and state.reason in ("PartitionDown", "InvalidAccount", "InvalidQOS",
                                                            "PartitionNodeLimit", "BadConstraints"):
                raise SlurmJobRefused(f"Slurm job {job_id} cannot start: {state.reason}")
            time.sleep(interval)
        follow()
        done = True
    finally:
        if not done:
            cancel(job_id)
        pid_file.unlink(missing_ok=True)
    if state is None:
        raise SlurmError(f"Slurm job {job_id} is no longer known to the controller; its end state is lost")
    if state.state == "FAILED":  # the ranks' exit codes (in the log) say what kind of failure
        return state.exit_code or 1
    error = end_state_error(job_id, state)
    if error is not None:
        raise error
    return 0


def cancel(job_id: str, wait_s: float = 30.0) -> None:
    """`scancel` the job and wait until squeue no longer lists it running."""
    subprocess.run([tool("scancel"), job_id], capture_output=True, timeout=60)
    deadline = time.monotonic() + wait_s
    while time.monotonic() < deadline:
        listed = subprocess.run([tool("squeue"), "-h", "-j", job_id, "-o", "%T"], capture_output=True, text=True,
                                timeout=60).stdout.strip()
        if not listed or listed in FINISHED:
            return
        time.sleep(0.5)
    log.warning("Slurm job %s still listed %s s after scancel", job_id, wait_s)
