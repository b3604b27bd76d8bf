"""Bytes from the store, the Hub or a shared work dir never run: a payload planted in every
pickle a checkpoint or a conversion's work dir holds is refused, naming the file, and the
marker file the payload would create never appears.

Readers covered: the export reader (MegatronCheckpointReader), the megatron load that verify
and training's pretrained weights use (load_megatron_checkpoint), convert's resume markers,
training's resume (common.pt and the byte items in .distcp: the RNG state), and a grep that
every unpickling call in the project goes through the safe loaders.
"""
from __future__ import annotations

import io
import os
import pickle
import re
import shutil
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[2]


class Payload:
    """Unpickling this creates `marker` (what an attacker's code would do, harmlessly)."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return open, (self.marker, "w")


def _payload(marker: Path) -> bytes:
    return pickle.dumps(Payload(marker))


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    from gptoss_model.convert.hf_to_megatron import convert_hf_to_megatron
    from gptoss_model.checkpoint.tiny import write_tiny_checkpoint

    root = tmp_path_factory.mktemp("hostile")
    hf = write_tiny_checkpoint(root / "hf", dtype="float32", seed=3)
    convert_hf_to_megatron(hf, root / "megatron", dtype="float32")
    return hf, root / "megatron"


def _tampered(converted, tmp_path, name: str, data: bytes) -> Path:
    _, megatron = converted
    copy = tmp_path / "tampered"
    shutil.copytree(megatron, copy)
    (copy / "iter_0000000" / name).write_bytes(data)
    return copy


def test_a_planted_metadata_pickle_never_runs_in_the_export_reader(converted, tmp_path):
    from gptoss_model.model.config import GptOssModelConfig
    from gptoss_model.checkpoint.megatron_reader import MegatronCheckpointReader
    from gptoss_model.system.safe_unpickle import UnsafePickleError

    hf, _ = converted
    marker = tmp_path / "pwned"
    ckpt = _tampered(converted, tmp_path, ".metadata", _payload(marker))
    with pytest.raises(UnsafePickleError, match=r"\.metadata: refused to unpickle (builtins|io)\.open"):
        with MegatronCheckpointReader(ckpt, GptOssModelConfig.from_hf_config(hf)) as reader:
            reader.validate()
    assert not marker.exists()


def test_a_planted_metadata_pickle_never_runs_in_a_megatron_load(converted, tmp_path):
    """What verify (after convert) and training's checkpoint.pretrained_checkpoint load through."""
    from gptoss_model.checkpoint.layout import build_model, load_megatron_checkpoint
    from gptoss_model.model.config import GptOssModelConfig
    from gptoss_model.model.parallel import world_of_one
    from gptoss_model.system.safe_unpickle import UnsafePickleError

    hf, _ = converted
    marker = tmp_path / "pwned"
    ckpt = _tampered(converted, tmp_path, ".metadata", _payload(marker))
    with world_of_one("hostile load"):
        model = build_model(GptOssModelConfig.from_hf_config(hf), torch.float32)
        with pytest.raises(UnsafePickleError, match=r"\.metadata: refused to unpickle (builtins|io)\.open"):
            load_megatron_checkpoint(model, ckpt)
    assert not marker.exists()


def test_checkpoint_byte_items_and_common_state_load_weights_only(tmp_path):
    """The .distcp byte items (RNG state, _extra_state) go through safe_torch_load; common.pt
    through megatron's torch.load, which torch 2.13 makes weights-only by default."""
    from megatron.core.dist_checkpointing import load_common_state_dict

    from gptoss_model.system.safe_unpickle import UnsafePickleError, install, refusals_named, safe_torch_load

    install()
    marker = tmp_path / "pwned"
    with pytest.raises(UnsafePickleError, match="rng_state: refused to unpickle"):
        safe_torch_load(io.BytesIO(_payload(marker)), "rng_state")
    import numpy as np
    import random

    state = {"random": random.getstate(), "np": np.random.get_state(), "torch": torch.get_rng_state()}
    buf = io.BytesIO()
    torch.save(state, buf)
    buf.seek(0)
    back = safe_torch_load(buf)  # what a real checkpoint's RNG state holds still loads
    assert back["random"] == state["random"] and np.array_equal(back["np"][1], state["np"][1])
    (tmp_path / "ckpt").mkdir()
    (tmp_path / "ckpt" / "metadata.json").write_text('{"sharded_backend": "torch_dist", "sharded_backend_version": '
                                                     '1, "common_backend": "torch", "common_backend_version": 1}')
    (tmp_path / "ckpt" / "common.pt").write_bytes(_payload(marker))
    with pytest.raises(UnsafePickleError, match="refused to unpickle a checkpoint file: Weights only load failed"):
        with refusals_named():
            load_common_state_dict(str(tmp_path / "ckpt"))
    assert not marker.exists()


