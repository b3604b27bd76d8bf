"""The demo: its source checkpoint is written whole or not at all, and its Prefect
server dies with it (even by kill -9)."""
from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from flows import cli

ROOT = Path(__file__).resolve().parents[2]


def test_demo_source_is_written_whole_or_not_at_all(tmp_path, monkeypatch):
    from gptoss_model.checkpoint import tiny as tiny_checkpoint

    source = tmp_path / "demo" / "tiny-gpt-oss"
    real = tiny_checkpoint.write_tiny_checkpoint

    def killed_after_config(path, **kw):
        (Path(path) / "config.json").write_text("{}")
        raise KeyboardInterrupt  # the demo dies right after config.json

    monkeypatch.setattr(tiny_checkpoint, "write_tiny_checkpoint", killed_after_config)
    with pytest.raises(KeyboardInterrupt):
        cli.ensure_demo_source(source)
    left = [p.name for p in source.parent.iterdir()]
    assert left == [".tiny-gpt-oss.lock"]  # neither a half source nor a temp dir (the lock file stays)

    monkeypatch.setattr(tiny_checkpoint, "write_tiny_checkpoint", real)
    cli.ensure_demo_source(source)
    assert cli._complete_checkpoint(source)
    mtime = (source / "config.json").stat().st_mtime
    cli.ensure_demo_source(source)  # complete: reused as is
    assert (source / "config.json").stat().st_mtime == mtime

    partial = tmp_path / "older-partial"
    partial.mkdir()
    (partial / "config.json").write_text("{}")  # what an older, killed demo left
    with pytest.raises(FileExistsError, match=rf"{partial} exists but is not a complete checkpoint"):
        cli.ensure_demo_source(partial)


def test_demos_started_together_share_one_source(tmp_path):
    """Two demos in a fresh directory at once: one writes the source, the other waits and reuses it
    (both raced to rename their temp dirs into place: 'Directory not empty')."""
    import threading

    source = tmp_path / "demo" / "tiny-gpt-oss"
    errors: list[BaseException] = []

    def demo():
        try:
            cli.ensure_demo_source(source)
        except BaseException as e:  # noqa: BLE001 - the test inspects it
            errors.append(e)

    runs = [threading.Thread(target=demo) for _ in range(3)]
    for t in runs:
        t.start()
    for t in runs:
        t.join(timeout=120)
    assert not errors, errors
    assert cli._complete_checkpoint(source)
    assert not [p for p in source.parent.iterdir() if ".partial-" in p.name]


CHILD = """
import os, sys, time
from pathlib import Path
from flows.local_server import local_prefect_server
with local_prefect_server(Path(sys.argv[1])) as url:
    print("UP", url, flush=True)
    time.sleep(600)
"""


@pytest.mark.slow
@pytest.mark.timeout(240)
def test_demo_server_dies_with_a_killed_demo(tmp_path):
    import psutil

    env = {k: v for k, v in os.environ.items() if k != "PREFECT_API_URL"}
    env.update(PREFECT_HOME=str(tmp_path / "home"), PYTHONPATH=str(ROOT))
    demo = subprocess.Popen([sys.executable, "-c", CHILD, str(tmp_path / "server.log")], stdout=subprocess.PIPE,
                            text=True, env=env, cwd=ROOT)
    try:
        line = demo.stdout.readline()
        assert line.startswith("UP http://127.0.0.1:"), (tmp_path / "server.log").read_text()[-3000:]
        servers = psutil.Process(demo.pid).children(recursive=True)
        assert servers and any("server" in " ".join(p.cmdline()) for p in servers)
    finally:
        os.kill(demo.pid, signal.SIGKILL)
        demo.wait()
    started = time.monotonic()
    gone, alive = psutil.wait_procs(servers, timeout=30)
    print(f"server gone {time.monotonic() - started:.1f} s after kill -9 of the demo")
    for p in alive:
        p.kill()
    assert not alive, [p.cmdline() for p in alive]


@pytest.mark.slow
@pytest.mark.timeout(400)
def test_kill_9_of_a_pipeline_run_while_it_trains_leaves_no_process(tmp_path):
    """The whole pipeline (`gptoss demo`: its Prefect server, every stage in one process) killed
    with SIGKILL while torchrun trains: no process it started is left 5 s later (the server, torchrun,
    the rank, the rank's guard and checkpoint writer, multiprocessing's helpers)."""
    import psutil
    import yaml

    from tests.processes import kill_alone_and_count_survivors

    config = yaml.safe_load((ROOT / "configs" / "demo.yaml").read_text())
    config["download"]["source_url"] = str(tmp_path / "source")
    config["preprocess"]["inputs"] = [str(ROOT / "configs" / "demo-corpus.jsonl")]
    config["train"]["overrides"].update({"train.train_iters": 100_000, "checkpoint.save_interval": 5})
    (tmp_path / "demo.yaml").write_text(yaml.safe_dump(config))
    env = {k: v for k, v in os.environ.items() if k != "PREFECT_API_URL"}
    env.update(PREFECT_HOME=str(tmp_path / "home"), PYTHONPATH=str(ROOT), GPTOSS_WORKDIR=str(tmp_path / "work"),
               OMP_NUM_THREADS="1")
    demo = subprocess.Popen([sys.executable, "-m", "flows.cli", "demo", "--config", str(tmp_path / "demo.yaml"),
                             "--store", (tmp_path / "store").as_uri()], cwd=ROOT, env=env, start_new_session=True,
                            stdout=(tmp_path / "demo.log").open("w"), stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 300
        while not list((tmp_path / "work").glob("train-*/checkpoints/iter_0000005")):
            assert demo.poll() is None, (tmp_path / "demo.log").read_text()[-4000:]
            assert time.monotonic() < deadline, "training never saved its first checkpoint"
            time.sleep(0.2)
        tree = psutil.Process(demo.pid).children(recursive=True)
        assert any("torch.distributed.run" in " ".join(p.cmdline()) for p in tree), [p.cmdline()[:4] for p in tree]
        assert not kill_alone_and_count_survivors(demo, "the pipeline while training")
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(demo.pid, signal.SIGKILL)
