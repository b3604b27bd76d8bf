"""Session fixtures for the training tests: a tiny fp32 GPT-OSS checkpoint, a real-text
pretraining dataset in the dataset artifact's layout, and the base run config (YAML)."""
from __future__ import annotations

import shutil
from pathlib import Path

import pytest


@pytest.fixture(scope="session")
def train_env(tmp_path_factory):
    from gptoss_model.recipes import tiny_pretrain_config
    from gptoss_model.checkpoint.tiny import write_tiny_checkpoint
    from gptoss_model.training.config import save_yaml
    from tests.train.data import write_tiny_pretrain_dataset, write_tiny_sft_dataset

    root = tmp_path_factory.mktemp("train")
    ckpt = write_tiny_checkpoint(root / "hf", dtype="float32", seed=0)
    prefixes = write_tiny_pretrain_dataset(root / "dataset")
    run = tiny_pretrain_config(data_paths=prefixes, dir=str(root / "runs" / "base"), hf_path=str(ckpt),
                               pretrained_checkpoint=str(ckpt), train_iters=30)
    # A fixed schedule length, so runs of different lengths share one LR curve.
    run.scheduler.lr_decay_iters = 30
    run.train.replica_check_interval = 1  # every step: a replica gone astray fails the test that caused it
    config = root / "base.yaml"
    save_yaml(run, config)
    sft_prefixes = write_tiny_sft_dataset(root / "sft")
    return {"root": root, "ckpt": ckpt, "prefixes": prefixes, "sft_prefixes": sft_prefixes, "config": config}


# A training run of the train stage's tests: 16 iterations, a checkpoint every 4.
OVERRIDES = {"train.train_iters": 16, "checkpoint.save_interval": 4, "train.eval_interval": 0,
             "scheduler.lr_decay_iters": 30}


@pytest.fixture(scope="module")
def store_inputs(train_env, tmp_path_factory):
    from gptoss_model.convert.hf_to_megatron import convert_hf_to_megatron
    from tasks.store import ArtifactStore, run_stage

    store = ArtifactStore((tmp_path_factory.mktemp("store") / "s").as_uri())

    def convert(staging: Path) -> dict:
        report = convert_hf_to_megatron(train_env["ckpt"], staging, dtype="float32")
        return {"params": report["params"]}

    def dataset(staging: Path) -> dict:
        names = []
        for prefix in train_env["prefixes"]:
            for ext in (".bin", ".idx"):
                shutil.copy(prefix + ext, staging / (Path(prefix).name + ext))
            names.append(Path(prefix).name)
        return {"data_prefixes": names}

    base = run_stage(store, stage="convert", code_version="test", kind="megatron-checkpoint", name="tiny",
                     params={}, build=convert).manifest
    data = run_stage(store, stage="preprocess", code_version="test", kind="dataset", name="docs",
                     params={}, build=dataset).manifest
    return store, base, data
