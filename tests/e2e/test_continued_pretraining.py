"""The continued-pretraining smoke deployment (infra/prefect.yaml), offline, with its own
parameters: a first run trains from the converted base; a new data file makes the next run
redo preprocess onward only, training on from the first run's checkpoint; a run without new
data is a cache hit at every stage."""
from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import yaml

from tasks.store import ArtifactStore

pytestmark = [pytest.mark.prefect, pytest.mark.slow]
REPO_ROOT = Path(__file__).resolve().parents[2]
SMOKE = "continued-pretraining-smoke"


def _smoke_params() -> dict:
    deployments = yaml.safe_load((REPO_ROOT / "infra" / "prefect.yaml").read_text())["deployments"]
    (smoke,) = [d for d in deployments if d["name"] == SMOKE]
    return smoke["parameters"]["params"]


def test_each_new_data_file_trains_on_from_the_last_checkpoint(prefect_harness, tmp_path, monkeypatch):
    from flows.cli import ensure_demo_source
    from flows.pipeline import PipelineParams, gptoss_pipeline

    # the checkout as the worker sees it: the demo's source, the smoke's data directory
    monkeypatch.chdir(tmp_path)
    ensure_demo_source(tmp_path / ".gptoss" / "demo" / "tiny-gpt-oss")
    shutil.copytree(REPO_ROOT / "configs" / "nightly-smoke", tmp_path / "configs" / "nightly-smoke")
    monkeypatch.setenv("GPTOSS_STORE", (tmp_path / "store").as_uri())
    monkeypatch.setenv("GPTOSS_WORKDIR", str(tmp_path / "work"))
    monkeypatch.setenv("GPTOSS_CACHE", str(tmp_path / "cache"))
    store = ArtifactStore((tmp_path / "store").as_uri())

    def run() -> dict:
        outputs = gptoss_pipeline(PipelineParams.model_validate(_smoke_params()))
        return {what: store.resolve_spec(spec) for what, spec in outputs.items()}

    first = run()
    base_of = {m.kind: m for m in first.values()}
    trained_from = {f"{i.kind}/{i.name}@{i.version}" for i in first["train-checkpoint"].inputs}
    assert base_of["megatron-checkpoint"].spec in trained_from  # the first night: the converted base

    new_day = (REPO_ROOT / "configs" / "demo-corpus.jsonl").read_text().splitlines()[100:160]
    (tmp_path / "configs" / "nightly-smoke" / "day-002.jsonl").write_text("\n".join(new_day) + "\n")
    second = run()
    same = {what for what in first if first[what].version == second[what].version}
    assert same == {"hf-checkpoint", "megatron-checkpoint"}, same  # only preprocess onward ran again
    trained_from = {f"{i.kind}/{i.name}@{i.version}" for i in second["train-checkpoint"].inputs}
    assert first["train-checkpoint"].spec in trained_from  # on from the first night's checkpoint
    assert second["dataset"].spec in trained_from

    third = run()  # no new data: nothing to do
    assert {what: m.version for what, m in third.items()} == {what: m.version for what, m in second.items()}
    versions = sorted(m.parameters["iteration"] for m in store.list("train-checkpoint"))
    assert versions == [6, 6], versions  # two trainings of 6 iterations; the third run trained nothing
    print(f"\nnight 1 trained {first['train-checkpoint'].spec} from the converted base; night 2 (a new file) "
          f"redid preprocess onward and trained {second['train-checkpoint'].spec} from it; night 3 all cache hits")