def test_a_planted_convert_resume_marker_never_runs(converted, tmp_path):
    from gptoss_model.convert.writer import finished_chunks
    from gptoss_model.system.safe_unpickle import UnsafePickleError

    state, marker = tmp_path / ".convert", tmp_path / "pwned"
    state.mkdir()
    (state / "0.done").write_bytes(_payload(marker))
    with pytest.raises(UnsafePickleError, match=r"0\.done: refused to unpickle (builtins|io)\.open"):
        finished_chunks(state, tmp_path)
    assert not marker.exists()
    if os.geteuid() == 0:  # a marker another user planted is not even read
        os.chown(state / "0.done", 65534, 65534)
        with pytest.raises(UnsafePickleError, match=r"0\.done: written by uid 65534, not by this user"):
            finished_chunks(state, tmp_path)


UNPICKLING = re.compile(r"\bpickle\.loads?\(|\btorch\.load\(|\bFileSystemReader\(|\bUnpickler\(")
SAFE_SITES = {  # file: why its unpickling is safe
    "gptoss_model/system/safe_unpickle.py": "the safe loaders themselves",
    "gptoss_model/checkpoint/megatron_reader.py": "FileSystemReader, whose read_metadata install() restricted",
}


def test_every_unpickling_call_goes_through_the_safe_loaders():
    found = {}
    for folder in ("gptoss_model", "tasks", "flows"):
        for path in (REPO / folder).rglob("*.py"):
            for n, line in enumerate(path.read_text().splitlines(), 1):
                code = line.split("#", 1)[0]
                if UNPICKLING.search(code) and "weights_only=True" not in code:
                    found.setdefault(str(path.relative_to(REPO)), []).append(f"{n}: {line.strip()}")
    unexpected = {f: lines for f, lines in found.items() if f not in SAFE_SITES}
    assert not unexpected, f"unpickling outside the safe loaders: {unexpected}"
    from gptoss_model.checkpoint import layout as checkpoint_layout  # noqa: F401 - installs on import
    from torch.distributed.checkpoint.default_planner import DefaultLoadPlanner
    from torch.distributed.checkpoint.filesystem import FileSystemReader

    assert getattr(FileSystemReader.read_metadata, "_gptoss_restricted", False)
    assert DefaultLoadPlanner.load_bytes.__module__ == "gptoss_model.system.safe_unpickle"


@pytest.mark.slow
def test_a_tampered_checkpoint_in_the_store_is_refused_by_the_export_and_train_stages(converted, tmp_path):
    """Whoever can write to the store can commit a checkpoint with a planted .metadata (the manifest's
    sha256 then matches it). The export stage refuses it; the train stage, using it as the base
    checkpoint, stops with a permanent error (no retry pulling the same bytes again)."""
    from gptoss_model.errors import PermanentError
    from gptoss_model.system.safe_unpickle import UnsafePickleError
    from tasks.common import StoreSettings
    from tasks.export import ExportParams, run_export
    from tasks.store import ArtifactStore, run_stage
    from tasks.train import TrainingRefused, TrainParams, run_train
    from tests.artifacts import commit_directory
    from tests.train.data import write_tiny_pretrain_dataset

    hf, _ = converted
    marker = tmp_path / "pwned"
    url = (tmp_path / "store").as_uri()
    store, settings = ArtifactStore(url), StoreSettings(url=url)
    source = commit_directory(store, hf, name="tiny/source")
    base = commit_directory(store, _tampered(converted, tmp_path, ".metadata", _payload(marker)), name="tiny/base",
                            kind="megatron-checkpoint", stage="convert")
    with pytest.raises(UnsafePickleError, match=r"\.metadata: refused to unpickle"):
        run_export(ExportParams(source=base.spec, hf_source=source.spec, workdir=str(tmp_path / "e"),
                                store=settings), store)
    assert not marker.exists()

    prefixes = write_tiny_pretrain_dataset(tmp_path / "data")

    def dataset(staging: Path) -> dict:  # as the preprocess stage commits one
        for prefix in prefixes:
            for ext in (".bin", ".idx"):
                shutil.copy(prefix + ext, staging / (Path(prefix).name + ext))
        return {"data_prefixes": [Path(p).name for p in prefixes]}

    data = run_stage(store, stage="preprocess", code_version="test", kind="dataset", name="tiny/docs", params={},
                     build=dataset).manifest
    params = TrainParams(recipe="tiny_pretrain", overrides={"train.train_iters": 4, "scheduler.lr_warmup_iters": 1, "train.eval_interval": 0},
                         base_checkpoint=base.spec, dataset=data.spec, name="hostile", workdir=str(tmp_path / "w"),
                         store=settings)
    with pytest.raises(TrainingRefused, match=r"refused to unpickle") as refused:
        run_train(params, store)
    assert isinstance(refused.value, PermanentError)
    assert not marker.exists()
