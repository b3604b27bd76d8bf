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

Streaming: the checkpoint is read one tensor at a time (one expert of a
stacked expert tensor; `megatron_reader`), mapped with `name_map`, and
appended to the current safetensors shard (`safetensors_writer`), so peak
memory is about the largest single tensor (the embedding) whatever the
number of layers or experts, and the checkpoint may have been saved at any
TP/PP/EP layout. A failure leaves no shard under its final name and no index.

No Prefect here: tasks/export.py wraps this in a stage; `AutoBridge.export_ckpt`
calls it directly.
"""

from __future__ import annotations

import json
import logging
import shutil
import time
from pathlib import Path
from typing import Callable

import torch

from gptoss_model import mxfp4
from gptoss_model.adapter_export import PEFT_DIR, AdaptedReader, open_adapted, read_peft_config, write_peft_adapter
from gptoss_model import name_map as nm
from gptoss_model.config import GptOssModelConfig
from gptoss_model.resources import peak_rss_mb
from gptoss_model.errors import PermanentError
from gptoss_model.megatron_reader import MegatronCheckpointReader
from gptoss_model.safetensors_writer import ShardedSafetensorsWriter, ShardPlan, TensorSpec

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
# Temporaries per quantize step: 4 MiB (mxfp4's default) measured 4x slower than 128 MiB on this
# 2-core machine (per-step overhead); 128 MiB is small beside the layer held anyway.
QUANTIZE_CHUNK_BYTES = 128 << 20


class ExportError(PermanentError, ValueError):
    """The export cannot be made (bad format, non-empty output dir, config that does not fit)."""


def _tensor_dtype(weight_format: str) -> torch.dtype:
    return torch.float32 if weight_format == "float32" else torch.bfloat16


# ----------------------------------------------------------------- the plan
def _layer_groups(cfg: GptOssModelConfig, group: str) -> list[nm.Match]:
    """The name_map groups (rule, layer) of one structural group, in the order they are written."""
    if group == "embedding":
        return [m for m in nm.iter_groups(cfg) if m.rule.hf[0] == "model.embed_tokens.weight"]
    if group == "output":
        return [m for m in nm.iter_groups(cfg) if m.layer is None and m.rule.hf[0] != "model.embed_tokens.weight"]
    layer = int(group.split()[1])
    return [nm.Match(rule, layer) for rule in nm.RULES if "{layer}" in rule.hf[0]]


def hf_tensor_specs(cfg: GptOssModelConfig, weight_format: str, group: str) -> list[TensorSpec]:
    """What one structural group becomes in the HF checkpoint: names, shapes and dtypes, in file order."""
    dtype = _tensor_dtype(weight_format)
    specs = []
    for match in _layer_groups(cfg, group):
        for name, shape in zip(match.hf_names(), match.hf_shapes(cfg)):
            if weight_format == "mxfp4" and nm.is_mxfp4_stored(match.rule):
                if shape[1] % mxfp4.GROUP:  # HF [E, in, out]
                    raise ExportError(f"{name}: in_features {shape[1]} is not a multiple of {mxfp4.GROUP}; it "
                                      "cannot be stored as MXFP4 (export as bfloat16 instead)")
                blocks, scales = mxfp4.mxfp4_pair_names(name)
                blocks_shape, scales_shape = nm.mxfp4_stored_shapes(shape)
                specs.append(TensorSpec(blocks, blocks_shape, torch.uint8))
                specs.append(TensorSpec(scales, scales_shape, torch.uint8))
            else:
                specs.append(TensorSpec(name, tuple(shape), dtype))
    return specs


def group_names(cfg: GptOssModelConfig) -> list[str]:
    return ["embedding", *(f"layer {i}" for i in range(cfg.num_layers)), "output"]


def shard_plan(cfg: GptOssModelConfig, weight_format: str, max_shard_bytes: int) -> ShardPlan:
    specs = [s for g in group_names(cfg) for s in hf_tensor_specs(cfg, weight_format, g)]
    return ShardPlan.make(specs, max_shard_bytes)


# ------------------------------------------------------------- conversion
def _mxfp4_expert(match: nm.Match, megatron_expert: torch.Tensor, cfg: GptOssModelConfig):
    """One expert's megatron weight -> MXFP4 (blocks, scales) of its stored [out, in] rows.

    The stored rows are the transpose of the HF bf16 matrix (fc1's gate and up interleaved;
    fc2 as is), quantized from a strided view: no transposed copy.
    """
    (hf,) = match.rule.mapping.to_hf(megatron_expert, cfg)
    return mxfp4.quantize(hf.transpose(0, 1), max_chunk_bytes=QUANTIZE_CHUNK_BYTES)


def write_group(reader: MegatronCheckpointReader, writer: ShardedSafetensorsWriter, cfg: GptOssModelConfig,
                weight_format: str, group: str, on_tensor: Callable[[], None]) -> None:
    """Read one structural group from the checkpoint and append its HF tensors, in `hf_tensor_specs` order.

    Stacked expert tensors are produced one expert at a time (read, map, append), so memory is one
    expert's tensor, not a layer's experts (6 GB of bf16 per layer for gpt-oss-120b).
    """
    dtype = _tensor_dtype(weight_format)
    for match in _layer_groups(cfg, group):
        mapping, hf_name = match.rule.mapping, match.hf_names()[0]
        if not mapping.per_expert:
            name = match.megatron_name("local")
            for out_name, value in nm.megatron_to_hf(reader.read([name]), cfg):
                writer.write(out_name, value.to(dtype).contiguous())
                on_tensor()
            continue
        experts = [match.megatron_name("local", e) for e in range(cfg.num_experts)]
        if weight_format == "mxfp4" and nm.is_mxfp4_stored(match.rule):
            blocks_name, scales_name = mxfp4.mxfp4_pair_names(hf_name)
            scales = []  # 1/16 of the blocks' size: held until the blocks are written
            for name in experts:
                blocks, expert_scales = _mxfp4_expert(match, reader.read([name])[name], cfg)
                writer.write_rows(blocks_name, blocks.unsqueeze(0), 1)
                scales.append(expert_scales)
            on_tensor()
            writer.write(scales_name, torch.stack(scales))
            on_tensor()
            continue
        for name in experts:
            (value,) = mapping.to_hf(reader.read([name])[name], cfg)
            writer.write_rows(hf_name, value.to(dtype).unsqueeze(0).contiguous(), 1)
        on_tensor()


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



@torch.no_grad()
def export_megatron_to_hf(megatron_path: str | Path, out_dir: str | Path, *,
                          config: GptOssModelConfig | str | Path, tokenizer_dir: str | Path | None = None,
                          weight_format: str = "bfloat16", max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES,
                          base_megatron_path: str | Path | None = None, peft_adapter: bool = False,
                          progress: Callable[[int, int], None] | None = None) -> dict:
    """Export the megatron checkpoint at `megatron_path` (a checkpoint dir or one iteration dir) to `out_dir`.

    `config`: the model config, or the original HF checkpoint dir (then also the default
    `tokenizer_dir`). `out_dir` must be absent or empty. `progress(done, total)` counts HF
    tensors. Returns the export report (for the manifest).

    A checkpoint with LoRA/DoRA adapters (a training run's, see `adapter_export`) is exported
    with the adapters merged into the weights (in fp32, before the cast). An adapter-only
    checkpoint needs `base_megatron_path`, the checkpoint its run was trained from.
    `peft_adapter`: also write the adapters as a PEFT directory `out_dir/peft_adapter/`
    (LoRA: all adapters; DoRA: attention only, its expert adapters exist only merged).
    """
    if weight_format not in WEIGHT_FORMATS:
        raise ExportError(f"weight_format must be one of {WEIGHT_FORMATS}, got {weight_format!r}")
    cfg, config_dir = _resolve_config(config)
    tokenizer_dir = Path(tokenizer_dir) if tokenizer_dir is not None else config_dir
    out_dir = Path(out_dir)
    if out_dir.exists() and any(out_dir.iterdir()):
        raise ExportError(f"output directory {out_dir} is not empty; export into an empty or new directory")
    started = time.time()
    plan = shard_plan(cfg, weight_format, max_shard_bytes)  # before reading: bad formats fail here
    total = sum(len(s) for s in plan.shards)
    peft = read_peft_config(megatron_path)
    if peft is None and (base_megatron_path is not None or peft_adapter):
        raise ExportError(f"{megatron_path} holds no LoRA/DoRA adapters; base_megatron_path and peft_adapter "
                          "apply to adapter checkpoints only")
    # The readers hold no resources (their `__exit__` does nothing): plain objects here.
    if peft is None:
        reader = MegatronCheckpointReader(megatron_path, cfg).__enter__()
    else:
        reader = AdaptedReader(*open_adapted(megatron_path, base_megatron_path, cfg, peft), peft)
    out_dir.mkdir(parents=True, exist_ok=True)
    stored_dtypes = sorted({str(d).removeprefix("torch.") for _, d in reader.stored.values()})
    if progress is not None:
        progress(0, total)
    counter = [0]

    def on_tensor() -> None:
        counter[0] += 1
        if progress is not None:
            progress(counter[0], total)

    with ShardedSafetensorsWriter(out_dir, plan) as writer:
        for group in reader.groups():
            write_group(reader, writer, cfg, weight_format, group, on_tensor)
    iter_dir = reader.iter_dir
    adapters = None
    if peft is not None:
        adapters = {"method": peft.method, "dim": peft.dim, "alpha": peft.alpha, "merged": True,
                    "modules": len(reader.adapted), "base_checkpoint": str(reader.base.iter_dir)}
        if peft_adapter:
            adapters["peft_dir"] = write_peft_adapter(reader, cfg, out_dir / PEFT_DIR)
    copied = write_side_files(out_dir, cfg, weight_format, tokenizer_dir)
    report = {
        "format": "huggingface safetensors", "weight_format": weight_format, "tensors": total,
        "bytes": plan.total_size, "shards": len(plan.shards), "max_shard_bytes": max_shard_bytes,
        "source_checkpoint": iter_dir.name, "source_dtypes": stored_dtypes, "side_files": copied,
        "num_layers": cfg.num_layers, "num_experts": cfg.num_experts,
        "seconds": round(time.time() - started, 3), "peak_rss_mb": peak_rss_mb(),
    }
    if adapters is not None:
        report["adapters"] = adapters
    report["mb_per_s"] = round(plan.total_size / 1e6 / max(report["seconds"], 1e-9), 1)
    log.info("exported %s -> %s: %d tensors in %d shards, %.1f MB, %.1fs", iter_dir, out_dir, total,
             len(plan.shards), plan.total_size / 1e6, report["seconds"])
    return report

