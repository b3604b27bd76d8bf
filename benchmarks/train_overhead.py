"""Our training loop's time per step vs a bare megatron-core loop, same model, same data, one run.

    .venv/bin/python benchmarks/train_overhead.py [--rounds 6] [--steps 10]

Both loops drive the same model chunks and optimizer (world of one, CPU, the tiny
GPT-OSS, global batch 8 x 64 tokens in micro-batches of 2):
  ours  Trainer.step() + the metrics writer (stdout off, JSONL and TensorBoard on):
        batches read from GPTDataset at the consumed-samples position, per-token loss,
        loss reduction, NaN/Inf guard, LR scheduler, FLOP/memory accounting;
  bare  zero_grad_buffer + megatron's forward_backward_func over micro-batches already
        in memory + optimizer.step(), nothing else.
Rounds alternate (ours, bare, ours, ...) so machine load hits both alike; the figure
is the median step time of each. Target: overhead < 3%.
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--rounds", type=int, default=6)
    ap.add_argument("--steps", type=int, default=10)
    args = ap.parse_args()
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    import torch

    from gptoss_model.settings import settings

    torch.set_num_threads(settings().omp_num_threads)
    from gptoss_model.model import parallel
    from gptoss_model.recipes import tiny_pretrain_config
    from gptoss_model.checkpoint.tiny import write_tiny_checkpoint
    from gptoss_model.training.loop import Trainer, _forward_step
    from tests.train.data import write_tiny_pretrain_dataset

    root = Path(tempfile.mkdtemp(prefix="gptoss-train-bench-"))
    ckpt = write_tiny_checkpoint(root / "hf", dtype="float32", seed=0)
    run = tiny_pretrain_config(data_paths=write_tiny_pretrain_dataset(root / "data"), dir=str(root / "run"),
                               hf_path=str(ckpt), pretrained_checkpoint=str(ckpt),
                               train_iters=10 ** 6, lr_warmup_iters=1)
    run.checkpoint.save_interval = 0
    run.train.eval_interval = 0
    trainer = Trainer(run)
    nmb = trainer.num_microbatches
    batches = list(trainer.train_batches.step(0, nmb))  # the bare loop's data, in memory

    def ours() -> float:
        t = time.perf_counter()
        record = trainer.step()
        trainer.metrics.write(record, echo=False)
        return time.perf_counter() - t

    def bare() -> float:
        t = time.perf_counter()
        for c in trainer.chunks:
            c.zero_grad_buffer()
        trainer.optimizer.zero_grad()
        trainer.forward_backward(forward_step_func=_forward_step, data_iterator=iter(batches),
                                 model=trainer.chunks, num_microbatches=nmb, seq_length=run.data.seq_length,
                                 micro_batch_size=run.train.micro_batch_size, forward_only=False)
        trainer.optimizer.step()
        return time.perf_counter() - t

    for _ in range(3):  # warm-up: first-call allocations, lazy imports
        ours(), bare()
    times = {"ours": [], "bare": []}
    for r in range(args.rounds):
        for name, fn in (("ours", ours), ("bare", bare)) if r % 2 == 0 else (("bare", bare), ("ours", ours)):
            times[name] += [fn() for _ in range(args.steps)]
    trainer.metrics.close()
    med = {k: statistics.median(v) for k, v in times.items()}
    overhead = (med["ours"] - med["bare"]) / med["bare"] * 100
    print(f"tiny GPT-OSS, world 1, CPU ({torch.get_num_threads()} thread(s)), global batch "
          f"{run.train.global_batch_size} x {run.data.seq_length} tokens, {nmb} micro-batches, "
          f"{args.rounds * args.steps} steps each")
    print(f"bare megatron-core loop : {med['bare'] * 1e3:8.2f} ms/step (median; min "
          f"{min(times['bare']) * 1e3:.2f})")
    print(f"our training loop       : {med['ours'] * 1e3:8.2f} ms/step (median; min "
          f"{min(times['ours']) * 1e3:.2f})")
    print(f"overhead                : {overhead:+.2f}% (target < 3%)")
    parallel.destroy()


if __name__ == "__main__":
    main()
