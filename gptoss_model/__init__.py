"""gptoss_model: GPT-OSS 20B/120B on megatron-core, numerically identical to transformers' reference.

Importing this package is cheap: megatron-core (and torch) load only when a
name that needs them is first used. Never imports Prefect.
"""

from __future__ import annotations

import importlib

_LAZY = {
    "AutoBridge": "gptoss_model.bridge",
    "GptOssModelProvider": "gptoss_model.bridge",
    "GptOssModelConfig": "gptoss_model.model.config",
    "ParallelLayout": "gptoss_model.model.parallel",
    "load_hf_weights": "gptoss_model.checkpoint.load_hf",
    "HFCheckpoint": "gptoss_model.checkpoint.hf_reader",
}

__all__ = sorted(_LAZY)


def __getattr__(name: str):
    if name in _LAZY:
        value = getattr(importlib.import_module(_LAZY[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'gptoss_model' has no attribute {name!r}")


def __dir__():
    return sorted(set(globals()) | set(_LAZY))
