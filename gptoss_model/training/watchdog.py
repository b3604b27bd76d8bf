"""A hung rank ends the run in `train.hang_timeout` seconds instead of the collective timeout.

A rank that stops (SIGSTOP, a frozen node, a wedged GPU) leaves every other rank
blocked in its next collective until the process-group timeout (30 minutes by
default), saying nothing. Each rank therefore runs a `Watchdog` thread that, every
few seconds, publishes a heartbeat with its iteration and phase to the job's
rendezvous store (torchrun's TCPStore, reachable from every node) and reads every
other rank's. Two things end the run:

- a rank whose heartbeat stops for `hang_timeout` (the process itself is frozen);
- no rank changing its iteration or phase for `hang_timeout` while all heartbeats
  go on (a rank stuck inside a kernel or collective).

The lowest-numbered rank that sees it prints one line naming the rank(s), their host
and last iteration; every rank that sees it exits with `EXIT_HANG`, and a frozen
rank on the same host is SIGKILLed so the launcher need not wait for it. torchrun
then fails the job, and the launcher's restart or the flow's retry resumes from
the newest checkpoint.
"""

from __future__ import annotations

import os
import signal
import socket
import sys
import threading
import time
from dataclasses import dataclass

from gptoss_model.training.exit_codes import EXIT_HANG
_runs = 0  # runs started in this process (tests run several): keeps their keys apart


@dataclass
class _Seen:
    beat: str
    progress: str
    beat_at: float
    progress_at: float


class Watchdog:
    """`with Watchdog(timeout_s) as dog:` around the training loop; `dog.phase(it, what)` as it goes.
    A timeout of 0 (train.hang_timeout=0) watches nothing."""

    def __init__(self, timeout_s: float, *, period_s: float | None = None):
        import torch.distributed as dist

        global _runs
        _runs += 1
        self.timeout_s = float(timeout_s)
        self.period_s = period_s or max(0.2, min(5.0, self.timeout_s / 10 or 5.0))
        self.rank, self.world = dist.get_rank(), dist.get_world_size()
        self._store = dist.PrefixStore(f"gptoss-watchdog/{_runs}/", _store())
        self._state = (0, "start")
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="gptoss-watchdog", daemon=True)
        self._beats = 0

    # ------------------------------------------------------------ main thread
    def phase(self, iteration: int, what: str) -> None:
        self._state = (iteration, what)

    def __enter__(self) -> "Watchdog":
        import torch.distributed as dist

        if self.timeout_s <= 0:
            return self
        self._store.set(f"host/{self.rank}", f"{socket.gethostname()} {os.getpid()}")
        self._publish()
        dist.barrier()  # every rank's keys exist before anyone reads them
        self._hosts = [self._store.get(f"host/{r}").decode().split() for r in range(self.world)]
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout=self.period_s * 4)

    # ------------------------------------------------------------ the thread
    def _publish(self) -> None:
        self._beats += 1
        iteration, what = self._state
        self._store.set(f"beat/{self.rank}", f"{self._beats} {iteration} {what}")

    def _loop(self) -> None:
        keys = [f"beat/{r}" for r in range(self.world)]
        seen: dict[int, _Seen] = {}
        while not self._stop.wait(self.period_s):
            try:
                self._publish()
                values = [v.decode() for v in self._store.multi_get(keys)]
            except Exception:  # noqa: BLE001 - the store went away: the job is ending anyway
                return
            now = time.monotonic()
            for r, value in enumerate(values):
                beat, _, progress = value.partition(" ")
                old = seen.get(r)
                if old is None:
                    seen[r] = _Seen(beat, progress, now, now)
                    continue
                if beat != old.beat:
                    old.beat, old.beat_at = beat, now
                if progress != old.progress:
                    old.progress, old.progress_at = progress, now
            verdict = self._verdict(seen, now)
            if verdict and not self._stop.is_set():
                self._end(*verdict)

    def _verdict(self, seen: dict[int, _Seen], now: float) -> tuple[list[int], bool, str] | None:
        frozen = [r for r, s in seen.items() if now - s.beat_at > self.timeout_s]
        if frozen:
            return frozen, True, (f"sent no heartbeat for {self.timeout_s:.0f} s (the process is stopped or its "
                            "node is unreachable)")
        if seen and all(now - s.progress_at > self.timeout_s for s in seen.values()):
            lowest = min(int(s.progress.split()[0]) for s in seen.values())
            stuck = sorted(r for r, s in seen.items() if int(s.progress.split()[0]) == lowest)
            return stuck, False, (f"no rank made progress for {self.timeout_s:.0f} s (the others wait for them in a "
                           "collective)")
        return None

    def _end(self, ranks: list[int], frozen: bool, why: str) -> None:
        where = "; ".join(f"rank {r} on {self._hosts[r][0]} (last seen at {self._describe(r)})" for r in ranks)
        others = set(range(self.world)) - set(ranks)
        if self.rank == (min(others) if others else 0):
            print(f"error: training hung: {where} {why}; train.hang_timeout={self.timeout_s:.0f} s. "
                  f"Ending the run so it can resume from its last checkpoint.", file=sys.stderr, flush=True)
        host = socket.gethostname()
        for r in ranks if frozen else ():
            if r != self.rank and self._hosts[r][0] == host:
                try:
                    os.kill(int(self._hosts[r][1]), signal.SIGKILL)
                except (ProcessLookupError, PermissionError):
                    pass
        os._exit(EXIT_HANG)

    def _describe(self, rank: int) -> str:
        try:
            _, iteration, what = self._store.get(f"beat/{rank}").decode().split(" ", 2)
        except Exception:  # noqa: BLE001
            return "an unknown point"
        return f"iteration {iteration}, {what}"


def _store():
    """The job's key-value store: torchrun's rendezvous store, or a private one for a world of one."""
    import torch.distributed as dist
    from torch.distributed import distributed_c10d

    if dist.get_world_size() == 1:
        return dist.HashStore()
    return distributed_c10d._get_default_store()
