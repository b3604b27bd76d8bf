"""A `gptoss_model.data.workspace.Workspace` under a prefix of the artifact store, so that
workers on many machines (preprocess on Dask) read and write the same parts and shards."""
from __future__ import annotations

import contextlib
import functools
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Protocol

from gptoss_model.data.workspace import READ_BLOCK

from .base import Backend
from .store import ArtifactStore


class StoreOpener(Protocol):
    """Picklable settings naming a store (tasks.common.StoreSettings)."""

    url: str

    def open(self) -> ArtifactStore: ...

    def model_dump_json(self) -> str: ...


def open_store(settings: StoreOpener) -> ArtifactStore:
    """The store `settings` name, opened once per process (and per distinct settings)."""
    # Keyed by the JSON: the settings model is not hashable.
    return _opened(type(settings), settings.model_dump_json())


@functools.lru_cache(maxsize=8)
def _opened(settings_type, settings_json: str) -> ArtifactStore:
    return settings_type.model_validate_json(settings_json).open()


class StoreWorkspace:
    """A workspace under a prefix of the artifact store, shared by every Dask worker.

    Pickles as its settings and prefix (no client, no secret); each process opens the
    store once, with credentials from the settings' Secret block or boto3's chain."""

    def __init__(self, store: StoreOpener, prefix: str):
        self.store, self.prefix = store, prefix.strip("/")

    def __repr__(self) -> str:
        return f"StoreWorkspace({self.store.url!r}, {self.prefix!r})"

    @property
    def backend(self) -> Backend:
        return open_store(self.store).backend

    def _key(self, rel: str) -> str:
        return f"{self.prefix}/{rel}"

    def where(self, rel: str) -> str:
        return f"{self.store.url.rstrip('/')}/{self._key(rel)}"

    def get_bytes(self, rel: str) -> bytes | None:
        return self.backend.get_bytes(self._key(rel))

    def put_bytes(self, rel: str, data: bytes) -> None:
        self.backend.put_bytes(self._key(rel), data)

    def put_file(self, local: Path, rel: str) -> str:
        digest = self.backend.upload_file(local, self._key(rel))  # hashes what it sends
        local.unlink(missing_ok=True)
        return digest

    def read_range(self, rel: str, start: int, count: int) -> Iterator[bytes]:
        while count > 0:
            block = self.backend.get_range(self._key(rel), start, min(count, READ_BLOCK))
            if not block:
                raise EOFError(f"{self.where(rel)}: truncated (wanted {count} more bytes at {start})")
            start, count = start + len(block), count - len(block)
            yield block

    @contextlib.contextmanager
    def scratch(self) -> Iterator[Path]:
        with tempfile.TemporaryDirectory(prefix="gptoss-preprocess-") as tmp:
            yield Path(tmp)
