"""torchrun worker: several training runs in one launch (one process group, layouts rebuilt per run).

    torchrun --nproc-per-node 2 tests/train/worker.py SPEC_JSON OUT_JSON

SPEC_JSON: {"runs": [{"name": ..., "config": YAML path, "overrides": [...]}, ...]}.
Rank 0 writes {name: {"summary": ..., "metrics": [records], "base_unchanged": bool}} to
OUT_JSON; `base_unchanged` (every rank's non-adapter parameters bitwise equal before and
after training) is reported for LoRA/DoRA runs.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import torch.distributed as dist  # noqa: E402

from gptoss_model import parallel  # noqa: E402
from gptoss_model.train import load_run_config  # noqa: E402
import torch  # noqa: E402

from gptoss_model.training.loop import Trainer  # noqa: E402
from gptoss_model.training.metrics import read_metrics  # noqa: E402


def main(spec_path: str, out: str) -> None:
    spec = json.loads(Path(spec_path).read_text())
    results = {}
    for item in spec["runs"]:
        run = load_run_config(item["config"], item.get("overrides", []))
        trainer = Trainer(run)
        params = dict(trainer.chunks[0].named_parameters())
        base = {n: p.detach().clone() for n, p in params.items() if ".adapter." not in n}
        summary = trainer.fit()
        same = torch.tensor([int(all(torch.equal(params[n].detach(), v) for n, v in base.items()))])
        dist.all_reduce(same, op=dist.ReduceOp.MIN)
        if dist.get_rank() == 0:
            results[item["name"]] = {"summary": summary, "metrics": read_metrics(run.metrics_path()),
                                     "base_unchanged": bool(same.item()),
                                     "trainable": sum(p.numel() for p in params.values() if p.requires_grad)}
            print(item["name"], "done", flush=True)
    if dist.get_rank() == 0:
        Path(out).write_text(json.dumps(results, indent=1, default=str))
    parallel.destroy()


if __name__ == "__main__":
    main(*sys.argv[1:])
