"""Where a training run's processes run: this host or a Slurm allocation.

Every launcher starts the same thing, torch.distributed elastic agents (torchrun, c10d
rendezvous) running `python -m gptoss_model.train`, one agent per node; what differs is who
places the agents. A launch config is a plain dataclass (a train stage parameter, validated
by pydantic there through `kind`), and `launch_problems` refuses one before anything is
submitted, naming the field: the layout constraints of the run at that world size come from
pre-flight, the launcher's own fields from here.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Literal

ENV_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
SLURM_TIME = re.compile(r"^(\d+-)?\d{1,2}(:\d{2}){0,2}$|^\d+$")


@dataclass
class LocalLaunch:
    """Agents on this host: one (a single node), or several (`nodes` > 1: a multi-node run's
    rendezvous and restarts, exercised on one machine)."""

    kind: Literal["local"] = "local"
    nodes: int = 1
    procs_per_node: int = 1
    max_restarts: int = 0  # torchrun's elastic restarts of a failed node's workers (resume from the newest checkpoint)
    env: list[str] = field(default_factory=list)  # environment variables passed through by name


@dataclass
class SlurmLaunch:
    """One `srun` of torchrun per node of an sbatch allocation (infra/slurm/train.sbatch)."""

    kind: Literal["slurm"] = "slurm"
    nodes: int = 1
    procs_per_node: int = 1
    gpus_per_node: int = 0
    partition: str | None = None
    account: str | None = None
    qos: str | None = None
    time_limit: str = "04:00:00"  # sbatch --time: minutes, MM:SS, HH:MM:SS or D-HH[:MM[:SS]]
    requeue: bool = True  # a preempted or node-failed job starts again and resumes from the newest checkpoint
    max_restarts: int = 0
    env: list[str] = field(default_factory=list)
    rdzv_port: int = 29500


Launch = LocalLaunch | SlurmLaunch
LAUNCHERS = {"local": LocalLaunch, "slurm": SlurmLaunch}


def launch_problems(launch: Launch, *, partitions: list[str] | None = None) -> list[str]:
    """What is wrong with the launch config, each naming its field (`launcher.<field>: rule`).

    `partitions`: the cluster's partitions where it can say (`sinfo`), to refuse an unknown one."""
    problems: list[str] = []

    def need(ok: bool, name: str, rule: str) -> None:
        if not ok:
            problems.append(f"launcher.{name}: {rule}")

    if type(launch) not in LAUNCHERS.values():
        return [f"launcher.kind: {getattr(launch, 'kind', launch)!r} is not a launcher; choose one of "
                f"{', '.join(LAUNCHERS)}"]
    need(launch.nodes >= 1, "nodes", f"{launch.nodes}: at least 1")
    need(launch.procs_per_node >= 1, "procs_per_node", f"{launch.procs_per_node}: at least 1")
    need(launch.max_restarts >= 0, "max_restarts", f"{launch.max_restarts}: 0 or more")
    for name in launch.env:
        if "=" in name:  # a value would be written into the batch script (and the run's parameters)
            need(False, "env", f"{name.split('=')[0]!r} given with a value: list names only; the job takes each "
                 "value from the submitting environment (secrets stay out of scripts and parameters)")
        else:
            need(bool(ENV_NAME.match(name)), "env", f"{name!r} is not an environment variable name")
    if isinstance(launch, SlurmLaunch):
        need(launch.gpus_per_node >= 0, "gpus_per_node", f"{launch.gpus_per_node}: 0 or more")
        need(launch.gpus_per_node in (0, launch.procs_per_node), "gpus_per_node",
             f"{launch.gpus_per_node} GPUs for {launch.procs_per_node} processes per node: one process per GPU")
        need(1024 <= launch.rdzv_port <= 65535, "rdzv_port", f"{launch.rdzv_port}: a port in 1024-65535")
        need(bool(SLURM_TIME.match(launch.time_limit)), "time_limit",
             f"{launch.time_limit!r}: minutes, MM:SS, HH:MM:SS or D-HH[:MM[:SS]]")
        if partitions is not None and launch.partition is not None:
            need(launch.partition in partitions, "partition",
                 f"{launch.partition!r} is not a partition of this cluster (sinfo: {', '.join(partitions)})")
        for name in ("partition", "account", "qos"):
            value = getattr(launch, name)
            need(value is None or bool(re.match(r"^[\w.-]+$", value)), name, f"{value!r}: letters, digits, . _ -")
    return problems


def world_size(launch: Launch) -> int:
    return launch.nodes * launch.procs_per_node
