"""The training loop on megatron-core: DDP, megatron optimizer, LR schedule, schedules, checkpoints.

`train(run)` runs in every rank of a torchrun job (or alone: a world of one)
and returns rank 0's summary. Per iteration: zero grad buffers, megatron's
forward-backward function over the step's micro-batches (1F1B with PP>1),
per-token loss (grads scaled by the global token count in
finalize_model_grads), optimizer step with grad clipping, LR scheduler step,
metrics, NaN/Inf guard, validation, checkpoint, manual GC.
"""

from __future__ import annotations

import contextlib
import gc
import logging
import math
import time
from functools import partial
from pathlib import Path

import torch
import torch.distributed as dist

from gptoss_model.errors import PermanentError
from gptoss_model.training.config import RunConfig

log = logging.getLogger(__name__)


class SavedToStop(Exception):
    """The run saved a checkpoint and stopped because its stop file appeared (a restart resumes)."""


class NonFiniteLossError(PermanentError, FloatingPointError):
    """Loss or gradient norm became NaN/Inf; the last good checkpoint is kept untouched."""


def _loss_func(loss_mask: torch.Tensor, output_tensor: torch.Tensor):
    """Per-token loss: (sum over unmasked tokens, their count, reduced pair for logging)."""
    losses = output_tensor.float().reshape(-1)
    mask = loss_mask.reshape(-1).float()
    total = torch.sum(losses * mask)
    count = mask.sum().to(torch.int)
    return total, count, {"lm loss": torch.stack([total.detach(), mask.sum().detach()])}


def _forward_step(data_iterator, model):
    batch = next(data_iterator)
    out = model(batch["tokens"], batch["position_ids"], batch.get("attention_mask"), labels=batch["labels"])
    return out, partial(_loss_func, batch["loss_mask"])


def _to_device(batch: dict) -> dict:
    if torch.cuda.is_available():
        return {k: v.cuda(non_blocking=True) for k, v in batch.items()}
    return batch


def _reduce_loss(losses: list[dict]) -> torch.Tensor:
    """Global token-mean loss from the last pipeline stage's micro-batch pairs, on every rank."""
    from megatron.core import parallel_state as ps

    pair = torch.zeros(2, dtype=torch.float64)
    if ps.is_pipeline_last_stage(ignore_virtual=True):
        for d in losses:
            pair += d["lm loss"].double().cpu()
        if torch.cuda.is_available():
            pair = pair.cuda()
        dist.all_reduce(pair, group=ps.get_data_parallel_group())
    if torch.cuda.is_available():
        pair = pair.cuda()
    # Every rank learns the value: the last stage's pairs, zeros elsewhere, summed over PP.
    dist.all_reduce(pair, group=ps.get_pipeline_model_parallel_group())
    return (pair[0] / pair[1].clamp(min=1)).cpu()


def _last_good(run: RunConfig) -> str:
    from gptoss_model.training.checkpoint import iter_dir, latest_iteration

    try:
        last = latest_iteration(run.save_dir())
    except Exception:  # noqa: BLE001 - the message must not hide the non-finite value
        last = None
    return "none" if last is None else str(iter_dir(run.save_dir(), last))


