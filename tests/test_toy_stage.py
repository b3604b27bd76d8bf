"""The recipe in docs/architecture.md ("Adding a stage"), followed to the letter: its two files,
copied out of the page into a temporary package, make a stage that runs through the generic
runner, is a cache hit the second time, has a `gptoss` subcommand and runs as a Prefect flow."""
from __future__ import annotations

import importlib
import re
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from tasks.stage import InputError

ROOT = Path(__file__).resolve().parents[1]


def recipe_files() -> dict[str, str]:
    """`path`: followed by a ```python block, in the recipe section of docs/architecture.md."""
    page = (ROOT / "docs" / "architecture.md").read_text()
    section = page[page.index("## Adding a stage"):]
    section = section[: section.index("\n## ", 1)]
    return dict(re.findall(r"^`([\w/]+\.py)`:\s*\n\s*```python\n(.*?)```", section, flags=re.S | re.M))


@pytest.fixture
def inventory_stage(tmp_path, monkeypatch):
    import flows
    import tasks

    files = recipe_files()
    assert set(files) == {"tasks/inventory.py", "flows/inventory.py"}, "the recipe is two files"
    for path, text in files.items():
        (tmp_path / path).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / path).write_text(text)
    # the temporary package's files are found as modules of the real packages
    monkeypatch.setattr(tasks, "__path__", [*tasks.__path__, str(tmp_path / "tasks")])
    monkeypatch.setattr(flows, "__path__", [*flows.__path__, str(tmp_path / "flows")])
    yield importlib.import_module("tasks.inventory"), importlib.import_module("flows.inventory")
    for name in ("tasks.inventory", "flows.inventory"):
        sys.modules.pop(name, None)


@pytest.fixture
def hf_checkpoint(tmp_path):
    from tasks.store import ArtifactStore, run_stage

    store = ArtifactStore(f"file://{tmp_path / 'store'}")

    def build(staging: Path) -> dict:
        (staging / "config.json").write_text("{}")
        (staging / "model.safetensors").write_bytes(b"\0" * 1000)
        return {}

    return store, run_stage(store, stage="download", code_version="test", kind="hf-checkpoint", name="toy",
                            params={}, build=build).manifest


def test_the_documented_recipe_makes_a_stage(inventory_stage, hf_checkpoint):
    stage_module, _ = inventory_stage
    store, source = hf_checkpoint
    params = stage_module.InventoryParams(source=source.spec, store={"url": store.url})

    first = stage_module.INVENTORY.run(params, store)
    assert not first.cache_hit and first.manifest.metrics["files"] == 2
    assert first.manifest.inputs[0].version == source.version
    again = stage_module.INVENTORY.run(params, store)
    assert again.cache_hit and again.manifest.version == first.manifest.version

    with pytest.raises(InputError, match="source='dataset/toy': expected hf-checkpoint"):
        stage_module.INVENTORY.run(params.model_copy(update={"source": "dataset/toy"}), store)


def test_the_documented_stage_has_a_command_and_a_flow(inventory_stage, hf_checkpoint, prefect_harness):
    from flows.cli import app, stage_names

    _, flow_module = inventory_stage
    store, source = hf_checkpoint
    assert "inventory" in stage_names()
    runner = CliRunner()
    shown = runner.invoke(app, ["inventory", "--help"])
    assert shown.exit_code == 0 and "List the files of an hf-checkpoint" in shown.output, shown.output
    ran = runner.invoke(app, ["inventory", source.spec, "--store", store.url])
    assert ran.exit_code == 0 and "committed" in ran.output, ran.output
    bad = runner.invoke(app, ["inventory", "hf-checkpoint/missing", "--store", store.url])
    assert bad.exit_code == 1 and "no committed artifact hf-checkpoint/missing" in bad.output, bad.output

    manifest = flow_module.inventory_flow({"source": source.spec, "store": {"url": store.url}})
    assert manifest.producer.stage == "inventory" and manifest.metrics["files"] == 2  # a cache hit of the CLI's
