"""The whole pipeline flow, every stage, as `make demo` runs it: download -> convert ->
preprocess -> train -> export -> verify on a tiny model, then a rerun that is a cache hit
at every stage. Lineage links each artifact to what it was made from."""
from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from gptoss_model.checkpoint.tiny import write_tiny_checkpoint
from tasks.store import ArtifactStore

pytestmark = [pytest.mark.prefect, pytest.mark.slow]
REPO_ROOT = Path(__file__).resolve().parents[2]


def test_every_stage_chains_and_a_rerun_redoes_nothing(prefect_harness, tmp_path, monkeypatch):
    from flows.pipeline import PipelineParams, gptoss_pipeline

    monkeypatch.setenv("GPTOSS_WORKDIR", str(tmp_path / "work"))
    monkeypatch.setenv("GPTOSS_CACHE", str(tmp_path / "cache"))
    source = write_tiny_checkpoint(tmp_path / "tiny-gpt-oss", dtype="bfloat16", seed=21)
    store_url = (tmp_path / "store").as_uri()
    config = PipelineParams.from_yaml(REPO_ROOT / "configs" / "demo.yaml").model_dump()
    config["download"]["source_url"] = str(source)
    config["preprocess"]["inputs"] = [str(REPO_ROOT / "configs" / "demo-corpus.jsonl")]
    for section in ("download", "convert", "preprocess", "train", "export"):
        config[section]["store"] = {"url": store_url}
    params = PipelineParams.model_validate(config)

    state = gptoss_pipeline(params, return_state=True)
    outputs = state.result()
    store = ArtifactStore(store_url)
    produced = {what: store.resolve_spec(spec) for what, spec in outputs.items()}
    assert set(produced) == {"hf-checkpoint", "megatron-checkpoint", "dataset", "train-checkpoint", "hf-export",
                             "verify-report (export)"}

    def inputs(what):
        return {f"{i.kind}/{i.name}@{i.version}" for i in produced[what].inputs}

    assert inputs("megatron-checkpoint") == {produced["hf-checkpoint"].spec}
    assert inputs("dataset") == {produced["hf-checkpoint"].spec}  # its tokenizer
    assert inputs("train-checkpoint") == {produced["megatron-checkpoint"].spec, produced["dataset"].spec}
    assert inputs("hf-export") >= {produced["train-checkpoint"].spec}
    train = produced["train-checkpoint"].metrics
    assert train["iteration"] == 12 and train["loss"] < 6.0  # from ~6.5 at step 1 on this corpus
    report = produced["verify-report (export)"].metrics
    assert report["first_failure"] is None

    async def lineage_table():
        from prefect.client.orchestration import get_client
        from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterKey

        async with get_client() as client:
            return await client.read_artifacts(
                artifact_filter=ArtifactFilter(key=ArtifactFilterKey(any_=["gptoss-pipeline-lineage"])))

    tables = asyncio.run(lineage_table())
    assert any(produced["train-checkpoint"].version in str(t.data) for t in tables)

    stages = ("download", "convert", "preprocess", "train", "export", "verify")
    lines = _run_logs(state.state_details.flow_run_id)  # the pipeline's own run, as its Logs tab shows it
    for stage in stages:
        assert any(m.startswith(f"{stage}: ") and m.endswith("(committed)") for m in lines), (stage, lines[-40:])
    assert any("iteration      10 |" in m for m in lines)  # training progress, every 10th iteration

    again = gptoss_pipeline(params, return_state=True)
    assert again.result() == outputs  # every stage a cache hit: the same versions
    lines = _run_logs(again.state_details.flow_run_id)
    for stage in stages:
        assert any(m.startswith(f"{stage}: ") and "(cache hit" in m for m in lines), (stage, lines)


def _run_logs(flow_run_id) -> list[str]:
    """Every log line of one flow run (all pages), once the handler has sent them."""
    import time

    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import LogFilter, LogFilterFlowRunId
    from prefect.logging.handlers import APILogHandler

    async def read() -> list[str]:
        out: list[str] = []
        async with get_client() as client:
            while page := await client.read_logs(LogFilter(flow_run_id=LogFilterFlowRunId(any_=[flow_run_id])),
                                                 offset=len(out), limit=200):
                out += [entry.message for entry in page]
        return out

    APILogHandler().flush()
    deadline = time.monotonic() + 20
    while True:
        lines = asyncio.run(read())
        if any(m.startswith("verify: ") for m in lines) or time.monotonic() > deadline:
            return lines
        time.sleep(0.5)
