"""Bad inputs refused by the training entry before any model is built: one line naming the field.

Each case runs `gptoss_model.train.main` (what torchrun starts) in this process with the model
builder replaced by one that fails the test, so "refused before any model build" is checked,
not assumed. The last case runs two ranks under torchrun: the error is printed once.
"""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from gptoss_model.train import EXIT_CONFIG, main

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture()
def no_model_build(monkeypatch):
    import gptoss_model.training.model as model

    def build_chunks(*_a, **_k):
        raise AssertionError("a model was built before the bad input was refused")

    monkeypatch.setattr(model, "build_chunks", build_chunks)


def _fake_full_checkpoint(root: Path) -> Path:
    """The files a finished full-training save leaves (tracker, metadata.json, run_config.yaml)."""
    it = root / "iter_0000002"
    it.mkdir(parents=True)
    (it / "metadata.json").write_text('{"sharded_backend": "torch_dist"}')
    (it / "run_config.yaml").write_text("peft:\n  method: null\n")
    (root / "latest_checkpointed_iteration.txt").write_text("2")
    return root


def _cases(env, tmp: Path):
    prefix = env["prefixes"][0]
    corrupt = tmp / "corrupt_text_document"
    shutil.copy(prefix + ".bin", str(corrupt) + ".bin")
    Path(str(corrupt) + ".idx").write_bytes(b"not an index at all, just bytes" * 2)
    truncated = tmp / "truncated_text_document"
    shutil.copy(prefix + ".bin", str(truncated) + ".bin")
    idx = Path(prefix + ".idx").read_bytes()
    Path(str(truncated) + ".idx").write_bytes(idx[: len(idx) - 20])
    short_bin = tmp / "short_bin_text_document"
    shutil.copy(prefix + ".idx", str(short_bin) + ".idx")
    Path(str(short_bin) + ".bin").write_bytes(Path(prefix + ".bin").read_bytes()[:-8])
    if os.geteuid() == 0:  # root writes anywhere: a file where the directory must go instead
        (tmp / "blocker").write_text("a file")
        unwritable = (f"checkpoint.save={tmp / 'blocker' / 'ckpts'}", "is not a directory")
    else:
        (tmp / "readonly").mkdir(mode=0o555)
        unwritable = (f"checkpoint.save={tmp / 'readonly' / 'ckpts'}", "not writable")
    full = _fake_full_checkpoint(tmp / "full")
    return [
        ("missing prefix", [f"data.data_paths=[{tmp / 'nowhere_text_document'}]"], "data.data_paths[0]",
         "does not exist"),
        ("prefix with .bin", [f"data.data_paths=[{prefix}.bin]"], "data.data_paths[0]", "without .bin"),
        ("unreadable index", [f"data.data_paths=[{corrupt}]"], "data.data_paths[0]", "bad header"),
        ("truncated index", [f"data.data_paths=[{truncated}]"], "data.data_paths[0]", "truncated"),
        ("truncated tokens", [f"data.data_paths=[{short_bin}]"], "data.data_paths[0]", "its index points to"),
        ("missing pretrained checkpoint", [f"checkpoint.pretrained_checkpoint={tmp / 'no_ckpt'}"],
         "checkpoint.pretrained_checkpoint", "does not exist"),
        ("hf_config that does not exist", ["model.hf_config=/nonexistent"], "model.hf_config", "does not exist"),
        ("sft on pretraining data", ["data.kind=sft", f"data.data_paths=[{prefix}]"], "data.data_paths[0]",
         "set data.kind=pretrain"),
        ("pretraining on packed SFT data", [f"data.data_paths=[{env['sft_prefixes'][0]}]"], "data.data_paths[0]",
         "set data.kind=sft"),
        ("unwritable checkpoint.save", [unwritable[0]], "checkpoint.save", unwritable[1]),
        ("LoRA resuming a full checkpoint", ["peft.method=lora", f"checkpoint.load={full}"], "checkpoint.load",
         "peft.method=None, this run has peft.method=lora"),
    ]


@pytest.mark.slow
def test_bad_inputs_are_refused_before_any_model_build(train_env, tmp_path, no_model_build, capsys):
    for what, overrides, field, words in _cases(train_env, tmp_path):
        code = main([str(train_env["config"]), f"dir={tmp_path / 'run'}", *overrides])
        err = capsys.readouterr().err
        # Either the pre-flight's list ("  - field: why" lines) or a single "error: field: why".
        problems = ([line[4:] for line in err.splitlines() if line.startswith("  - ")]
                    or [line[7:] for line in err.splitlines() if line.startswith("error: ")])
        print(f"\n{what}: exit {code}\n{err.strip()}")
        assert code == EXIT_CONFIG, what
        assert len(problems) == 1 and problems[0].startswith(f"{field}: ") and words in problems[0], (what, err)


@pytest.mark.slow
def test_under_torchrun_the_error_is_printed_once(train_env, tmp_path):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--standalone",
           "-m", "gptoss_model.train", str(train_env["config"]), f"dir={tmp_path / 'run'}",
           "parallelism.expert_model_parallel_size=2", f"data.data_paths=[{tmp_path / 'missing_document'}]"]
    out = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=240,
                         env={**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"})
    text = out.stdout + out.stderr
    assert out.returncode != 0
    assert text.count("refused before launch") == 1, text[-3000:]
    assert "exitcode  : 2" in text


@pytest.mark.slow
def test_resuming_from_a_tampered_common_pt_stops_with_a_permanent_error(train_env, tmp_path, capsys):
    """A resume checkpoint whose common.pt holds a payload: refused (weights-only), named, exit 6
    (permanent: the stage raises TrainingRefused instead of retrying the same bytes)."""
    import pickle

    from gptoss_model.train import EXIT_PERMANENT

    class Payload:
        def __reduce__(self):
            return open, (str(tmp_path / "pwned"), "w")

    run = [str(train_env["config"]), f"dir={tmp_path / 'run'}", "train.train_iters=2", "train.eval_interval=0",
           "scheduler.lr_warmup_iters=1", "checkpoint.save_interval=2"]
    assert main(run) == 0
    (tmp_path / "run" / "checkpoints" / "iter_0000002" / "common.pt").write_bytes(pickle.dumps(Payload()))
    capsys.readouterr()
    assert main([*run[:2], "train.train_iters=4", *run[3:]]) == EXIT_PERMANENT
    err = capsys.readouterr().err
    assert "refused to unpickle a checkpoint file" in err, err[-2000:]
    assert not (tmp_path / "pwned").exists()
