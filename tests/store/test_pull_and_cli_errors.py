"""`gptoss artifacts pull`: all verified or nothing new; CLI errors are one line (traceback with --debug)."""
from __future__ import annotations

import hashlib
import os
from pathlib import Path

import pytest
from typer.testing import CliRunner

from flows.cli import app
from tasks.store import DestinationConflict, IntegrityError
from tests.store.test_store import commit_tree, tamper

FILES = {"config.json": b'{"hidden_size": 8}', "weights/model-00001.safetensors": os.urandom(200_000),
         "weights/model-00002.safetensors": os.urandom(300_000)}


def _snapshot(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def _invoke(store, *args):
    env = {"GPTOSS_STORE": store.url, "COLUMNS": "200"}
    return CliRunner().invoke(app, list(args), env=env)


def test_tampered_pull_is_one_line_naming_file_and_hashes_and_changes_nothing(store, tmp_path):
    m = commit_tree(store, tmp_path, FILES)
    store.set_ref(m.kind, m.name, "latest", m.version)
    tamper(store, m, "weights/model-00002.safetensors")
    dest = tmp_path / "dest"
    dest.mkdir()
    (dest / "notes.txt").write_text("the user's own file")
    before = _snapshot(dest)

    out = _invoke(store, "artifacts", "pull", "hf-checkpoint/org/model", str(dest))
    assert out.exit_code == 1
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1, out.stderr
    expected = next(f.sha256 for f in m.files if f.path == "weights/model-00002.safetensors")
    assert m.spec in lines[0] and "weights/model-00002.safetensors" in lines[0] and expected in lines[0]
    assert len([w for w in lines[0].split() if len(w.strip("(),:")) == 64]) == 2  # both full hashes
    assert _snapshot(dest) == before
    assert [p.name for p in tmp_path.iterdir() if ".pull-" in p.name] == []  # no temp dir left beside dest

    # Into a directory that does not exist yet: it is not created.
    out = _invoke(store, "artifacts", "pull", m.spec, str(tmp_path / "fresh"))
    assert out.exit_code == 1 and not (tmp_path / "fresh").exists()

    # --debug: the traceback.
    out = _invoke(store, "--debug", "artifacts", "pull", m.spec, str(dest))
    assert isinstance(out.exception, IntegrityError)


def test_pull_refuses_existing_files_unless_overwrite(store, tmp_path):
    m = commit_tree(store, tmp_path, FILES)
    dest = tmp_path / "dest"
    (dest / "weights").mkdir(parents=True)
    (dest / "config.json").write_text("the user's config")
    (dest / "notes.txt").write_text("unrelated")

    out = _invoke(store, "artifacts", "pull", m.spec, str(dest))
    assert out.exit_code == 1 and len(out.stderr.strip().splitlines()) == 1
    assert "config.json" in out.stderr and "--overwrite" in out.stderr
    assert (dest / "config.json").read_text() == "the user's config"
    assert not (dest / "weights" / "model-00001.safetensors").exists()

    out = _invoke(store, "artifacts", "pull", "--overwrite", m.spec, str(dest))
    assert out.exit_code == 0, out.output
    got = _snapshot(dest)
    assert {k: got[k] for k in FILES} == FILES and got["notes.txt"] == b"unrelated"

    with pytest.raises(DestinationConflict, match="not a directory"):
        store.pull(m, dest / "notes.txt")
    (tmp_path / "blocked").mkdir()
    (tmp_path / "blocked" / "weights").write_text("a file where the artifact has a directory")
    with pytest.raises(DestinationConflict, match="'weights/model-00001.safetensors' needs a directory"):
        store.pull(m, tmp_path / "blocked", overwrite=True)


def test_pull_into_a_new_directory(store, tmp_path):
    m = commit_tree(store, tmp_path, FILES)
    out = _invoke(store, "artifacts", "pull", m.spec, str(tmp_path / "a" / "b"))
    assert out.exit_code == 0, out.output
    assert _snapshot(tmp_path / "a" / "b") == FILES
    assert hashlib.sha256(FILES["config.json"]).hexdigest() == m.files[0].sha256


def test_user_errors_are_one_line(tmp_path):
    env = {"GPTOSS_STORE": (tmp_path / "store").as_uri()}
    runner = CliRunner()
    for args, needle in [(["artifacts", "show", "hf-checkpoint/nothing/here"], "no committed artifact"),
                         (["artifacts", "show", "hf-checkpoint/../etc"], "invalid artifact name"),
                         (["artifacts", "pull", "Bad/x", str(tmp_path / "d")], "invalid artifact kind")]:
        out = runner.invoke(app, args, env=env)
        assert out.exit_code == 1
        assert out.stderr.strip().splitlines() == [out.stderr.strip()] and needle in out.stderr, out.stderr
        assert "Traceback" not in out.output
