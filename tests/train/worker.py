"""torchrun worker: several training runs in one launch (one process group, layouts rebuilt per run).

    torchrun --nproc-per-node 2 tests/train/worker.py SPEC_JSON OUT_JSON

SPEC_JSON: {"runs": [{"name": ..., "config": YAML path, "overrides": [...],
                      "perturb": {"rank": R, "after": K, "param": NAME}}, ...]} ("perturb" optional:
rank R adds 1e-6 to one copy of parameter NAME after step K, a replica gone astray).
Rank 0 writes {name: {"summary": ..., "metrics": [records], "base_unchanged": bool,
"grad_norms": {rank: [per step]}, "tp_replicas": {rank: {"tp_group": [...], "sha256": {name: hex}}},
"error": message of a ReplicaDivergenceError}} to OUT_JSON. `base_unchanged` (every rank's
non-adapter parameters bitwise equal before and after training) is for LoRA/DoRA runs;
`tp_replicas` hashes, on every rank, the parameters tensor parallelism does not split, so the
test can compare the TP ranks' copies itself (independently of the trainer's own check).
"""
from __future__ import annotations

import hashlib
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import torch.distributed as dist  # noqa: E402

from gptoss_model.model import parallel  # noqa: E402
from gptoss_model.train import load_run_config  # noqa: E402
import torch  # noqa: E402

from gptoss_model.model.parallel import unwrap_model  # noqa: E402
from gptoss_model.training.loop import Trainer  # noqa: E402
from gptoss_model.training.replicas import ReplicaDivergenceError  # noqa: E402
from gptoss_model.training.metrics import read_metrics  # noqa: E402


def _record_grad_norms(trainer, perturb: dict | None) -> list[float]:
    """This rank's grad norm of every step; with `perturb`, one copy of a parameter nudged."""
    norms, step = [], trainer.step

    def recording_step():
        record = step()
        norms.append(record["grad_norm"])
        if perturb and dist.get_rank() == perturb["rank"] and trainer.iteration == perturb["after"]:
            with torch.no_grad():
                dict(unwrap_model(trainer.chunks[0]).named_parameters())[perturb["param"]].add_(1e-6)
        return record

    trainer.step = recording_step
    return norms


def _tp_replica_hashes(chunk) -> dict:
    from megatron.core import parallel_state as ps

    return {"tp_group": dist.get_process_group_ranks(ps.get_tensor_model_parallel_group()),
            "sha256": {n: hashlib.sha256(p.detach().cpu().numpy().tobytes()).hexdigest()
                       for n, p in unwrap_model(chunk).named_parameters()
                       if not getattr(p, "tensor_model_parallel", False) and getattr(p, "allreduce", True)}}


def main(spec_path: str, out: str) -> None:
    spec = json.loads(Path(spec_path).read_text())
    results = {}
    for item in spec["runs"]:
        run = load_run_config(item["config"], item.get("overrides", []))
        trainer = Trainer(run)
        params = dict(trainer.chunks[0].named_parameters())
        base = {n: p.detach().clone() for n, p in params.items() if ".adapter." not in n}
        norms = _record_grad_norms(trainer, item.get("perturb"))
        error = None
        try:
            summary = trainer.fit()
        except ReplicaDivergenceError as e:
            summary, error = None, str(e)
        same = torch.tensor([int(all(torch.equal(params[n].detach(), v) for n, v in base.items()))])
        dist.all_reduce(same, op=dist.ReduceOp.MIN)
        every_norms = [None] * dist.get_world_size()
        dist.all_gather_object(every_norms, norms)
        replicas = [None] * dist.get_world_size()
        dist.all_gather_object(replicas, _tp_replica_hashes(trainer.chunks[0]))
        if dist.get_rank() == 0:
            results[item["name"]] = {"summary": summary, "metrics": read_metrics(run.metrics_path()),
                                     "base_unchanged": bool(same.item()), "error": error,
                                     "grad_norms": dict(enumerate(every_norms)),
                                     "tp_replicas": dict(enumerate(replicas)),
                                     "trainable": sum(p.numel() for p in params.values() if p.requires_grad)}
            print(item["name"], "done", flush=True)
    if dist.get_rank() == 0:
        Path(out).write_text(json.dumps(results, indent=1, default=str))
    parallel.destroy()


if __name__ == "__main__":
    main(*sys.argv[1:])
