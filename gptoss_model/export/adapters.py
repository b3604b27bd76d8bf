"""Export of a LoRA/DoRA-adapted model: adapters merged into the base weights, and a PEFT directory.

A training run with `peft.method` saves adapter-only checkpoints (`model/peft.py`
describes the layout: `X.adapter.lora_a/lora_b/dora_magnitude` beside base weight
`X.weight`, "peft" in the common state). Export combines one with its base
checkpoint (the megatron checkpoint the run started from):

  * merged: every adapted weight is `peft.merged_weight(base, adapter)` (fp32, the one
    implementation of the adapter math) before it is mapped to HF names and cast to
    the export's format; the rest of the export is unchanged (`AdaptedReader` stands in
    for the checkpoint reader);
  * PEFT directory (`write_peft_adapter`): `adapter_config.json` and
    `adapter_model.safetensors` that the `peft` library loads onto the *base* export
    (`PeftModel.from_pretrained(base, dir)`), with HF module names: `linear_qkv`'s
    adapter becomes q_proj/k_proj/v_proj (A shared, B's and DoRA magnitude's rows split
    like the fused weight's rows: both are row-wise, so exact), `linear_proj`'s o_proj.
    DoRA is peft's `use_dora=True` (magnitude per output row of W + s*B*A, the same
    definition). Expert adapters: transformers' GPT-OSS stores the experts as fused 3-D
    parameters (`gate_up_proj`, `down_proj`); LoRA reaches them through peft's
    `target_parameters` (per-expert A/B stacked as peft lays them out, see
    `_expert_tensors`), but peft has no DoRA for parameters, so DoRA expert adapters are
    only available merged; the report's `merged_only` lists what the directory lacks.
"""

from __future__ import annotations

import json
import logging
import re
from pathlib import Path

import torch

from gptoss_model.checkpoint import name_map as nm
from gptoss_model.model.config import GptOssModelConfig
from gptoss_model.errors import PermanentError
from gptoss_model.checkpoint.megatron_reader import MegatronCheckpointReader, resolve_iter_dir
from gptoss_model.system.safe_unpickle import refusals_named
from gptoss_model.model.config import PeftConfig

log = logging.getLogger(__name__)

PEFT_DIR = "peft_adapter"
ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
ADAPTER = ".adapter."
# megatron expert linear -> the fused HF parameter its per-expert adapters become (peft `target_parameters`,
# LoRA only), in the order peft nests them
EXPERT_TARGETS = {"linear_fc1": "mlp.experts.gate_up_proj", "linear_fc2": "mlp.experts.down_proj"}
# megatron linear -> the HF attention projections it becomes (in the fused tensor's row order)
ATTENTION_TARGETS = {"self_attention.linear_qkv": ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"),
                     "self_attention.linear_proj": ("self_attn.o_proj",)}


class AdapterExportError(PermanentError, ValueError):
    """Adapters that cannot be exported (no base checkpoint, unknown method, missing tensors)."""


def read_peft_config(megatron_path: str | Path) -> PeftConfig | None:
    """The adapter config saved with a training checkpoint; None for a checkpoint without adapters."""
    from megatron.core.dist_checkpointing import load_common_state_dict

    iter_dir = resolve_iter_dir(megatron_path)
    with refusals_named():
        saved = load_common_state_dict(str(iter_dir)).get("peft")
    if not saved:
        return None
    if saved.get("method") not in ("lora", "dora"):
        raise AdapterExportError(f"{iter_dir}: unknown adapter method {saved.get('method')!r} (lora or dora)")
    fields = {k: saved[k] for k in ("method", "dim", "alpha", "dropout", "target_modules") if k in saved}
    return PeftConfig(**fields)


class AdaptedReader:
    """The checkpoint reader's `read`, with adapters merged into the weights they adapt.

    `base` reads the base weights, `adapters` the adapter tensors (an adapter-only
    checkpoint, or the same full checkpoint). Adapted weights come back fp32.
    """

    def __init__(self, base: MegatronCheckpointReader, adapters: MegatronCheckpointReader, peft: PeftConfig):
        self.base, self.adapters, self.peft = base, adapters, peft
        # {adapted module: its adapter tensors' names}, built once (tens of thousands of experts at 120B)
        self._tensors: dict[str, list[str]] = {}
        for name in adapters.regions:
            if ADAPTER in name:
                self._tensors.setdefault(name.split(ADAPTER)[0], []).append(name)
        self.adapted = sorted(self._tensors)
        if not self.adapted:
            raise AdapterExportError(f"{adapters.iter_dir}: the checkpoint says peft={peft.method} but holds "
                                     "no adapter tensors")
        self.iter_dir, self.stored = adapters.iter_dir, base.stored

    def __enter__(self) -> "AdaptedReader":  # both readers are entered already
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        self.base.close()
        self.adapters.close()

    @property
    def evict_after_read(self) -> bool:
        return self.base.evict_after_read

    @evict_after_read.setter
    def evict_after_read(self, value: bool) -> None:
        self.base.evict_after_read = self.adapters.evict_after_read = value

    def groups(self) -> list[str]:
        return self.base.groups()

    def stored_dtype(self, name: str) -> torch.dtype:
        return self.base.stored_dtype(name)

    def adapter(self, module: str) -> dict[str, torch.Tensor]:
        return {n.rsplit(".", 1)[-1]: t for n, t in self.adapters.read(self._tensors[module]).items()}

    def read(self, names: list[str]) -> dict[str, torch.Tensor]:
        from gptoss_model.model.peft import merged_weight

        out = self.base.read(names)
        for name in names:
            module = name[: -len(".weight")] if name.endswith(".weight") else None
            if module in self._tensors:
                out[name] = merged_weight(out[name], self.adapter(module), self.peft.alpha, self.peft.dim)
        return out


