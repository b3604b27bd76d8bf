"""`gptoss <stage>`: a command line for every stage, built from its declaration."""
from __future__ import annotations

import pytest
from typer.testing import CliRunner

from flows.cli import app, stage_names

STAGES = stage_names()


def _command(stage: str) -> list[str]:
    return ["train", "run"] if stage == "train" else [stage]  # `gptoss train` also holds `plan`


def test_the_six_stages_are_found():
    assert {"download", "convert", "preprocess", "train", "export", "verify"} <= set(STAGES)


@pytest.mark.parametrize("stage", STAGES)
def test_every_stage_has_a_command_with_help(stage):
    from flows.cli import load_stage

    shown = CliRunner().invoke(app, [*_command(stage), "--help"], env={"COLUMNS": "240"})  # no option cut short
    assert shown.exit_code == 0, shown.output
    declared = load_stage(stage)
    flags = [f"--{n.replace('_', '-')}" for n, f in declared.params.model_fields.items()
             if n != "store" and not (n in declared.cli_args and f.is_required())]
    missing = [flag for flag in flags if flag not in shown.output]
    assert not missing, f"gptoss {stage} --help lacks {missing}"


def test_arguments_become_params_and_bad_values_are_one_line_errors(tmp_path):
    runner = CliRunner()
    store = ["--store", f"file://{tmp_path}/store"]
    bad = runner.invoke(app, ["convert", "hf-checkpoint/x", "float32", "--workers", "0", *store])
    assert bad.exit_code == 1 and "workers" in bad.output and "Traceback" not in bad.output, bad.output
    wrong_kind = runner.invoke(app, ["export", "dataset/x", *store])
    assert wrong_kind.exit_code == 1 and "source='dataset/x': expected megatron-checkpoint or train-checkpoint" in (
        wrong_kind.output), wrong_kind.output
    missing = runner.invoke(app, ["convert", "hf-checkpoint/nothing", "--workers", "2", *store])
    assert missing.exit_code == 1 and "no committed artifact hf-checkpoint/nothing@latest" in missing.output
    overrides = runner.invoke(app, ["train", "run", "tiny_pretrain", "run-x", "dataset/nothing",
                                    "--overrides", "{train.train_iters: 2}", *store])
    assert overrides.exit_code == 1 and "base_checkpoint='dataset/nothing': expected megatron-checkpoint" in (
        overrides.output), overrides.output
