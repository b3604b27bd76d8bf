"""Progress reporting for long transfers, shared by the CLI and flows."""
from __future__ import annotations

import threading
import time


class ProgressSink:
    """Receives byte counts from many transfer threads. Subclasses render them."""

    def __init__(self, min_interval: float = 0.0):
        self._lock = threading.Lock()
        self.total = 0
        self.done = 0
        self.description = ""
        self.note = ""  # what the counts mean so far (e.g. documents and tokens/s); shown beside the description
        self._min_interval = min_interval
        self._last_render = 0.0

    def start(self, total: int, description: str) -> None:
        with self._lock:
            self.total, self.done, self.description, self.note = total, 0, description, ""
        self.render(force=True)

    def advance(self, n: int) -> None:
        with self._lock:
            self.done += n
            now = time.monotonic()
            due = now - self._last_render >= self._min_interval
            if due:
                self._last_render = now
        if due:
            self.render(force=False)

    def set(self, done: int, total: int, description: str, note: str = "") -> None:
        """Absolute counts (a stage's own progress, between the transfers that use start/advance)."""
        with self._lock:
            first = description != self.description
            self.total, self.done, self.description, self.note = total, done, description, note
            now = time.monotonic()
            due = first or now - self._last_render >= self._min_interval
            if due:
                self._last_render = now
        if due:
            self.render(force=first)

    def finish(self) -> None:
        self.render(force=True)

    @property
    def text(self) -> str:
        return f"{self.description}: {self.note}" if self.note else self.description

    @property
    def fraction(self) -> float:
        return 1.0 if self.total == 0 else min(1.0, self.done / self.total)

    def render(self, force: bool) -> None:  # noqa: ARG002 - the null sink shows nothing
        pass


class RichProgress(ProgressSink):
    """Progress bars on the terminal (the `gptoss` CLI): one for the stage's own work (absolute counts,
    its text updated as they come) and one per transfer, shown from the first count to `finish()`/`close()`."""

    def __init__(self):
        super().__init__(min_interval=0.1)
        from rich.progress import (BarColumn, DownloadColumn, Progress, TextColumn,
                                   TimeRemainingColumn, TransferSpeedColumn)

        self._bar = Progress(TextColumn("{task.description}"), BarColumn(), DownloadColumn(),
                             TransferSpeedColumn(), TimeRemainingColumn(), transient=False)
        self._tasks: dict[str, int] = {}
        self._current = ""  # which bar the counts belong to: "" (the stage's own) or a transfer's description
        self._shown = False
        self._render_lock = threading.Lock()  # threads reporting at once add one bar, not two

    def start(self, total: int, description: str) -> None:
        self._current = description
        super().start(total, description)

    def set(self, done: int, total: int, description: str, note: str = "") -> None:
        self._current = ""
        super().set(done, total, description, note)

    def render(self, force: bool) -> None:
        with self._render_lock:
            if not self._shown:
                self._bar.start()
                self._shown = True
            task = self._tasks.get(self._current)
            if task is None:
                task = self._tasks[self._current] = self._bar.add_task(self.text, total=self.total)
            self._bar.update(task, completed=self.done, total=self.total, description=self.text)

    def finish(self) -> None:
        super().finish()
        self.close()

    def close(self) -> None:
        with self._render_lock:
            if self._shown:
                self._bar.stop()
                self._shown = False
