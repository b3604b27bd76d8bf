"""Bad parameters are refused when the run is created (as `prefect deployment run` creates it),
naming the field, instead of failing on a worker seconds later."""
from __future__ import annotations

import asyncio

import pytest

pytestmark = pytest.mark.prefect


async def _create_runs(flow, cases: dict[str, dict]) -> dict[str, str]:
    from prefect.client.orchestration import get_client
    from prefect.utilities.callables import parameter_schema

    outcome = {}
    async with get_client() as client:
        flow_id = await client.create_flow(flow)
        deployment_id = await client.create_deployment(
            flow_id=flow_id, name=f"validation-{flow.name}", parameter_openapi_schema=parameter_schema(flow).model_dump(),
            enforce_parameter_schema=True)
        for case, params in cases.items():
            try:
                run = await client.create_flow_run_from_deployment(deployment_id, parameters={"params": params})
                outcome[case] = f"accepted {run.id}"
                await client.delete_flow_run(run.id)
            except Exception as exc:  # the server's refusal, as the CLI shows it
                outcome[case] = str(exc)
    return outcome


def test_download_and_convert_parameters_are_validated_at_run_creation(prefect_harness):
    from flows.convert import convert_flow
    from flows.download import download_flow

    download = asyncio.run(_create_runs(download_flow, {
        "good": {"repo_id": "openai/gpt-oss-20b"},
        "space": {"repo_id": "openai/gpt oss"},
        "credentials": {"source_url": "http://user:password@mirror.internal/gpt-oss"},
        "revision": {"revision": "main; rm -rf"},
        "path with a space": {"source_url": "/mirrors/my model"},
        "token": {"repo_id": "org/private", "hf_token": "hf_ThisMustNeverBeStored"},
    }))
    assert download["good"].startswith("accepted") and download["path with a space"].startswith("accepted")
    for case, field in (("space", "repo_id"), ("credentials", "source_url"), ("revision", "revision"),
                        ("token", "hf_token")):
        assert not download[case].startswith("accepted") and field in download[case], (case, download[case])

    from flows.preprocess import preprocess_flow

    preprocess = asyncio.run(_create_runs(preprocess_flow, {
        "good": {"tokenizer": "hf-checkpoint/tiny", "name": "docs", "inputs": ["s3://corpora/a.jsonl"]},
        "credentials": {"tokenizer": "hf-checkpoint/tiny", "name": "docs", "inputs": ["s3://k:s3cret@corpora/a.jsonl"]},
    }))
    assert preprocess["good"].startswith("accepted")
    assert not preprocess["credentials"].startswith("accepted") and "inputs" in preprocess["credentials"]

    from flows.train import train_flow

    train = asyncio.run(_create_runs(train_flow, {
        "good": {"recipe": "tiny_pretrain", "name": "run"},
        "typo": {"recipe": "tiny_pretrian", "name": "run"},
    }))
    assert train["good"].startswith("accepted")
    assert not train["typo"].startswith("accepted") and "recipe" in train["typo"], train["typo"]

    from flows.pipeline import gptoss_pipeline

    secret = "AKIAEXAMPLESECRET0000"
    pipeline = asyncio.run(_create_runs(gptoss_pipeline, {
        "good": {"download": {"source_url": "/mirrors/tiny"}},
        "secret in the store": {"download": {"store": {"aws_secret_access_key": secret}}},
        "token in download": {"download": {"hf_token": secret}},
        "misspelt key": {"convert": {"dtpye": "float32"}},
    }))
    assert pipeline["good"].startswith("accepted"), pipeline["good"]
    for case in ("secret in the store", "token in download", "misspelt key"):
        assert not pipeline[case].startswith("accepted"), (case, pipeline[case])  # never stored

    convert = asyncio.run(_create_runs(convert_flow, {
        "good": {"source": "hf-checkpoint/openai/gpt-oss-20b@latest"},
        "malformed": {"source": "hf-checkpoint openai/gpt-oss-20b"},
    }))
    assert convert["good"].startswith("accepted")
    assert not convert["malformed"].startswith("accepted") and "source" in convert["malformed"]
