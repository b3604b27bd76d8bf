"""Session fixtures for the training tests: a tiny fp32 GPT-OSS checkpoint, a real-text
pretraining dataset in the dataset artifact's layout, and the base run config (YAML)."""
from __future__ import annotations

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
