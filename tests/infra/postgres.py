"""A throwaway PostgreSQL cluster from the installed binaries, for a Prefect server to run on.

    with throwaway_postgres() as url:      # postgresql+asyncpg://postgres@127.0.0.1:PORT/prefect
        ...

initdb into a fresh directory (trust authentication, bound to 127.0.0.1 on a free port, its
socket in the same directory), pg_ctl start, createdb; stopped and removed on exit. PostgreSQL
refuses to run as root, so as root the cluster belongs to the `postgres` user and the
commands run through `runuser`. `postgres_binaries()` is None where PostgreSQL is not installed.
"""
from __future__ import annotations

import contextlib
import glob
import os
import pwd
import shutil
import socket
import subprocess
import tempfile
from pathlib import Path
from typing import Iterator


def postgres_binaries() -> Path | None:
    found = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"), key=lambda p: int(p.split("/")[4]))
    if found:
        return Path(found[-1]).parent
    initdb = shutil.which("initdb")
    return Path(initdb).parent if initdb else None


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def throwaway_postgres(database: str = "prefect") -> Iterator[str]:
    bin_dir = postgres_binaries()
    if bin_dir is None:
        raise FileNotFoundError("no PostgreSQL binaries (initdb) on this machine")
    as_user: list[str] = []
    root = Path(tempfile.mkdtemp(prefix="gptoss-pg-"))
    if os.geteuid() == 0:
        owner = pwd.getpwnam("postgres")
        os.chown(root, owner.pw_uid, owner.pw_gid)
        as_user = ["runuser", "-u", "postgres", "--"]
    data, port = root / "data", _free_port()

    def run(*argv: str) -> None:
        done = subprocess.run([*as_user, str(bin_dir / argv[0]), *argv[1:]], capture_output=True, text=True,
                              timeout=120)
        if done.returncode != 0:
            raise RuntimeError(f"{' '.join(argv)} failed ({done.returncode}): {done.stdout[-2000:]}"
                               f"{done.stderr[-2000:]}")

    started = False
    try:
        run("initdb", "-D", str(data), "-U", "postgres", "--auth=trust", "--no-sync", "-E", "UTF8")
        run("pg_ctl", "-D", str(data), "-l", str(root / "server.log"), "-w", "-t", "60", "-o",
            f"-p {port} -k {root} -c listen_addresses=127.0.0.1 -c fsync=off", "start")
        started = True
        run("createdb", "-h", "127.0.0.1", "-p", str(port), "-U", "postgres", database)
        yield f"postgresql+asyncpg://postgres@127.0.0.1:{port}/{database}"
    finally:
        if started:
            run("pg_ctl", "-D", str(data), "-m", "immediate", "-w", "stop")
        shutil.rmtree(root, ignore_errors=True)
