"""Progress over a corpus in the project's one convention, `progress(done, total, note)`: bytes of input
read out of the input's size, the note counting documents, tokens and tokens/s so far.

Tokenising reports increments (a batch, or a unit a worker finished); `CorpusProgress` adds them up
where they arrive, from any thread.
"""
from __future__ import annotations

import threading
import time
from collections.abc import Callable

ProgressFn = Callable[[int, int, str], None]  # (input bytes done, input bytes in all, what that means so far)


class CorpusProgress:
    def __init__(self, total_bytes: int, progress: ProgressFn | None):
        self.total, self.progress = max(total_bytes, 1), progress
        self.documents = self.tokens = self.done = 0
        self.started = time.monotonic()
        self._lock = threading.Lock()

    def note(self) -> str:
        rate = self.tokens / max(time.monotonic() - self.started, 1e-9)
        return f"{self.documents:,} documents, {self.tokens:,} tokens, {rate:,.0f} tokens/s"

    def __call__(self, documents: int, tokens: int, nbytes: int) -> None:
        """Another `documents` read, `tokens` made, `nbytes` of input consumed."""
        with self._lock:
            self.documents += documents
            self.tokens += tokens
            self.done = min(self.done + nbytes, self.total)
            done, note = self.done, self.note()
        if self.progress is not None:
            self.progress(done, self.total, note)

    def finish(self) -> None:
        if self.progress is not None:
            self.progress(self.total, self.total, self.note())
