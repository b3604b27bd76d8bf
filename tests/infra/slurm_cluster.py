"""A throwaway Slurm cluster on this host: munged, slurmctld and two slurmd ("nodes" n1, n2), all
under one directory, for the tests that submit real jobs. Debian's slurm-wlm and munge are
installed first where missing (apt-get; a machine that cannot gets a skip with the reason).

Facts this relies on (../shared/notes/slurm-and-kubernetes-here.md): Debian's build allows two
slurmd on one host; munged's socket directory must be owned by munge and traversable by all;
clients find the cluster through SLURM_CONF.
"""
from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

PACKAGES = ("slurm-wlm", "munge")
DAEMONS = ("slurmctld", "slurmd", "munged", "sbatch")


def ensure_installed() -> str | None:
    """None when Slurm and munge are here (installing them if needed), else why they cannot be."""
    if all(shutil.which(d) or Path(f"/usr/sbin/{d}").exists() for d in DAEMONS):
        return None
    if os.geteuid() != 0 or not shutil.which("apt-get"):
        return "Slurm is not installed and this user cannot apt-get install slurm-wlm munge"
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    for cmd in (["apt-get", "update", "-qq"], ["apt-get", "install", "-y", "-qq", *PACKAGES]):
        out = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)
        if out.returncode != 0:
            return f"`{' '.join(cmd)}` failed: {(out.stderr or out.stdout).strip().splitlines()[-1:]}"
    return None


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class SlurmCluster:
    root: Path
    conf: Path
    nodes: tuple[str, ...] = ("n1", "n2")
    daemons: list[subprocess.Popen] = field(default_factory=list)

    @property
    def env(self) -> dict[str, str]:
        return {"SLURM_CONF": str(self.conf)}

    def run(self, *args: str) -> str:
        return subprocess.run(list(args), capture_output=True, text=True, timeout=60,
                              env={**os.environ, **self.env}).stdout

    def queue(self) -> list[str]:
        return [line for line in self.run("squeue", "-h", "-o", "%i %T").splitlines() if line.strip()]

    def stop(self) -> None:
        for proc in reversed(self.daemons):
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGTERM)
        deadline = time.monotonic() + 10
        for proc in self.daemons:
            try:
                proc.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
        shutil.rmtree(self.root, ignore_errors=True)


def start_cluster(cpus_per_node: int = 2) -> SlurmCluster:
    # A mkdtemp dir is 0700: munged refuses a socket below a directory others cannot traverse.
    root = Path(tempfile.mkdtemp(prefix="gptoss-slurm-", dir="/tmp"))
    root.chmod(0o755)
    munge_dir = root / "munge"
    munge_dir.mkdir(mode=0o755)
    shutil.chown(munge_dir, "munge", "munge")
    socket_path = munge_dir / "munge.socket"
    for sub in ("state", "spool", "log"):
        (root / sub).mkdir()
    ctl_port, node_ports = _free_port(), [_free_port() for _ in range(2)]
    conf = root / "slurm.conf"
    node_lines = "\n".join(f"NodeName=n{i + 1} NodeHostName=localhost NodeAddr=127.0.0.1 Port={port} "
                           f"CPUs={cpus_per_node} RealMemory=10000" for i, port in enumerate(node_ports))
    conf.write_text(f"""ClusterName=gptoss-test
SlurmctldHost=localhost
SlurmctldPort={ctl_port}
SlurmdPort={node_ports[0]}
SlurmUser=root
AuthType=auth/munge
AuthInfo=socket={socket_path}
CredType=cred/munge
MpiDefault=none
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
SchedulerType=sched/builtin
AccountingStorageType=accounting_storage/none
JobAcctGatherType=jobacct_gather/none
JobCompType=jobcomp/none
ReturnToService=2
MailProg=/bin/true
MinJobAge=600
KillWait=5
StateSaveLocation={root}/state
SlurmdSpoolDir={root}/spool/%n
SlurmctldPidFile={root}/slurmctld.pid
SlurmdPidFile={root}/slurmd-%n.pid
SlurmctldLogFile={root}/log/slurmctld.log
SlurmdLogFile={root}/log/slurmd-%n.log
{node_lines}
PartitionName=debug Nodes=n1,n2 Default=YES State=UP MaxTime=INFINITE
""")
    cluster = SlurmCluster(root=root, conf=conf)

    def daemon(*cmd: str) -> None:
        cluster.daemons.append(subprocess.Popen(list(cmd), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                                start_new_session=True, env={**os.environ, **cluster.env}))

    daemon("runuser", "-u", "munge", "--", "/usr/sbin/munged", "--foreground", f"--socket={socket_path}",
           f"--pid-file={munge_dir}/munged.pid", f"--log-file={munge_dir}/munged.log",
           f"--seed-file={munge_dir}/munged.seed")
    deadline = time.monotonic() + 20
    while not socket_path.exists():
        if time.monotonic() > deadline:
            cluster.stop()
            raise RuntimeError(f"munged did not start (see {munge_dir}/munged.log)")
        time.sleep(0.1)
    daemon("/usr/sbin/slurmctld", "-D", "-f", str(conf))
    for node in cluster.nodes:
        daemon("/usr/sbin/slurmd", "-D", "-N", node, "-f", str(conf))
    deadline = time.monotonic() + 60
    while True:
        states = cluster.run("sinfo", "-h", "-N", "-o", "%N %t").split()
        if states.count("idle") == len(cluster.nodes):
            return cluster
        if time.monotonic() > deadline:
            logs = "\n".join(p.read_text()[-2000:] for p in (root / "log").glob("*.log"))
            cluster.stop()
            raise RuntimeError(f"the Slurm nodes never came up idle (sinfo: {states}):\n{logs}")
        time.sleep(0.3)
