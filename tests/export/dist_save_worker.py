"""torchrun worker: load a converted checkpoint at several layouts and save it again from there.

    torchrun --nproc-per-node 2 tests/export/dist_save_worker.py MEGATRON_DIR HF_DIR OUT_ROOT OUT_JSON

For each layout (EP2, TP2+SP, PP2, TP2+SP+EP2) the model is built at that
layout, the world-1 checkpoint is loaded (dist_checkpointing reshards it) and
saved with megatron's own torch_dist save under OUT_ROOT/<layout>/, as a
training run at that layout would save it. Rank 0 writes the layouts saved.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402

# name: (TP, PP, EP, SP)
LAYOUTS = {"tp2_sp": (2, 1, 1, True), "ep2": (1, 1, 2, False), "pp2": (1, 2, 1, False),
           "tp2_sp_ep2": (2, 1, 2, True)}


def main(megatron_dir: str, hf_dir: str, out_root: str, out: str) -> None:
    from megatron.core import dist_checkpointing

    from gptoss_model import AutoBridge
    from gptoss_model.model import parallel
    from gptoss_model.checkpoint.layout import load_megatron_checkpoint, megatron_state_dict

    saved = {}
    for name, (tp, pp, ep, sp) in LAYOUTS.items():
        provider = AutoBridge.from_hf_pretrained(hf_dir).to_megatron_provider(load_weights=False)
        provider.params_dtype = torch.bfloat16
        provider.tensor_model_parallel_size, provider.pipeline_model_parallel_size = tp, pp
        provider.expert_model_parallel_size, provider.sequence_parallel = ep, sp
        provider.finalize()
        chunks = provider.provide_distributed_model(wrap_with_ddp=False, bf16=False)
        load_megatron_checkpoint(chunks[0], megatron_dir)
        root = Path(out_root) / name
        iter_dir = root / "iter_0000007"
        if dist.get_rank() == 0:
            iter_dir.mkdir(parents=True, exist_ok=True)
        dist.barrier()
        dist_checkpointing.save(megatron_state_dict(chunks[0]), str(iter_dir))
        dist.barrier()
        if dist.get_rank() == 0:
            (root / "latest_checkpointed_iteration.txt").write_text("7")
        saved[name] = str(root)
    if dist.get_rank() == 0:
        Path(out).write_text(json.dumps(saved))
    parallel.destroy()


if __name__ == "__main__":
    main(*sys.argv[1:])
