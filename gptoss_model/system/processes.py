"""Child processes that die with their parent, whatever kills the parent (Linux).

The kernel sends PR_SET_PDEATHSIG's signal to a process when the thread that created it
exits, SIGKILL of the parent included, where no cleanup code of the parent can run.
Every process this project starts asks for it: spawned worker pools (conversion,
preprocess), torchrun (through `python -m gptoss_model.system.processes PARENT_PID cmd ...`,
since the setting survives exec) and each training rank. A forked child does not
inherit it, hence the training ranks' process-group guard (training.launch).

    python -m gptoss_model.system.processes 4242 torchrun --nproc-per-node 2 ...
"""

from __future__ import annotations

import os
import signal
import socket
import sys

PR_SET_PDEATHSIG = 1


def die_with_parent(parent_pid: int | None = None, sig: int = signal.SIGKILL) -> None:
    """Have the kernel send `sig` to this process when its parent exits. `parent_pid`: the parent
    it must still have (exit at once if it is already gone); by default the current one."""
    if not sys.platform.startswith("linux"):
        return
    import ctypes

    expected = os.getppid() if parent_pid is None else parent_pid
    ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, sig)
    if os.getppid() != expected:  # it died before the request took effect
        os._exit(1)


def main(argv: list[str]) -> None:
    parent, *command = argv
    die_with_parent(int(parent))
    os.execvp(command[0], command)


if __name__ == "__main__":
    main(sys.argv[1:])


def free_port() -> int:
    """A TCP port on 127.0.0.1 nothing listens on now: for a child (a rendezvous, a server) to take."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
