"""The per-node input check's file comparison: size, content and absence, each named."""
from __future__ import annotations

import hashlib
import json

import pytest

from gptoss_model.training.input_digests import InputFile, InputMismatch, problems, read_digests, write_digests


def _entry(path, content: bytes, artifact="dataset/web@v1") -> InputFile:
    return InputFile(str(path), len(content), hashlib.sha256(content).hexdigest(), artifact)


def test_problems_name_the_file_its_artifact_and_what_differs(tmp_path):
    good, short, changed = tmp_path / "a.bin", tmp_path / "b.bin", tmp_path / "c.bin"
    good.write_bytes(b"tokens" * 1000)
    short.write_bytes(b"tok")
    changed.write_bytes(b"TOKENS")
    listed = [_entry(good, b"tokens" * 1000), _entry(short, b"tokens"), _entry(changed, b"tokens"),
              _entry(tmp_path / "gone.bin", b"x", artifact="megatron-checkpoint/base@v2")]
    found = problems(listed)
    assert len(found) == 3
    assert found[0] == f"{short} (dataset/web@v1): 3 bytes, its manifest says 6"
    assert found[1].startswith(f"{changed} (dataset/web@v1): sha256 ") and "its manifest says" in found[1]
    assert found[2].startswith(f"{tmp_path / 'gone.bin'} (megatron-checkpoint/base@v2): cannot be read here")
    assert problems(listed[:1]) == []


def test_the_digest_list_round_trips_as_json_and_a_bad_one_is_named(tmp_path):
    listed = [_entry(tmp_path / "a.bin", b"abc")]
    path = tmp_path / "inputs.sha256.json"
    assert write_digests(path, listed) == 1
    assert json.loads(path.read_text())["files"][0]["sha256"] == hashlib.sha256(b"abc").hexdigest()
    assert read_digests(path) == listed
    path.write_text('{"files": [{"path": "a"}]}')
    with pytest.raises(InputMismatch, match="inputs.sha256.json: not a readable input digest list"):
        read_digests(path)
