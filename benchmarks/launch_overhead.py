"""Launch overhead: from the train stage's start to the first training step, and the time per step,
for the same tiny run (world 2, EP2) launched three ways on this host:

    local 1x2   one torchrun agent, two processes
    local 2x1   two agents (a multi-node run on one machine), one process each
    slurm 2x1   a 2-node Slurm job on the test cluster (two slurmd here; tests/infra/slurm_cluster.py)

    python benchmarks/launch_overhead.py [--steps 30]

Prints a table; the README's Train section quotes it. Not a test: the figures depend on the machine.
"""
from __future__ import annotations

import argparse
import logging
import re
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def inputs(root: Path):
    from gptoss_model.checkpoint.tiny import write_tiny_checkpoint
    from gptoss_model.convert.hf_to_megatron import convert_hf_to_megatron
    from tasks.store import ArtifactStore, run_stage
    from tests.train.data import write_tiny_pretrain_dataset

    store = ArtifactStore((root / "store").as_uri())
    hf = write_tiny_checkpoint(root / "hf", dtype="float32", seed=0)
    def convert(staging: Path) -> dict:
        return {"params": convert_hf_to_megatron(hf, staging, dtype="float32")["params"]}

    base = run_stage(store, stage="convert", code_version="bench", kind="megatron-checkpoint", name="tiny", params={},
                     build=convert).manifest
    prefixes = write_tiny_pretrain_dataset(root / "dataset")

    def dataset(staging: Path) -> dict:
        import shutil

        names = []
        for prefix in prefixes:
            for suffix in (".bin", ".idx"):
                shutil.copy(prefix + suffix, staging / (Path(prefix).name + suffix))
            names.append(Path(prefix).name)
        return {"data_prefixes": names}

    data = run_stage(store, stage="preprocess", code_version="bench", kind="dataset", name="docs", params={},
                     build=dataset).manifest
    return store, base, data


class FirstStep(logging.Handler):
    """When rank 0's first `iteration 1 |` line reached the stage (the log streamed as it came)."""

    def __init__(self):
        super().__init__(logging.INFO)
        self.at = None

    def emit(self, record):
        if self.at is None and re.match(r"iteration\s+1 \|", record.getMessage()):
            self.at = time.monotonic()


def measure(name: str, launcher: dict, store, base, data, root: Path, steps: int) -> dict:
    from gptoss_model.training.metrics import read_metrics
    from tasks.train import TrainParams, resolve_run, run_dir, run_train

    params = TrainParams(recipe="tiny_pretrain", name=name.replace(" ", "-"), base_checkpoint=base.spec, dataset=data.spec,
                         launcher=launcher, workdir=str(root / "work"), store={"url": store.url}, overrides={
                             "train.train_iters": steps, "train.eval_interval": 0, "checkpoint.save_interval": 0,
                             "checkpoint.save_final": True, "parallelism.expert_model_parallel_size": 2})
    first = FirstStep()
    relay = logging.getLogger("gptoss_model.training.launch")
    relay.addHandler(first)
    relay.setLevel(logging.INFO)
    started = time.monotonic()
    try:
        run_train(params, store)
    finally:
        relay.removeHandler(first)
    total = time.monotonic() - started
    _, _, identity = resolve_run(params, store)
    step_s = [r["step_s"] for r in read_metrics(run_dir(params, identity) / "metrics.jsonl") if "step_s" in r][2:]
    return {"launch": name, "to first step (s)": round(first.at - started, 2) if first.at else None,
            "step (ms, median)": round(1000 * statistics.median(step_s), 1), "total (s)": round(total, 1)}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=30)
    args = parser.parse_args()
    from tests.infra.slurm_cluster import ensure_installed, start_cluster

    root = Path(tempfile.mkdtemp(prefix="gptoss-launch-bench-"))
    store, base, data = inputs(root)
    rows = [measure("local 1x2", {"kind": "local", "nodes": 1, "procs_per_node": 2}, store, base, data, root, args.steps),
            measure("local 2x1", {"kind": "local", "nodes": 2, "procs_per_node": 1}, store, base, data, root, args.steps)]
    why = ensure_installed()
    if why:
        print(f"slurm: skipped ({why})")
    else:
        import os

        cluster = start_cluster()
        os.environ.update(cluster.env)
        try:
            rows.append(measure("slurm 2x1", {"kind": "slurm", "nodes": 2, "procs_per_node": 1}, store, base, data,
                                root, args.steps))
        finally:
            cluster.stop()
    columns = list(rows[0])
    print("| " + " | ".join(columns) + " |")
    print("|" + "---|" * len(columns))
    for row in rows:
        print("| " + " | ".join(str(row[c]) for c in columns) + " |")
    single = rows[0]["step (ms, median)"]
    for row in rows[1:]:
        print(f"{row['launch']}: per-step overhead vs one agent {row['step (ms, median)'] - single:+.1f} ms "
              f"({100 * (row['step (ms, median)'] / single - 1):+.1f}%)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
