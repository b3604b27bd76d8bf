"""A checkpoint named by a local directory or a Hub repo id -> a local directory to read."""

from __future__ import annotations

import os
import threading
from pathlib import Path

# What a model needs from a Hub repo. fnmatch's `*` also matches "/", so original/ (consolidated
# weights, another 13-65 GB of safetensors) and metal/ are excluded by name.
HUB_ALLOW_PATTERNS = ["config.json", "generation_config.json", "*.safetensors", "model.safetensors.index.json",
                      "tokenizer*", "special_tokens_map.json", "chat_template.jinja"]
HUB_IGNORE_PATTERNS = ["original/*", "metal/*"]


def resolve_checkpoint(path_or_repo: str | os.PathLike, revision: str | None = None) -> Path:
    """A local directory is used as is; anything else is a Hub repo id, fetched through the
    verified, resumable download into its commit-keyed cache (`hub_download.cached_snapshot`,
    under $HF_HOME; honours HF_ENDPOINT, HF_TOKEN and HF_HUB_OFFLINE)."""
    path = Path(path_or_repo).expanduser()
    if path.is_dir():
        return path
    if path.exists():
        raise NotADirectoryError(f"{path} is a file; expected a checkpoint directory or a Hub repo id")
    from gptoss_model.hub.download import cached_snapshot

    with _ProgressBar(f"download {path_or_repo}") as progress:
        return cached_snapshot(str(path_or_repo), revision, allow_patterns=HUB_ALLOW_PATTERNS,
                               ignore_patterns=HUB_IGNORE_PATTERNS, progress=progress)


class _ProgressBar:
    """A byte progress bar (huggingface_hub's tqdm: HF_HUB_DISABLE_PROGRESS_BARS silences it), fed
    `(done, total)` from the download's worker threads; shown only once bytes actually move."""

    def __init__(self, description: str):
        self.description, self.bar, self.lock = description, None, threading.Lock()

    def __call__(self, done: int, total: int) -> None:
        from huggingface_hub.utils import tqdm

        with self.lock:
            if self.bar is None:
                self.bar = tqdm(total=total, unit="B", unit_scale=True, desc=self.description)
            self.bar.update(done - self.bar.n)

    def __enter__(self) -> "_ProgressBar":
        return self

    def __exit__(self, *exc) -> None:
        if self.bar is not None:
            self.bar.close()
