"""torchrun worker: logits + gradient parity vs transformers for several layouts in one launch.

    torchrun --nproc-per-node 2 tests/model/dist_worker.py CKPT_DIR OUT_JSON

Every layout goes through the public API (AutoBridge -> provider ->
provide_distributed_model), trains one micro-batch with megatron's pipeline
schedule + DDP + finalize_model_grads, and compares each rank's own slice of
logits and of every gradient with the reference. Two control runs disable
`fix_expert_grad_tags` to show that the comparison catches megatron-core's
wrong-gradient layouts. Rank 0 writes the worst figures over all ranks.
"""

from __future__ import annotations

import json
import sys
import time
from functools import partial
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402

from gptoss_model import AutoBridge  # noqa: E402
from gptoss_model.model import build  # noqa: E402
from gptoss_model.model.reference import load_reference_model  # noqa: E402
from tests.model import _parity as P  # noqa: E402

# name: (TP, PP, EP, SP, dispatcher, apply the expert-grad fix)
LAYOUTS = {
    "ep2": (1, 1, 2, False, "alltoall", True),
    "ep2_allgather": (1, 1, 2, False, "allgather", True),
    "pp2": (1, 2, 1, False, "alltoall", True),
    "tp2_sp_ep2": (2, 1, 2, True, "alltoall", True),
    "tp2_sp_ep1": (2, 1, 1, True, "alltoall", True),
    "tp2_sp_ep2_unfixed": (2, 1, 2, True, "alltoall", False),
    "tp2_sp_ep1_unfixed": (2, 1, 1, True, "alltoall", False),
}


def _max_all(x: float) -> float:
    t = torch.tensor([x], dtype=torch.float64)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return t.item()


def _logits_via_schedule(chunks, ids):
    """Forward-only through the pipeline schedule; logits come back on the last stage."""
    from megatron.core import parallel_state as ps
    from megatron.core.pipeline_parallel import get_forward_backward_func

    def step(it, model):
        b = next(it)
        return model(b, torch.arange(b.shape[1]).expand_as(b), None), partial(lambda out, non_loss_data=True: out)

    out = get_forward_backward_func()(
        forward_step_func=step, data_iterator=iter([ids]), model=chunks, num_microbatches=1,
        seq_length=ids.shape[1], micro_batch_size=ids.shape[0], forward_only=True, collect_non_loss_data=True)
    return out[0] if ps.is_pipeline_last_stage() else None


def run_layout(ckpt, cfg, name, spec, batch, ref):
    tp, pp, ep, sp, dispatcher, fix = spec
    ids, labels = batch
    ref_logits, ref_loss, ref_grads = ref
    t0 = time.time()
    provider = AutoBridge.from_hf_pretrained(ckpt).to_megatron_provider()
    provider.tensor_model_parallel_size = tp
    provider.pipeline_model_parallel_size = pp
    provider.expert_model_parallel_size = ep
    provider.sequence_parallel = sp
    provider.moe_token_dispatcher_type = dispatcher
    real_fix = build.fix_expert_grad_tags
    if not fix:
        build.fix_expert_grad_tags = lambda model, layout: []
    try:
        provider.finalize()
        chunks = provider.provide_distributed_model(wrap_with_ddp=True)
    finally:
        build.fix_expert_grad_tags = real_fix
    my_ids, my_labels = P.dp_slice(ids, labels)
    from megatron.core import parallel_state as ps

    dp, dpr = ps.get_data_parallel_world_size(), ps.get_data_parallel_rank()
    rows = slice(dpr * ids.shape[0] // dp, (dpr + 1) * ids.shape[0] // dp)
    logits = _logits_via_schedule(chunks, my_ids)
    logit_diff = 0.0
    if logits is not None:
        logit_diff = (logits - P.tp_vocab_slice(ref_logits[rows])).abs().max().item()
    P.schedule_forward_backward(chunks, my_ids, my_labels)
    diffs = P.grad_diffs(chunks, ref_grads, cfg)
    worst = max(diffs, key=diffs.get)
    return {
        "layout": f"TP={tp} PP={pp} EP={ep} SP={sp} dispatcher={dispatcher} fix={fix}",
        "max_abs_logit_diff": _max_all(logit_diff),
        "max_grad_rel_diff": _max_all(diffs[worst]),
        "worst_param_rank": worst if dist.get_rank() == 0 else None,
        "n_params_checked": int(_max_all(len(diffs))),
        "seconds": round(time.time() - t0, 2),
    }


def seed_snippet(ckpt, batch, ref):
    """The seed's "Load HF -> Megatron" snippet, TP/PP/EP adapted to 2 CPU processes."""
    bridge = AutoBridge.from_hf_pretrained(ckpt)
    provider = bridge.to_megatron_provider()
    provider.tensor_model_parallel_size = 2
    provider.pipeline_model_parallel_size = 1
    provider.expert_model_parallel_size = 2
    provider.sequence_parallel = True
    provider.finalize()
    model = provider.provide_distributed_model(wrap_with_ddp=False)
    ids = batch[0]
    with torch.no_grad():
        logits = model[0](ids, torch.arange(ids.shape[1]).expand_as(ids), None)
    diff = (logits - P.tp_vocab_slice(ref[0])).abs().max().item()
    return {"layout": "seed snippet TP=2 PP=1 EP=2 SP", "chunks": len(model),
            "max_abs_logit_diff": _max_all(diff)}


def main(ckpt: str, out: str, only: str | None = None):
    from gptoss_model.model.config import GptOssModelConfig

    cfg = GptOssModelConfig.from_hf_config(ckpt)
    ref_model = load_reference_model(ckpt)
    batch = P.make_batch(cfg.vocab_size, batch=2, seq=40, seed=1, pad_token_id=cfg.pad_token_id)
    ref = P.reference_grads(ref_model, *batch)
    results = {}
    for name, spec in LAYOUTS.items():
        if only and name not in only.split(","):
            continue
        results[name] = run_layout(ckpt, cfg, name, spec, batch, ref)
        if dist.get_rank() == 0:
            print(name, results[name], flush=True)
    results["seed_snippet"] = seed_snippet(ckpt, batch, ref)
    if dist.get_rank() == 0:
        Path(out).write_text(json.dumps(results, indent=1))
    from gptoss_model.model import parallel

    parallel.destroy()


if __name__ == "__main__":
    main(*sys.argv[1:])
