"""A Prefect server that lives exactly as long as one local command (the demo).

Prefect's own ephemeral server is started by the flow's process and outlives it
when that process is killed (kill -9 skips atexit), and its 20 s start-up limit
fails runs on a loaded machine. This one is `prefect server start` in a child
the kernel stops when its parent dies (Linux PR_SET_PDEATHSIG, so kill -9
included), with a start-up limit of PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS
(default here: 120 s). It serves the UI too, so a demo run can be watched.
"""
from __future__ import annotations

import contextlib
import ctypes
import os
import signal
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

from gptoss_model.system.processes import free_port
from gptoss_model.settings import settings

_PR_SET_PDEATHSIG = 1


def _stop_with_parent() -> None:
    """Runs in the child between fork and exec: SIGTERM it when the parent dies."""
    try:
        ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0)
    except (OSError, AttributeError):  # not Linux: the `finally` below still stops it on a normal exit
        pass



def _healthy(api_url: str) -> bool:
    try:
        with urllib.request.urlopen(f"{api_url}/health", timeout=2) as response:
            return response.status == 200
    except OSError:
        return False


def _flush_prefect_clients(timeout: float = 30.0) -> None:
    """Send the logs and events Prefect still buffers while the server is up: at exit,
    with the server gone, its workers would retry against a dead address for minutes."""
    if "prefect" not in sys.modules:
        return
    from prefect.events.worker import EventsWorker
    from prefect.logging.handlers import APILogWorker

    for worker in (APILogWorker, EventsWorker):
        worker.drain_all(timeout=timeout)


@contextlib.contextmanager
def local_prefect_server(log_path: Path) -> Iterator[str]:
    """Start a server on 127.0.0.1 and point PREFECT_API_URL at it; yields the API URL.
    With PREFECT_API_URL already set (a server of the user's), that one is used as is."""
    env = settings()
    if env.prefect_api_url:
        yield env.prefect_api_url
        return
    timeout = env.prefect_startup_timeout
    port = free_port()
    api_url = f"http://127.0.0.1:{port}/api"
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with open(log_path, "ab") as log:
        # Its own session: Ctrl-C reaches the command, which then stops the server in order.
        server = subprocess.Popen([sys.executable, "-m", "prefect", "server", "start", "--host", "127.0.0.1",
                                   "--port", str(port)], stdout=log, stderr=subprocess.STDOUT,
                                  start_new_session=True, preexec_fn=_stop_with_parent)
    try:
        deadline = time.monotonic() + timeout
        while not _healthy(api_url):
            if server.poll() is not None:
                raise RuntimeError(f"the local Prefect server exited with status {server.returncode}; "
                                   f"see {log_path}")
            if time.monotonic() > deadline:
                raise TimeoutError(f"the local Prefect server did not answer within {timeout:.0f} s "
                                   f"(PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS); see {log_path}")
            time.sleep(0.3)
        os.environ["PREFECT_API_URL"] = api_url
        try:
            yield api_url
        finally:
            _flush_prefect_clients()
            os.environ.pop("PREFECT_API_URL", None)
    finally:
        server.terminate()
        try:
            server.wait(timeout=15)
        except subprocess.TimeoutExpired:
            server.kill()
            server.wait()
