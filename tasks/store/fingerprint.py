"""Artifact versions: a fingerprint of what produced them, and secret removal.

version = sha256 over canonical JSON of (stage, code version, parameters with
secrets removed, input artifact versions). Equal inputs give equal versions on
any machine, which is what makes a committed version a cache hit.
"""
from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Mapping, Sequence
from datetime import date, datetime
from enum import Enum
from pathlib import PurePath
from typing import Any

from pydantic import BaseModel, SecretBytes, SecretStr

# Parameter names whose values are treated as secrets even when passed as
# plain strings: they never enter a manifest, a fingerprint or a log line.
SECRET_KEY_RE = re.compile(
    r"(token|secret|password|passwd|credential|api[_-]?key|access[_-]?key|private[_-]?key|auth)",
    re.IGNORECASE,
)
_SECRET_TYPES = (SecretStr, SecretBytes)


def is_secret_key(key: str) -> bool:
    # Names of Prefect blocks that hold a secret are references, not secrets.
    return bool(SECRET_KEY_RE.search(key)) and not key.endswith(("_block", "_env", "_var"))


def public_params(value: Any) -> Any:
    """JSON-able copy of `value` with every secret dropped.

    Secrets are dropped, not masked, so that the fingerprint does not change
    when a token rotates.
    """
    if isinstance(value, BaseModel):
        value = {k: getattr(value, k) for k in type(value).model_fields}
    if isinstance(value, Mapping):
        out = {}
        for k, v in value.items():
            if isinstance(v, _SECRET_TYPES) or is_secret_key(str(k)):
                continue
            out[str(k)] = public_params(v)
        return out
    if isinstance(value, _SECRET_TYPES):
        return None
    if isinstance(value, (str, int, float, bool)) or value is None:
        return value
    if isinstance(value, Enum):
        return public_params(value.value)
    if isinstance(value, (datetime, date)):
        return value.isoformat()
    if isinstance(value, PurePath):
        return str(value)
    if isinstance(value, (set, frozenset)):
        return sorted(public_params(v) for v in value)
    if isinstance(value, Sequence) and not isinstance(value, (bytes, bytearray)):
        return [public_params(v) for v in value]
    raise TypeError(f"parameter value of type {type(value).__name__} is not JSON-serialisable")


def canonical_json(value: Any) -> str:
    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False)


def fingerprint(stage: str, code_version: str, params: Any, inputs: Sequence[Mapping[str, str]]) -> str:
    payload = {
        "stage": stage,
        "code_version": code_version,
        "params": public_params(params),
        "inputs": sorted(
            ({"kind": i["kind"], "name": i["name"], "version": i["version"]} for i in inputs),
            key=lambda i: (i["kind"], i["name"], i["version"]),
        ),
    }
    return hashlib.sha256(canonical_json(payload).encode()).hexdigest()[:20]