def open_adapted(megatron_path: str | Path, base_megatron_path: str | Path | None, cfg: GptOssModelConfig,
                 peft: PeftConfig) -> tuple[MegatronCheckpointReader, MegatronCheckpointReader]:
    """(base reader, adapter reader) for an adapter checkpoint, entered; the caller exits neither (no state)."""
    adapters = MegatronCheckpointReader(megatron_path, cfg, peft=peft, adapters_only=True).__enter__()
    base_path = base_megatron_path if base_megatron_path is not None else megatron_path
    try:
        base = MegatronCheckpointReader(base_path, cfg).__enter__()
    except PermanentError as e:
        hint = ("" if base_megatron_path is not None else
                f"; {adapters.iter_dir} is adapter-only ({peft.method}): pass the checkpoint the run was "
                "trained from as base_megatron_path")
        raise AdapterExportError(f"base weights for the adapters: {e}{hint}") from e
    return base, adapters


# ------------------------------------------------------------------ PEFT dir
def _attention_tensors(reader: AdaptedReader, cfg: GptOssModelConfig, layer: str, linear: str) -> dict:
    ad = {k: v.float() for k, v in reader.adapter(f"decoder.layers.{layer}.{linear}").items()}
    hf_modules = ATTENTION_TARGETS[linear]
    split = (lambda t: nm.QKV_MERGE.to_hf(t, cfg)) if len(hf_modules) > 1 else (lambda t: (t,))
    lora_b = split(ad["lora_b"])
    magnitude = split(ad["dora_magnitude"]) if "dora_magnitude" in ad else None
    out = {}
    for i, hf_module in enumerate(hf_modules):
        key = f"base_model.model.model.layers.{layer}.{hf_module}"
        out[f"{key}.lora_A.weight"] = ad["lora_a"].clone()  # one file entry each
        out[f"{key}.lora_B.weight"] = lora_b[i].contiguous()
        if magnitude is not None:
            out[f"{key}.lora_magnitude_vector"] = magnitude[i].contiguous()
    return out


def _expert_tensors(reader: AdaptedReader, cfg: GptOssModelConfig, layer: str, linear: str,
                    nesting: int) -> dict:
    """One layer's expert adapters of `linear` as peft's `target_parameters` LoRA on the fused HF tensor.

    peft's LoRA on a 3-D parameter [E, in, out] holds lora_A [E*r, in] (row e*r + k) and
    lora_B [out, r*E] (column k*E + e); delta[e] = s * (B_e A_e)^T, as HF stores x @ W. fc1's
    B rows are interleaved like the gate/up weight's columns. Several targeted parameters of one
    module nest: the first in `target_parameters` is innermost (`base_layer.` per level).
    """
    ads = [reader.adapter(f"decoder.layers.{layer}.mlp.experts.local_experts.{e}.{linear}")
           for e in range(cfg.num_experts)]
    lora_a = torch.cat([ad["lora_a"].float() for ad in ads])
    to_hf_rows = (lambda b: nm.fc1_to_gate_up(b).transpose(0, 1)) if linear == "linear_fc1" else (lambda b: b)
    lora_b = torch.stack([to_hf_rows(ad["lora_b"].float()) for ad in ads], dim=-1).flatten(1)
    key = f"base_model.model.model.layers.{layer}.mlp.experts.{'base_layer.' * nesting}"
    return {f"{key}lora_A.weight": lora_a.contiguous(), f"{key}lora_B.weight": lora_b.contiguous()}


