"""Sharded conversion: N workers write the same bytes as one; a failed attempt is resumed, not redone."""
from __future__ import annotations

import contextlib
import hashlib
import json

import pytest
import torch

from gptoss_model.convert import hf_to_megatron as convert, writer as convert_writer
from gptoss_model.verify import parity as verify
from gptoss_model.checkpoint.tiny import write_tiny_checkpoint


def digest(root):
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def source(tmp_path_factory):
    return write_tiny_checkpoint(tmp_path_factory.mktemp("hf") / "mxfp4", dtype="bfloat16", mxfp4=True, seed=5)


@pytest.fixture(scope="module")
def reference(source, tmp_path_factory):
    out = tmp_path_factory.mktemp("ref") / "megatron"
    report = convert.convert_hf_to_megatron(source, out, workers=1)
    return out, digest(out), report


def test_two_workers_write_the_bytes_one_worker_writes(source, reference, tmp_path):
    ref_dir, ref_digest, ref_report = reference
    seen = []
    report = convert.convert_hf_to_megatron(source, tmp_path / "m", workers=2,
                                            progress=lambda done, total: seen.append((done, total)))
    print(f"\n1 worker: {ref_report['seconds']} s; 2 workers: {report['seconds']} s, "
          f"worker peak RSS {report['peak_worker_rss_mb']} MB")
    assert digest(tmp_path / "m") == ref_digest
    written = report["chunks_written"]
    assert written["spawned_workers"] >= 1 and sum(written.values()) == report["chunks"], written
    # One file per structural chunk: embedding, each layer, the head.
    layers = json.loads((source / "config.json").read_text())["num_hidden_layers"]
    assert report["chunks"] == layers + 2
    assert sorted(p.name for p in (tmp_path / "m" / "iter_0000000").glob("*.distcp")) == \
        sorted(f"__{i}_0.distcp" for i in range(layers + 2))
    assert not (tmp_path / "m" / convert.STATE_DIR).exists()
    assert seen[-1] == (report["tensors"], report["tensors"]) and report["peak_worker_rss_mb"] > 0
    gate = verify.parity_check(tmp_path / "m", source, dtype="bfloat16")
    assert gate["max_abs_logit_diff"] < 1e-4


def test_failed_attempt_is_resumed_without_rewriting_finished_chunks(source, reference, tmp_path, monkeypatch):
    _, ref_digest, _ = reference
    out = tmp_path / "m"
    real = convert_writer.write_chunk
    written = []

    def dies_on_third_chunk(chunk, *a, **k):
        if len(written) == 2:
            raise OSError("disk went away")
        written.append(chunk.index)
        return real(chunk, *a, **k)

    monkeypatch.setattr(convert_writer, "write_chunk", dies_on_third_chunk)
    with pytest.raises(OSError, match="disk went away"):
        convert.convert_hf_to_megatron(source, out, workers=1)
    assert not (out / convert.TRACKER_FILE).exists()  # never loadable half-written
    monkeypatch.setattr(convert_writer, "write_chunk", lambda chunk, *a, **k: (written.append(chunk.index),
                                                                               real(chunk, *a, **k))[1])
    # A finished chunk whose file vanished is not trusted: it is written again.
    (out / "iter_0000000" / "__1_0.distcp").unlink()
    report = convert.convert_hf_to_megatron(source, out, workers=1)
    assert report["chunks_resumed"] == 1 and written[:2] == [0, 1] and sorted(written[2:]) == \
        list(range(1, report["chunks"]))
    assert digest(out) == ref_digest

    # Converting into a finished output is a no-op; into someone else's partial output, an error.
    again = convert.convert_hf_to_megatron(source, out, workers=1)
    assert again["already_complete"] and digest(out) == ref_digest
    with pytest.raises(convert.ConversionError, match="not empty"):
        convert.convert_hf_to_megatron(source, out, dtype="float32")
    with pytest.raises(convert.ConversionError, match="not empty"):
        convert.convert_hf_to_megatron(source, out, resume=False)


def test_plan_order_is_the_order_torchs_writer_asks_for_with_or_without_cuda(source):
    """FileSystemWriter asks for byte items first, then tensors in plan order (its serial loader,
    no CUDA) or stably sorted by size (its overlapping loader, used when CUDA is available; a GPU
    machine's conversion failed on that before). The converter prepares tensors in plan order,
    so every chunk's order must be a fixed point of both."""
    from megatron.core.dist_checkpointing.mapping import apply_factories
    from torch.distributed.checkpoint.filesystem import _item_size
    from torch.distributed.checkpoint.planner import WriteItemType

    from gptoss_model.checkpoint.layout import build_model, megatron_state_dict
    from gptoss_model.model.config import GptOssModelConfig
    from gptoss_model.convert.plan import plan_checkpoint
    from gptoss_model.model.parallel import world_of_one

    cfg = GptOssModelConfig.from_hf_config(source)
    with world_of_one("the plan test"):
        model = build_model(cfg, torch.bfloat16, device="meta")
        state = megatron_state_dict(model)
        apply_factories(state["model"])
        plan = plan_checkpoint({"model": state["model"]}, dict(model.state_dict(keep_vars=True)),
                               cfg.num_layers, "bfloat16", "fingerprint")
    sizes_vary = False
    for chunk in plan.chunks:
        kinds = [i.type == WriteItemType.BYTE_IO for i in chunk.items]
        assert kinds == sorted(kinds, reverse=True)  # byte items first
        tensors = [i for i in chunk.items if i.type != WriteItemType.BYTE_IO]
        assert sorted(tensors, key=_item_size) == tensors
        sizes_vary |= len({_item_size(i) for i in tensors}) > 1
    assert sizes_vary  # the sort has something to reorder


def test_conversion_where_the_writer_asks_in_size_order_as_with_cuda(source, reference, tmp_path, monkeypatch):
    """With CUDA present torch's writer loads tensors sorted by size (`_OverlappingCpuLoader`);
    emulated here on CPU: the conversion still runs and writes the same bytes."""
    import operator

    from torch.distributed.checkpoint import filesystem

    class SizeOrderedLoader(filesystem._SerialCpuLoader):
        def start_loading(self) -> None:
            self.items.sort(key=operator.itemgetter(0))  # what _OverlappingCpuLoader.start_loading does

    monkeypatch.setattr(filesystem, "_SerialCpuLoader", SizeOrderedLoader)
    out = tmp_path / "megatron"
    convert.convert_hf_to_megatron(source, out, workers=1)
    assert digest(out) == reference[1]


def test_kill_9_of_the_converter_alone_takes_its_workers_with_it(source, tmp_path):
    """SIGKILL of the converting process (not its group): its spawned workers die of their
    parent-death signal; none is left 5 s later."""
    import os
    import signal
    import subprocess
    import sys
    import time

    import psutil

    from tests.processes import kill_alone_and_count_survivors

    code = ("import sys; from gptoss_model.convert.hf_to_megatron import convert_hf_to_megatron; "
            "convert_hf_to_megatron(sys.argv[1], sys.argv[2], workers=2)")
    child = subprocess.Popen([sys.executable, "-c", code, str(source), str(tmp_path / "m")],
                             start_new_session=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    try:
        deadline = time.monotonic() + 120
        while len(psutil.Process(child.pid).children(recursive=True)) < 2:  # a worker and its tracker
            assert child.poll() is None, "the conversion finished before its workers started"
            assert time.monotonic() < deadline
            time.sleep(0.01)
        assert not kill_alone_and_count_survivors(child, "the converter")
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(child.pid, signal.SIGKILL)
