"""Megatron torch_dist checkpoint -> self-contained Hugging Face GPT-OSS directory, streamed.

    report = export_megatron_to_hf("/ckpt/run/checkpoints", "/out/gpt-oss-hf",
                                   config="/ckpt/gpt-oss-20b", weight_format="mxfp4")

The output is what `openai/gpt-oss-*` look like, with nothing taken from a
reference repository:
  * `config.json` written from the model config (`GptOssModelConfig.to_hf_config`),
    with `dtype` and, for MXFP4, the original repos' `quantization_config`;
  * `generation_config.json`, tokenizer files and chat template copied from
    the original HF checkpoint when one is given (else a generation config
    from the config's token ids);
  * `model-0000i-of-0000N.safetensors` (at most `max_shard_bytes` each, default
    5 GB) and `model.safetensors.index.json` with the exact `total_size`;
  * tensor names, dtypes and layouts of the original repos: q/k/v split,
    experts stacked per layer (`gate_up_proj [E, hidden, 2*inter]` with gate and
    up interleaved, `down_proj [E, inter, hidden]`), or in `mxfp4` the experts as
    `*_blocks` / `*_scales` (re-quantized; canonical encodings come back
    bitwise) with everything else bf16.

Weight formats: `bfloat16` (default), `float32`, `mxfp4`.

Streaming, in `workers` processes: the groups (embedding, each layer, head;
`export_groups`) are spread over this process and `workers - 1` spawned ones.
Each reads one tensor at a time (one expert of a stacked expert tensor,
straight from the checkpoint's bytes; `megatron_reader`), maps it with
`name_map`, and writes it at its offset in the shard files
(`safetensors_writer`), whose pages are then fsynced and evicted. Peak memory
per process is about the largest single tensor (the embedding) whatever the
number of layers or experts; the checkpoint may have been saved at any
TP/PP/EP layout. The bytes do not depend on the worker count. A failure leaves
no shard under its final name and no index; a rerun into the same directory
writes only the groups not yet marked done in `.export/`.

No Prefect here: tasks/export.py wraps this in a stage; `AutoBridge.export_ckpt`
calls it directly.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import time
from pathlib import Path
from typing import Callable

import torch

from gptoss_model.export.adapters import PEFT_DIR, AdaptedReader, open_adapted, read_peft_config, write_peft_adapter
from gptoss_model.model.config import GptOssModelConfig
from gptoss_model.export.groups import (ExportError, ExportJob, export_fingerprint, finished_groups, group_names,
                                        hf_tensor_specs, imported, run_group, run_group_in_worker, shard_plan)
from gptoss_model.checkpoint.megatron_reader import MegatronCheckpointReader
from gptoss_model.system.resources import peak_rss_mb
from gptoss_model.checkpoint.safetensors_writer import ShardFiles
from gptoss_model.system.workers import spread, start_pool, useful_workers

log = logging.getLogger(__name__)

WEIGHT_FORMATS = ("bfloat16", "float32", "mxfp4")
DEFAULT_MAX_SHARD_BYTES = 5 * 10**9
# Files a Hugging Face checkpoint carries besides weights and config; copied when present.
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja",
                   "chat_template.json", "tokenizer.model", "vocab.json", "merges.txt", "added_tokens.json")
GENERATION_CONFIG = "generation_config.json"
# As in openai/gpt-oss-*'s config.json: only the experts are MXFP4.
MXFP4_QUANTIZATION_CONFIG = {
    "modules_to_not_convert": ["model.layers.*.self_attn", "model.layers.*.mlp.router", "model.embed_tokens",
                               "lm_head"],
    "quant_method": "mxfp4",
}
STATE_DIR = ".export"  # progress of an unfinished export: the plan's fingerprint, a marker per finished group
PLAN_FILE = "plan.json"


# ------------------------------------------------------------ side files
def hf_config_dict(cfg: GptOssModelConfig, weight_format: str) -> dict:
    out = cfg.to_hf_config()
    for stale in ("quantization_config", "torch_dtype", "dtype", "transformers_version"):
        out.pop(stale, None)  # from the source's config.json; this export decides them
    out["dtype"] = "float32" if weight_format == "float32" else "bfloat16"
    if weight_format == "mxfp4":
        out["quantization_config"] = json.loads(json.dumps(MXFP4_QUANTIZATION_CONFIG))
    return dict(sorted(out.items()))


def write_side_files(out_dir: Path, cfg: GptOssModelConfig, weight_format: str,
                     tokenizer_dir: Path | None) -> list[str]:
    """config.json, generation_config.json and the tokenizer files; returns what was copied."""
    (out_dir / "config.json").write_text(json.dumps(hf_config_dict(cfg, weight_format), indent=2) + "\n")
    copied = []
    if tokenizer_dir is not None:
        for name in (*TOKENIZER_FILES, GENERATION_CONFIG):
            if (tokenizer_dir / name).is_file():
                shutil.copyfile(tokenizer_dir / name, out_dir / name)
                copied.append(name)
    if GENERATION_CONFIG not in copied:
        gen = {k: getattr(cfg, k) for k in ("bos_token_id", "eos_token_id", "pad_token_id")
               if getattr(cfg, k) is not None}
        (out_dir / GENERATION_CONFIG).write_text(json.dumps(gen, indent=2, sort_keys=True) + "\n")
    return copied


# ------------------------------------------------------------------ export
def _resolve_config(config) -> tuple[GptOssModelConfig, Path | None]:
    if isinstance(config, GptOssModelConfig):
        return config, None
    path = Path(config)
    return GptOssModelConfig.from_hf_config(path), (path if path.is_dir() else path.parent)



def unfinished_export(out_dir: str | Path) -> bool:
    """Whether `out_dir` holds an export attempt that a rerun continues (see `export_megatron_to_hf`)."""
    return (Path(out_dir) / STATE_DIR / PLAN_FILE).is_file()


def _prepare_out_dir(out_dir: Path, state_dir: Path, fingerprint: str) -> bool:
    """True to resume an earlier attempt of this very export in `out_dir`; refuses anything else there."""
    if not out_dir.exists() or not any(out_dir.iterdir()):
        return False
    plan_file = state_dir / PLAN_FILE
    if plan_file.is_file():
        try:
            if json.loads(plan_file.read_text()).get("fingerprint") == fingerprint:
                return True
        except ValueError:
            pass
    raise ExportError(f"output directory {out_dir} is not empty (and holds no unfinished attempt of this "
                      "export); export into an empty or new directory")


@torch.no_grad()
def export_megatron_to_hf(megatron_path: str | Path, out_dir: str | Path, *,
                          config: GptOssModelConfig | str | Path, tokenizer_dir: str | Path | None = None,
                          weight_format: str = "bfloat16", max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES,
                          base_megatron_path: str | Path | None = None, peft_adapter: bool = False,
                          workers: int = 1, progress: Callable[[int, int], None] | None = None) -> dict:
    """Export the megatron checkpoint at `megatron_path` (a checkpoint dir or one iteration dir) to `out_dir`.

    `config`: the model config, or the original HF checkpoint dir (then also the default
    `tokenizer_dir`). `out_dir` must be absent, empty, or an unfinished attempt of the same
    export (whose finished groups are kept). `workers` processes write disjoint groups (the
    embedding, each layer, the head): this one plus `workers - 1` spawned ones; the bytes do
    not depend on it. `progress(done, total)` counts HF tensors (per group with workers).
    Returns the export report (for the manifest).

    A checkpoint with LoRA/DoRA adapters (a training run's, see `adapter_export`) is exported
    with the adapters merged into the weights (in fp32, before the cast). An adapter-only
    checkpoint needs `base_megatron_path`, the checkpoint its run was trained from.
    `peft_adapter`: also write the adapters as a PEFT directory `out_dir/peft_adapter/`
    (LoRA: all adapters; DoRA: attention only, its expert adapters exist only merged).
    """
    if weight_format not in WEIGHT_FORMATS:
        raise ExportError(f"weight_format must be one of {WEIGHT_FORMATS}, got {weight_format!r}")
    if workers < 1:
        raise ExportError(f"workers must be >= 1, got {workers}")
    cfg, config_dir = _resolve_config(config)
    tokenizer_dir = Path(tokenizer_dir) if tokenizer_dir is not None else config_dir
    out_dir = Path(out_dir)
    started = time.time()
    plan = shard_plan(cfg, weight_format, max_shard_bytes)  # before reading: bad formats fail here
    total = sum(len(s) for s in plan.shards)
    peft = read_peft_config(megatron_path)
    if peft is None and (base_megatron_path is not None or peft_adapter):
        raise ExportError(f"{megatron_path} holds no LoRA/DoRA adapters; base_megatron_path and peft_adapter "
                          "apply to adapter checkpoints only")
    groups = group_names(cfg)
    requested, workers = workers, useful_workers(workers, len(groups))
    # spawned now, importing this module (torch, DCP: ~2 s) while this process sets up the reader
    pool = start_pool(workers - 1, imported) if workers > 1 else None
    try:
        if peft is None:
            reader = MegatronCheckpointReader(megatron_path, cfg).__enter__()
        else:
            reader = AdaptedReader(*open_adapted(megatron_path, base_megatron_path, cfg, peft), peft)
        files = ShardFiles(out_dir, plan)
        fingerprint = export_fingerprint(reader, cfg, files)
        state_dir = out_dir / STATE_DIR
        resumed = _prepare_out_dir(out_dir, state_dir, fingerprint)
        state_dir.mkdir(parents=True, exist_ok=True)
        (state_dir / PLAN_FILE).write_text(json.dumps({"fingerprint": fingerprint}))
        done = finished_groups(state_dir, fingerprint) if resumed else set()
        files.create(keep_existing=resumed)
        job = ExportJob(reader, files, cfg, weight_format, state_dir, fingerprint)
        tensors_of = {g: len(hf_tensor_specs(cfg, weight_format, g)) for g in groups}
        counter = [sum(tensors_of[g] for g in done)]
        by_pid: dict[int, int] = {}
        if progress is not None:
            progress(counter[0], total)

        def on_tensor() -> None:
            counter[0] += 1
            progress(counter[0], total)

        def on_group(group: str, result: tuple[int, float]) -> None:
            by_pid[result[0]] = by_pid.get(result[0], 0) + 1
            if pool is not None and progress is not None:
                counter[0] += tensors_of[group]
                progress(counter[0], total)

        reader.evict_after_read = True
        threads = torch.get_num_threads()
        if pool is not None:
            torch.set_num_threads(1)  # one process per core is the parallelism, as in the workers
        try:
            spread([g for g in groups if g not in done], pool=pool, on_done=on_group,
                   here=lambda g: run_group(job, g, on_tensor if progress is not None and pool is None else None),
                   submit=lambda g: pool.submit(run_group_in_worker, job, g),
                   describe=lambda g: f"exporting {g}")
        finally:
            torch.set_num_threads(threads)
    finally:
        if pool is not None:
            pool.shutdown()
    files.finish()
    iter_dir = reader.iter_dir
    adapters = None
    if peft is not None:
        adapters = {"method": peft.method, "dim": peft.dim, "alpha": peft.alpha, "merged": True,
                    "modules": len(reader.adapted), "base_checkpoint": str(reader.base.iter_dir)}
        if peft_adapter:
            shutil.rmtree(out_dir / PEFT_DIR, ignore_errors=True)  # an interrupted attempt's
            adapters["peft_dir"] = write_peft_adapter(reader, cfg, out_dir / PEFT_DIR)
    copied = write_side_files(out_dir, cfg, weight_format, tokenizer_dir)
    reader.close()
    shutil.rmtree(state_dir)
    stored_dtypes = sorted({str(d).removeprefix("torch.") for _, d in reader.stored.values()})
    here = by_pid.pop(os.getpid(), 0)
    report = {
        "format": "huggingface safetensors", "weight_format": weight_format, "tensors": total,
        "bytes": plan.total_size, "shards": len(plan.shards), "max_shard_bytes": max_shard_bytes,
        "source_checkpoint": iter_dir.name, "source_dtypes": stored_dtypes, "side_files": copied,
        "num_layers": cfg.num_layers, "num_experts": cfg.num_experts,
        "workers": workers, "workers_requested": requested, "groups_resumed": len(done),
        "groups_written": {"this_process": here, "spawned_workers": sum(by_pid.values())},
        "seconds": round(time.time() - started, 3), "peak_rss_mb": peak_rss_mb(),
    }
    if adapters is not None:
        report["adapters"] = adapters
    report["mb_per_s"] = round(plan.total_size / 1e6 / max(report["seconds"], 1e-9), 1)
    log.info("exported %s -> %s: %d tensors in %d shards, %.1f MB, %.1fs, %d workers", iter_dir, out_dir, total,
             len(plan.shards), plan.total_size / 1e6, report["seconds"], workers)
    return report
