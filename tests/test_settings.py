"""Environment variables are read in gptoss_model/settings.py and nowhere else.

The rule, per module under gptoss_model/, tasks/ and flows/ (settings.py excepted):
every use of `os.environ` must be a write or a copy handed to a child, i.e. one of
  * `os.environ[KEY] = value` or `del os.environ[KEY]`;
  * `os.environ.setdefault(...)` / `.update(...)` / `.pop(...)` / `.clear()` as a statement
    (its return value, which would be a read, unused);
  * `{**os.environ, ...}`, `dict(os.environ, ...)` or `os.environ.copy()` (a child's environment).
Anything else is a read: `os.environ[KEY]`, `.get`, `in os.environ`, iterating it, and every
`os.getenv`. `from os import environ / getenv` is refused too, so the spelling above is the only one.
"""
from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

from gptoss_model.settings import DEFAULT_STORE, Settings

ROOT = Path(__file__).resolve().parents[1]
SETTINGS = ROOT / "gptoss_model" / "settings.py"
WRITES = {"setdefault", "update", "pop", "clear"}


def _parents(tree: ast.AST) -> dict[ast.AST, ast.AST]:
    return {child: node for node in ast.walk(tree) for child in ast.iter_child_nodes(node)}


def _environ_use_allowed(node: ast.Attribute, parent: dict) -> bool:
    up = parent.get(node)
    if isinstance(up, ast.Subscript) and up.value is node:
        return isinstance(up.ctx, (ast.Store, ast.Del))
    if isinstance(up, ast.Attribute) and isinstance(parent.get(up), ast.Call) and parent[up].func is up:
        call = parent[up]
        return up.attr == "copy" or (up.attr in WRITES and isinstance(parent.get(call), ast.Expr))
    if isinstance(up, ast.Dict):  # {**os.environ}: the key of an unpacked entry is None
        return any(v is node and k is None for k, v in zip(up.keys, up.values))
    if isinstance(up, ast.Call):
        return isinstance(up.func, ast.Name) and up.func.id == "dict" and up.args[:1] == [node]
    return False


def environment_reads(source: str, name: str) -> list[str]:
    tree = ast.parse(source, name)
    parent = _parents(tree)
    os_names = {a.asname or a.name for n in ast.walk(tree) if isinstance(n, ast.Import)
                for a in n.names if a.name == "os"}
    found = []
    for node in ast.walk(tree):
        where = f"{name}:{getattr(node, 'lineno', '?')}"
        if isinstance(node, ast.ImportFrom) and node.module == "os":
            found += [f"{where}: from os import {a.name}" for a in node.names
                      if a.name in ("environ", "environb", "getenv", "getenvb")]
        elif (isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name)
              and node.value.id in os_names):
            if node.attr in ("getenv", "getenvb"):
                found.append(f"{where}: os.{node.attr}")
            elif node.attr in ("environ", "environb") and not _environ_use_allowed(node, parent):
                found.append(f"{where}: reads os.{node.attr} ({ast.unparse(parent.get(node, node))})")
    return found


def _modules():
    for top in ("gptoss_model", "tasks", "flows"):
        yield from (p for p in sorted((ROOT / top).rglob("*.py")) if p != SETTINGS)


def test_only_settings_reads_the_environment():
    reads = [r for p in _modules() for r in environment_reads(p.read_text(), str(p.relative_to(ROOT)))]
    assert not reads, "read environment variables through gptoss_model.settings:\n" + "\n".join(reads)


@pytest.mark.parametrize("source,reads", [
    ("import os\nos.environ['A'] = '1'\ndel os.environ['A']\nos.environ.setdefault('B', '2')\n"
     "os.environ.pop('B', None)\nenv = {**os.environ, 'C': '3'}\nenv = dict(os.environ, C='3')\n"
     "env = os.environ.copy()\n", 0),
    ("import os\nx = os.environ['A']\n", 1),
    ("import os\nx = os.environ.get('A')\n", 1),
    ("import os as o\nx = o.getenv('A')\n", 1),
    ("import os\nx = 'A' in os.environ\n", 1),
    ("import os\nx = os.environ.setdefault('A', '1')\n", 1),
    ("import os\nfor k in os.environ:\n    pass\n", 1),
    ("from os import environ\n", 1),
])
def test_the_rule_tells_reads_from_writes(source, reads):
    found = environment_reads(source, "example.py")
    assert len(found) == reads, found


def test_defaults_and_parsing():
    s = Settings.from_env({})
    assert s.store_url == DEFAULT_STORE and s.s3_endpoint_url is None and s.aws_region == "us-east-1"
    assert s.rank is None and s.world_size is None and s.local_rank == 0 and s.torchelastic_run_id is None
    assert s.hf_endpoint is None and s.hf_home is None and not s.hf_hub_offline
    assert s.prefect_api_url is None and s.prefect_startup_timeout == 120.0
    s = Settings.from_env({"RANK": "3", "WORLD_SIZE": "4", "LOCAL_RANK": "1", "TORCHELASTIC_RUN_ID": "none",
                           "HF_HUB_OFFLINE": " yes ", "GPTOSS_STORE": "", "HF_HOME": "/h",
                           "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS": "0"})
    assert (s.rank, s.world_size, s.local_rank, s.torchelastic_run_id) == (3, 4, 1, "none")
    assert s.hf_hub_offline and s.store_url == DEFAULT_STORE and s.hf_home == Path("/h")
    assert s.prefect_startup_timeout == 0.0
    with pytest.raises(ValueError, match=r"WORLD_SIZE='four': expected an integer"):
        Settings.from_env({"WORLD_SIZE": "four"})


def test_settings_import_is_cheap():
    code = "import sys, gptoss_model.settings; print(sorted({'torch', 'prefect'} & set(sys.modules)))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT,
                         env={"PYTHONPATH": str(ROOT), "PATH": ""}, check=True).stdout
    assert out.strip() == "[]"
