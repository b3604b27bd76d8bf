"""torchrun worker: load converted megatron checkpoints at several layouts, compare logits.

    torchrun --nproc-per-node 2 tests/convert/dist_load_worker.py JOBS_JSON OUT_JSON

JOBS_JSON: [{"name": ..., "megatron_dir": ..., "hf_dir": ...}, ...]. For each
job and layout, dist_checkpointing reshards the world-1 checkpoint on load; each
rank compares its own slice of the logits (its TP vocab columns, the last PP
stage) with transformers' fp32 model on the same batch. Rank 0 writes, per
"job/layout", the worst absolute difference and that difference relative to
max |reference logit|.
"""
from __future__ import annotations

import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402

# name: (TP, PP, EP, SP)
LAYOUTS = {"ep2": (1, 1, 2, False), "tp2_sp": (2, 1, 1, True), "pp2": (1, 2, 1, False),
           "tp2_sp_ep2": (2, 1, 2, True)}


def main(jobs_json: str, out: str) -> None:
    from gptoss_model import AutoBridge
    from gptoss_model.checkpoint.layout import load_megatron_checkpoint
    from gptoss_model.verify.parity import fixed_batch
    from gptoss_model.model.reference import load_reference_model
    from tests.model import _parity as P
    from tests.model.dist_worker import _logits_via_schedule, _max_all

    results = {}
    for job in json.loads(Path(jobs_json).read_text()):
        hf_dir = job["hf_dir"]
        cfg = AutoBridge.from_hf_pretrained(hf_dir).config
        ids = fixed_batch(cfg.vocab_size)
        with torch.no_grad():
            ref = load_reference_model(hf_dir, dtype=torch.float32)(ids).logits.float()
        scale = ref.abs().max().item()
        for name, (tp, pp, ep, sp) in LAYOUTS.items():
            t0 = time.time()
            provider = AutoBridge.from_hf_pretrained(hf_dir).to_megatron_provider(load_weights=False)
            provider.params_dtype = torch.float32
            provider.tensor_model_parallel_size, provider.pipeline_model_parallel_size = tp, pp
            provider.expert_model_parallel_size, provider.sequence_parallel = ep, sp
            provider.finalize()
            chunks = provider.provide_distributed_model(wrap_with_ddp=False)
            load_megatron_checkpoint(chunks[0], job["megatron_dir"])
            for c in chunks:
                c.eval()
            with torch.no_grad():
                logits = _logits_via_schedule(chunks, ids)
            diff = 0.0 if logits is None else (logits.float() - P.tp_vocab_slice(ref)).abs().max().item()
            worst = _max_all(diff)
            key = f"{job['name']}/{name}"
            results[key] = {"layout": f"TP={tp} PP={pp} EP={ep} SP={sp}", "max_abs_logit_diff": worst,
                            "max_rel_logit_diff": worst / scale, "seconds": round(time.time() - t0, 2)}
            if dist.get_rank() == 0:
                print(key, results[key], flush=True)
    if dist.get_rank() == 0:
        Path(out).write_text(json.dumps(results, indent=1))
    from gptoss_model.model import parallel

    parallel.destroy()


if __name__ == "__main__":
    main(*sys.argv[1:])