class Trainer:
    """Everything one run holds; `step()` is one optimizer iteration."""

    def __init__(self, run: RunConfig):
        from megatron.core import parallel_state as ps
        from megatron.core.distributed import finalize_model_grads
        from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer
        from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler
        from megatron.core.pipeline_parallel import get_forward_backward_func
        from megatron.core.utils import get_model_config

        from gptoss_model.model import parallel
        from gptoss_model.training import data as data_mod
        from gptoss_model.training.metrics import MetricsWriter, flops_per_token
        from gptoss_model.training.model import build_chunks, layout_of, params_dtype
        from gptoss_model.training.preflight import model_config, preflight

        self.run = run
        parallel.init_distributed(timeout_minutes=run.train.collective_timeout_minutes)
        self.world = dist.get_world_size()
        if run.train.input_digests:
            self._verify_inputs(Path(run.train.input_digests))
        self.m = model_config(run)
        self.estimate = preflight(run, self.world, model=self.m)
        parallel.initialize(layout_of(run), seed=run.train.seed,
                            timeout_minutes=run.train.collective_timeout_minutes)
        self.rank0 = dist.get_rank() == 0
        if self.rank0:
            print(f"[gptoss train] {run.name}: world {self.world}, {self.estimate}", flush=True)
        self.dp = ps.get_data_parallel_world_size()
        tr = run.train
        self.num_microbatches = tr.global_batch_size // (tr.micro_batch_size * self.dp)
        self.chunks = build_chunks(run, self.m)
        bf16 = params_dtype(run) == torch.bfloat16
        o = run.optimizer
        self.optimizer = get_megatron_optimizer(OptimizerConfig(
            optimizer=o.optimizer, lr=o.lr, min_lr=o.min_lr, weight_decay=o.weight_decay,
            adam_beta1=o.adam_beta1, adam_beta2=o.adam_beta2, adam_eps=o.adam_eps, clip_grad=o.clip_grad,
            bf16=bf16, params_dtype=params_dtype(run),
            use_distributed_optimizer=run.parallelism.use_distributed_optimizer), self.chunks)
        gbs, s = tr.global_batch_size, run.scheduler
        self.scheduler = OptimizerParamScheduler(
            self.optimizer, init_lr=s.lr_warmup_init, max_lr=o.lr, min_lr=o.min_lr,
            lr_warmup_steps=s.lr_warmup_iters * gbs, lr_decay_steps=run.lr_decay_iters() * gbs,
            lr_decay_style=s.lr_decay_style, start_wd=o.weight_decay, end_wd=o.weight_decay,
            wd_incr_steps=tr.train_iters * gbs, wd_incr_style="constant")
        cfg = get_model_config(self.chunks[0])
        cfg.finalize_model_grads_func = finalize_model_grads
        cfg.grad_scale_func = self.optimizer.scale_loss
        cfg.no_sync_func = self.chunks[0].no_sync
        if run.parallelism.overlap_grad_reduce:
            cfg.grad_sync_func = self.chunks[0].start_grad_sync
        if run.parallelism.overlap_param_gather:
            cfg.param_sync_func = self.chunks[0].start_param_sync
        self.forward_backward = get_forward_backward_func()

        self.iteration, self.consumed = 0, 0
        self.resumed_from = None
        from gptoss_model.training.checkpoint import load_checkpoint

        restored = load_checkpoint(run, self.chunks, self.optimizer, self.scheduler)
        if restored:
            self.iteration, self.consumed = restored
            self.resumed_from = self.iteration

        train_samples = tr.train_iters * gbs
        valid_samples = (tr.train_iters // tr.eval_interval + 1) * tr.eval_iters * gbs if tr.eval_interval else 0
        if run.data.kind == "pretrain":
            train_ds, valid_ds = data_mod.build_pretrain_datasets(run, self.m.vocab_size, train_samples,
                                                                  valid_samples)
        else:
            from gptoss_model.training import sft

            train_ds, valid_ds = sft.build_sft_datasets(run)
        dp_rank = ps.get_data_parallel_rank()
        self.train_batches = data_mod.MicroBatches(train_ds, micro_batch_size=tr.micro_batch_size,
                                                   dp_size=self.dp, dp_rank=dp_rank)
        self.valid_batches = (data_mod.MicroBatches(valid_ds, micro_batch_size=tr.micro_batch_size,
                                                    dp_size=self.dp, dp_rank=dp_rank)
                              if valid_ds is not None and len(valid_ds) else None)
        self.metrics = MetricsWriter(run.metrics_path(), run.tensorboard_dir(), enabled=self.rank0)
        self.flops_per_token = flops_per_token(self.m, run.data.seq_length, peft=bool(run.peft.method))
        self.tokens_per_step = gbs * run.data.seq_length

    @staticmethod
    def _verify_inputs(digest_file: Path) -> None:
        from gptoss_model.settings import settings
        from gptoss_model.training.input_digests import verify_once_per_node

        env = settings()
        device = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else None
        summary = verify_once_per_node(digest_file, local_rank=env.local_rank, node=env.group_rank, device=device)
        if dist.get_rank() == 0:
            print(f"[gptoss train] {summary}", flush=True)

    # ------------------------------------------------------------ one step
    def _run_schedule(self, batches, forward_only: bool) -> list[dict]:
        tr = self.run.train
        return self.forward_backward(
            forward_step_func=_forward_step, data_iterator=(_to_device(b) for b in batches),
            model=self.chunks, num_microbatches=self.num_microbatches, seq_length=self.run.data.seq_length,
            micro_batch_size=tr.micro_batch_size, forward_only=forward_only)

    def step(self) -> dict:
        started = time.perf_counter()
        for c in self.chunks:
            c.zero_grad_buffer()
        self.optimizer.zero_grad()
        losses = self._run_schedule(self.train_batches.step(self.consumed, self.num_microbatches), False)
        update_ok, grad_norm, _ = self.optimizer.step()
        loss = _reduce_loss(losses).item()
        grad_norm = float(grad_norm) if grad_norm is not None else float("nan")
        bad = [f"{name} is {value}" for name, value in (("loss", loss), ("gradient norm", grad_norm))
               if not math.isfinite(value)]
        if bad and self.run.train.exit_on_nonfinite:
            raise NonFiniteLossError(
                f"iteration {self.iteration + 1}: {' and '.join(bad)}; stopped without saving "
                f"(last good checkpoint: {_last_good(self.run)}); lower optimizer.lr or check the data")
        if update_ok:
            self.scheduler.step(increment=self.run.train.global_batch_size)
        self.iteration += 1
        every = self.run.train.replica_check_interval
        if every and self.iteration % every == 0:
            from gptoss_model.training.replicas import check_replicas

            with self.params_gathered():
                check_replicas(self.chunks, grad_norm, self.iteration)
        self.consumed += self.run.train.global_batch_size
        elapsed = time.perf_counter() - started
        from gptoss_model.training.metrics import memory_gb

        return {"iteration": self.iteration, "loss": loss, "lr": self.optimizer.param_groups[0]["lr"],
                "grad_norm": grad_norm, "tokens_per_s": self.tokens_per_step / elapsed,
                "tflops_per_s_per_rank": self.flops_per_token * self.tokens_per_step / elapsed / self.world / 1e12,
                "step_s": elapsed, "mem_gb": memory_gb(), "consumed_samples": self.consumed}

    @contextlib.contextmanager
    def params_gathered(self):
        """Every parameter up to date on every rank. With overlap_param_gather the distributed
        optimizer's all-gather of updated shards waits for the next forward; checks, validation
        and saves must see the gathered weights (as Megatron-LM's training loop does)."""
        if not self.run.parallelism.overlap_param_gather:
            yield
            return
        for c in self.chunks:
            c.disable_forward_pre_hook()  # all-gathers synchronously
        try:
            yield
        finally:
            for c in self.chunks:
                c.enable_forward_pre_hook()

    @torch.no_grad()
    def evaluate(self) -> float | None:
        if self.valid_batches is None:
            return None
        for c in self.chunks:
            c.eval()
        total = []
        n = self.num_microbatches
        samples_per_eval = self.run.train.global_batch_size
        start = (self.iteration // max(self.run.train.eval_interval, 1)) * self.run.train.eval_iters
        for k in range(self.run.train.eval_iters):
            total += self._run_schedule(self.valid_batches.step((start + k) * samples_per_eval, n), True)
        for c in self.chunks:
            c.train()
        return _reduce_loss(total).item()

    def save(self) -> None:
        from gptoss_model.training.checkpoint import save_checkpoint

        t = time.perf_counter()
        path = save_checkpoint(self.run, self.chunks, self.optimizer, self.scheduler, self.iteration,
                               self.consumed)
        if self.rank0:
            print(f"[checkpoint] saved {path} in {time.perf_counter() - t:.2f} s", flush=True)

    def stop_requested(self, stop_file: str) -> bool:
        """Whether any rank sees `stop_file`: every rank must stop at the same iteration."""
        import os

        flag = torch.tensor([1.0 if os.path.exists(stop_file) else 0.0])
        if torch.cuda.is_available():
            flag = flag.cuda()
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return bool(flag.item())

    # ------------------------------------------------------------ the run
    def fit(self) -> dict:
        tr, ck = self.run.train, self.run.checkpoint
        if tr.manual_gc:
            gc.disable()
            gc.collect()
        last = {}
        try:
            from gptoss_model.training.watchdog import Watchdog

            with Watchdog(tr.hang_timeout) as dog:
                while self.iteration < tr.train_iters:
                    dog.phase(self.iteration, "training step")
                    last = self.step()
                    if self.iteration % self.run.logging.log_interval == 0 or self.iteration == tr.train_iters:
                        self.metrics.write(last)
                    if tr.eval_interval and self.iteration % tr.eval_interval == 0:
                        dog.phase(self.iteration, "validation")
                        with self.params_gathered():
                            val = self.evaluate()
                        if val is not None:
                            self.metrics.write({"iteration": self.iteration, "val_loss": val})
                    if (ck.save_interval and self.iteration % ck.save_interval == 0) or (
                            ck.save_final and self.iteration == tr.train_iters):
                        dog.phase(self.iteration, "checkpoint save")
                        with self.params_gathered():
                            self.save()
                    if tr.manual_gc and tr.manual_gc_interval and self.iteration % tr.manual_gc_interval == 0:
                        gc.collect()
                    if tr.stop_file and self.iteration < tr.train_iters and self.stop_requested(tr.stop_file):
                        dog.phase(self.iteration, "checkpoint save before stopping")
                        if not (ck.save_interval and self.iteration % ck.save_interval == 0):
                            with self.params_gathered():
                                self.save()
                        raise SavedToStop(f"{tr.stop_file} appeared: saved iteration {self.iteration} and "
                                          "stopped; a restart resumes from it")
                dog.phase(self.iteration, "done")
        finally:
            if tr.manual_gc:
                gc.enable()
            self.metrics.close()
        return {"iteration": self.iteration, "consumed_samples": self.consumed, "resumed_from": self.resumed_from,
                "last": last}


def train(run: RunConfig) -> dict:
    """Run (or resume) `run` to train.train_iters; rank 0's summary."""
    return Trainer(run).fit()
