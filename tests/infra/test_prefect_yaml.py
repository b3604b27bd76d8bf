"""infra/prefect.yaml: every deployment names a real flow and parameters that flow accepts."""
from __future__ import annotations

import importlib
from pathlib import Path

import pytest
import yaml

PREFECT_YAML = Path(__file__).resolve().parents[2] / "infra" / "prefect.yaml"
DEPLOYMENTS = yaml.safe_load(PREFECT_YAML.read_text())["deployments"]


@pytest.mark.parametrize("deployment", DEPLOYMENTS,
                         ids=[f"{d['entrypoint'].split(':')[1]}/{d['name']}" for d in DEPLOYMENTS])
def test_deployment_entrypoint_and_parameters_validate(deployment):
    module_path, flow_name = deployment["entrypoint"].split(":")
    module = importlib.import_module(module_path.removesuffix(".py").replace("/", "."))
    flow = getattr(module, flow_name)
    validated = flow.validate_parameters(deployment.get("parameters", {}))
    assert set(validated) == set(deployment.get("parameters", {}))
    assert deployment["work_pool"]["name"]
    for schedule in deployment.get("schedules", []):
        from prefect.client.schemas.schedules import CronSchedule

        CronSchedule(cron=schedule["cron"], timezone=schedule.get("timezone"))  # raises when invalid


def test_the_demo_deployment_runs_configs_demo_yaml_in_full():
    """Submitted unchanged from the UI or `prefect deployment run`, it runs every stage."""
    demo = next(d for d in DEPLOYMENTS if d["name"] == "demo" and d["entrypoint"].endswith(":gptoss_pipeline"))
    config = yaml.safe_load((PREFECT_YAML.parents[1] / "configs" / "demo.yaml").read_text())
    assert demo["parameters"]["params"] == config
    assert {"download", "convert", "preprocess", "train", "export"} <= set(config)


def test_every_stage_has_a_deployment():
    """Every declared stage (found as the CLI finds them), so a new stage cannot ship undeployable."""
    from flows.cli import stage_names

    entrypoints = {d["entrypoint"] for d in DEPLOYMENTS}
    assert {"download", "convert", "preprocess", "train", "export", "verify"} <= set(stage_names())
    for stage in stage_names():
        assert f"flows/{stage}.py:{stage}_flow" in entrypoints, f"infra/prefect.yaml has no deployment of {stage}"


def test_a_wrong_parameter_is_caught():
    from prefect.exceptions import ParameterTypeError

    from flows.convert import convert_flow

    with pytest.raises(ParameterTypeError, match="workers"):
        convert_flow.validate_parameters({"params": {"source": "hf-checkpoint/x", "workers": 0}})


def test_deployments_need_no_block_and_no_environment_variable():
    """Public repos need no token block; the working directory is where `prefect deploy` ran."""
    text = PREFECT_YAML.read_text()
    for deployment in DEPLOYMENTS:
        params = deployment["parameters"]["params"]
        assert "hf_token_block" not in {**params, **params.get("download", {})}, deployment["name"]
    assert "pull" not in yaml.safe_load(text)
    assert "{{ $" not in text


@pytest.mark.prefect
def test_a_missing_token_block_is_named_with_how_to_create_it(prefect_harness):
    from tasks.download import DownloadParams, _token

    with pytest.raises(ValueError, match=r"Secret block 'hf-token-nowhere' .*does not exist. Create it with"):
        _token(DownloadParams(hf_token_block="hf-token-nowhere"))
