"""infra/prefect.yaml: every deployment names a real flow and parameters that flow accepts."""
from __future__ import annotations

import importlib
from pathlib import Path

import pytest
import yaml

PREFECT_YAML = Path(__file__).resolve().parents[2] / "infra" / "prefect.yaml"
DEPLOYMENTS = yaml.safe_load(PREFECT_YAML.read_text())["deployments"]


@pytest.mark.parametrize("deployment", DEPLOYMENTS, ids=[d["name"] for d in DEPLOYMENTS])
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


def test_a_wrong_parameter_is_caught():
    from prefect.exceptions import ParameterTypeError

    from flows.convert import convert_flow

    with pytest.raises(ParameterTypeError, match="workers"):
        convert_flow.validate_parameters({"params": {"source": "hf-checkpoint/x", "workers": 0}})