def peft_tensors(reader: AdaptedReader, cfg: GptOssModelConfig
                 ) -> tuple[dict[str, torch.Tensor], list[str], list[str]]:
    """({peft key: fp32 tensor}, target_parameters, [megatron modules whose adapters exist only merged])."""
    tensors, merged_only, experts = {}, [], {}
    for module in reader.adapted:
        parts = module.split(".")  # decoder.layers.{L}.<rest>
        layer, rest = parts[2], ".".join(parts[3:])
        if parts[:2] == ["decoder", "layers"] and rest in ATTENTION_TARGETS:
            tensors.update(_attention_tensors(reader, cfg, layer, rest))
        elif (reader.peft.method == "lora" and parts[:2] == ["decoder", "layers"]
              and re.fullmatch(r"mlp\.experts\.local_experts\.\d+\.linear_fc[12]", rest)):
            experts.setdefault(layer, set()).add(parts[-1])
        else:  # peft has no DoRA for parameters (target_parameters)
            merged_only.append(module)
    linears = [n for n in EXPERT_TARGETS if any(n in got for got in experts.values())]
    for layer in experts:
        for i, linear in enumerate(linears):
            tensors.update(_expert_tensors(reader, cfg, layer, linear, nesting=len(linears) - 1 - i))
    return tensors, [EXPERT_TARGETS[n] for n in linears], merged_only


def write_peft_adapter(reader: AdaptedReader, cfg: GptOssModelConfig, out_dir: Path,
                       base_model_name: str | None = None) -> dict:
    """Write the PEFT directory `out_dir`; returns its part of the export report."""
    from safetensors.torch import save_file

    tensors, target_parameters, merged_only = peft_tensors(reader, cfg)
    # "decoder.layers.{L}.mlp.experts.local_experts.{E}.linear_fc1" -> "mlp.experts.linear_fc1"
    kinds = {re.sub(r"\.local_experts\.\d+", "", m.split(".", 3)[-1]) for m in merged_only}
    report = {"dir": out_dir.name, "method": reader.peft.method, "r": reader.peft.dim,
              "lora_alpha": reader.peft.alpha, "merged_only": sorted(kinds)}
    if not tensors:
        report["skipped"] = "no adapter peft can load; the adapters exist only merged"
        log.warning("PEFT adapter directory not written: %s", report["skipped"])
        return report
    targets = sorted({k.split(".")[-3] for k in tensors if k.endswith(".lora_A.weight") and ".self_attn." in k})
    config = {
        "peft_type": "LORA", "task_type": "CAUSAL_LM", "base_model_name_or_path": base_model_name,
        "r": reader.peft.dim, "lora_alpha": reader.peft.alpha, "lora_dropout": 0.0, "bias": "none",
        "target_modules": targets, "target_parameters": target_parameters or None,
        "use_dora": reader.peft.method == "dora", "use_rslora": False,
        "fan_in_fan_out": False, "inference_mode": True, "init_lora_weights": True,
    }
    out_dir.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(out_dir / ADAPTER_WEIGHTS), metadata={"format": "pt"})
    (out_dir / ADAPTER_CONFIG).write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    report.update(target_modules=targets, target_parameters=target_parameters, tensors=len(tensors))
    if merged_only:
        log.warning("PEFT adapter directory %s lacks the adapters of %s: they are only in the merged export "
                    "(peft has no DoRA for GPT-OSS's fused expert parameters)", out_dir,
                    ", ".join(report["merged_only"]))
    return report


# --------------------------------------------------------- adapted megatron
def load_adapted_megatron(base_megatron_path: str | Path, adapter_path: str | Path, cfg: GptOssModelConfig,
                          dtype: torch.dtype = torch.float32):
    """A world-1 megatron model with the base weights and the adapters of `adapter_path` (unmerged).

    Needs the parallel state (`world_of_one`). The reference the merged export is checked against.
    """
    from megatron.core import dist_checkpointing

    from gptoss_model.checkpoint.layout import build_model, load_megatron_checkpoint
    from gptoss_model.model.peft import apply_adapters, is_adapter_key

    peft = read_peft_config(adapter_path)
    if peft is None:
        raise AdapterExportError(f"{adapter_path}: not an adapter checkpoint (no peft in its common state)")
    model = load_megatron_checkpoint(build_model(cfg, dtype), base_megatron_path)
    apply_adapters(model, peft)
    state = {k: v for k, v in model.sharded_state_dict().items() if is_adapter_key(k)}
    with refusals_named():
        loaded = dist_checkpointing.load({"model": state}, str(resolve_iter_dir(adapter_path)))
    missing, unexpected = model.load_state_dict(loaded["model"], strict=False)
    missing = [k for k in missing if is_adapter_key(k)]  # the base weights were loaded above
    if unexpected or missing:
        raise AdapterExportError(f"{adapter_path}: adapter tensors do not fit the model "
                                 f"(unexpected {unexpected[:3]}, missing {missing[:3]})")
    return model.eval()
