"""Where a training run's processes run: this host, a Slurm allocation, or Kubernetes pods.

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
DNS_LABEL = re.compile(r"^[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?$")  # RFC 1123: namespaces, object names
DNS_SUBDOMAIN = re.compile(r"^[a-z0-9]([-a-z0-9.]{0,251}[a-z0-9])?$")  # Secrets, ConfigMaps, PVCs, accounts
LABEL_KEY = re.compile(r"^([a-z0-9]([-a-z0-9.]{0,251}[a-z0-9])?/)?[A-Za-z0-9]([-A-Za-z0-9_.]{0,61}[A-Za-z0-9])?$")
LABEL_VALUE = re.compile(r"^([A-Za-z0-9]([-A-Za-z0-9_.]{0,61}[A-Za-z0-9])?)?$")
TOLERATION_KEYS = {"key", "operator", "value", "effect", "tolerationSeconds"}


# What every torchrun agent's environment holds, whichever launcher starts it (the Slurm batch
# script exports it, the Kubernetes pods get it as fixed variables):
#  * lines prefixed by *global* rank: torchrun's own prefix is the local rank, and with several
#    nodes each has a `[default0]`;
#  * a fresh c10d store per rendezvous round, hosted by that round's rank 0: on the store the agents
#    share (torch's default) every round's workers use the same keys, so workers restarted in place
#    (`--max-restarts`) read the previous round's gloo addresses before they are overwritten and
#    fail to connect (measured: "Gloo connectFullMesh failed ... Connection refused").
TORCHRUN_ENV = {"TORCHELASTIC_LOG_LINE_PREFIX_TEMPLATE": "[${role_name}${rank}]:",
                "TORCH_DISABLE_SHARE_RDZV_TCP_STORE": "1"}


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
    save_signal_seconds: int = 300  # this long before the time limit the ranks save and the job requeues itself
    max_restarts: int = 0
    env: list[str] = field(default_factory=list)
    rdzv_port: int = 29500


@dataclass
class KubernetesLaunch:
    """One pod per node: an Indexed Job and a headless Service for the rendezvous
    (infra/kubernetes/README.md).

    Secrets never appear in the manifest or the run's parameters: `env` names variables each pod
    takes from the Secret `env_from_secret` (a missing key stops the pod before it starts, rather
    than a run going without its token), and `env_from_secret` / `env_from_config_map` hand every
    key of that Secret / ConfigMap to the pods (`envFrom`)."""

    kind: Literal["kubernetes"] = "kubernetes"
    nodes: int = 1
    procs_per_node: int = 1
    gpus_per_node: int = 0
    namespace: str = "default"
    image: str = ""  # holds this project at the submitting code's version (it runs `-m gptoss_model.train`)
    service_account: str | None = None
    # A ReadWriteMany PVC mounted at the run directory's root (the workdir) at the same path as on the
    # submitting host, so every pod sees the one torch_dist checkpoint directory and the config's paths.
    checkpoint_volume_claim: str | None = None
    node_selector: dict[str, str] = field(default_factory=dict)
    tolerations: list[dict] = field(default_factory=list)
    env: list[str] = field(default_factory=list)
    env_from_secret: str | None = None
    env_from_config_map: str | None = None
    max_restarts: int = 0
    rdzv_port: int = 29500
    # How long an agent waits for the rendezvous store on pod 0: pods start minutes apart (image pulls).
    rdzv_timeout_s: int = 900


Launch = LocalLaunch | SlurmLaunch | KubernetesLaunch
LAUNCHERS = {"local": LocalLaunch, "slurm": SlurmLaunch, "kubernetes": KubernetesLaunch}


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
                 "value from the submitting environment, or on Kubernetes from the Secret env_from_secret "
                 "(secrets stay out of scripts, manifests and parameters)")
        else:
            need(bool(ENV_NAME.match(name)), "env", f"{name!r} is not an environment variable name")
    if isinstance(launch, (SlurmLaunch, KubernetesLaunch)):
        need(launch.gpus_per_node >= 0, "gpus_per_node", f"{launch.gpus_per_node}: 0 or more")
        need(launch.gpus_per_node in (0, launch.procs_per_node), "gpus_per_node",
             f"{launch.gpus_per_node} GPUs for {launch.procs_per_node} processes per node: one process per GPU")
        need(1024 <= launch.rdzv_port <= 65535, "rdzv_port", f"{launch.rdzv_port}: a port in 1024-65535")
    if isinstance(launch, KubernetesLaunch):
        problems += kubernetes_problems(launch)
    if isinstance(launch, SlurmLaunch):
        need(launch.save_signal_seconds >= 0, "save_signal_seconds", f"{launch.save_signal_seconds}: 0 or more")
        need(bool(SLURM_TIME.match(launch.time_limit)), "time_limit",
             f"{launch.time_limit!r}: minutes, MM:SS, HH:MM:SS or D-HH[:MM[:SS]]")
        if partitions is not None and launch.partition is not None:
            need(launch.partition in partitions, "partition",
                 f"{launch.partition!r} is not a partition of this cluster (sinfo: {', '.join(partitions)})")
        for name in ("partition", "account", "qos"):
            value = getattr(launch, name)
            need(value is None or bool(re.match(r"^[\w.-]+$", value)), name, f"{value!r}: letters, digits, . _ -")
    return problems


def kubernetes_problems(launch: KubernetesLaunch) -> list[str]:
    """The Kubernetes launcher's own fields: what the API server would refuse (names, labels,
    tolerations), found before anything is created."""
    problems: list[str] = []

    def need(ok: bool, name: str, rule: str) -> None:
        if not ok:
            problems.append(f"launcher.{name}: {rule}")

    need(bool(launch.image) and not any(c.isspace() for c in launch.image), "image",
         f"{launch.image!r}: a container image holding this project (e.g. ghcr.io/org/gptoss-pipeline:TAG)")
    need(bool(DNS_LABEL.match(launch.namespace)), "namespace",
         f"{launch.namespace!r}: a DNS label (lowercase letters, digits and -, at most 63)")
    need(launch.checkpoint_volume_claim is not None, "checkpoint_volume_claim",
         "a ReadWriteMany PersistentVolumeClaim holding the workdir: the pods write the checkpoints there and "
         "this host commits them from it")
    for name in ("service_account", "checkpoint_volume_claim", "env_from_secret", "env_from_config_map"):
        value = getattr(launch, name)
        need(value is None or bool(DNS_SUBDOMAIN.match(value)), name,
             f"{value!r}: a Kubernetes object name (lowercase letters, digits, - and .)")
    need(not launch.env or launch.env_from_secret is not None, "env",
         f"{launch.env}: each name is taken from the Secret env_from_secret; name that Secret")
    need(10 <= launch.rdzv_timeout_s <= 86400, "rdzv_timeout_s", f"{launch.rdzv_timeout_s}: 10 to 86400 seconds")
    for key, value in launch.node_selector.items():
        need(bool(LABEL_KEY.match(str(key))) and isinstance(value, str) and bool(LABEL_VALUE.match(value)),
             "node_selector", f"{key!r}: {value!r} is not a label key and value")
    for i, toleration in enumerate(launch.tolerations):
        unknown = sorted(set(toleration) - TOLERATION_KEYS) if isinstance(toleration, dict) else ["(not a mapping)"]
        need(not unknown, f"tolerations[{i}]", f"unknown keys {unknown}: use {sorted(TOLERATION_KEYS)}")
        if not unknown:
            need(toleration.get("operator", "Equal") in ("Equal", "Exists"), f"tolerations[{i}].operator",
                 f"{toleration.get('operator')!r}: Equal or Exists")
            need(toleration.get("effect") in (None, "NoSchedule", "PreferNoSchedule", "NoExecute"),
                 f"tolerations[{i}].effect", f"{toleration.get('effect')!r}: NoSchedule, PreferNoSchedule or NoExecute")
    return problems


def world_size(launch: Launch) -> int:
    return launch.nodes * launch.procs_per_node
