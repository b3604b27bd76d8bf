"""The two sides of a verification: the reference and the candidate, each built from one checkpoint.

One protocol, `Side`, serves both modes: whole-model verification (`verify.parity`) asks a
side for its logits; layer-wise verification (`verify.layers`) walks it block by block.
"""
from __future__ import annotations

import functools
import json
from pathlib import Path
from typing import Protocol

import torch

from gptoss_model.convert.writer import MAPPED_BYTES_LIMIT
from gptoss_model.model.config import GptOssModelConfig


class Side(Protocol):
    """A model from one checkpoint, run on ids the caller chooses; results are fp32 on the CPU.

    Used as a context manager: what it holds (models, open files, a process group) goes on
    exit. Whole-model verification calls `logits`; layer-wise verification calls `embed`,
    `prepare`, then `layer` for each decoder layer and `head`, so one layer's weights at a time.
    """

    name: str
    cfg: GptOssModelConfig

    def __enter__(self) -> "Side": ...

    def __exit__(self, *exc) -> None: ...

    def logits(self, ids: torch.Tensor) -> torch.Tensor:
        """ids [b, s] -> logits [b, s, V] of the whole model."""

    def embed(self, ids: torch.Tensor) -> torch.Tensor:
        """ids [b, s] -> the embedding rows [b, s, h]."""

    def prepare(self, ids: torch.Tensor, hidden: torch.Tensor) -> None:
        """Masks and rotary embeddings for `ids`, shared by every layer."""

    def layer(self, i: int, x: torch.Tensor, forced_experts: torch.Tensor | None = None) -> dict:
        """Layer i on x [b, s, h]: attention, mlp, output [b, s, h], router_logits [b*s, E] and
        experts [b*s, k] or routing_map [b*s, E] (`forced_experts`: use this expert choice)."""

    def head(self, x: torch.Tensor) -> torch.Tensor:
        """The final norm and output layer: x [b, s, h] -> logits [b, s, V]."""


@torch.no_grad()
def round_weights(model: torch.nn.Module, dtype: torch.dtype | None) -> torch.nn.Module:
    """Every floating-point weight rounded to `dtype` and kept in its own dtype (None: unchanged).

    A bf16 export of fp32 weights is a different model: its rounding alone can flip MoE
    routing and move logits past any bf16 tolerance. Rounded alike (the export casts with
    the same round-to-nearest-even), both sides hold the same values and may be held to the
    fp32 gate, which a wrong mapping still fails by far."""
    if dtype is not None:
        for p in model.parameters():
            if p.is_floating_point() and p.dtype != dtype:
                p.copy_(p.to(dtype).to(p.dtype))
    return model


def megatron_logits(model, ids: torch.Tensor) -> torch.Tensor:
    """fp32 logits on the CPU, computed where the model lives (the GPU on a CUDA machine)."""
    device = next(model.parameters()).device
    ids = ids.to(device)
    return model(ids, torch.arange(ids.shape[1], device=device).expand_as(ids), None).float().cpu()


def _flat(x: torch.Tensor) -> torch.Tensor:
    return x.reshape(-1, x.shape[-1])


class HFSide:
    """transformers' GPT-OSS from a HF checkpoint directory: the whole `GptOssForCausalLM`, or its
    modules built one at a time.

    `round_to`: the dtype the other side stores its weights in. The whole model has every
    floating-point weight rounded to it (a bf16 export rounds norms too); layer by layer, norms
    stay fp32 as megatron keeps them and MXFP4 values, exact in it, are not touched.
    """

    def __init__(self, hf_dir: str | Path, round_to: torch.dtype | None = None,
                 compute_dtype: torch.dtype = torch.float32):
        from transformers import GptOssConfig

        self.hf_dir = Path(hf_dir)
        self.cfg = GptOssModelConfig.from_hf_config(self.hf_dir)
        raw = json.loads((self.hf_dir / "config.json").read_text())
        raw.pop("quantization_config", None)
        self.hf_config = GptOssConfig(**{k: v for k, v in raw.items() if k not in ("architectures", "model_type")})
        self.hf_config._attn_implementation = "eager"
        self.round_to = round_to
        self.compute_dtype = compute_dtype
        self.name = f"transformers ({self.hf_dir.name})"
        self._model = None

    def __enter__(self) -> "HFSide":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    @functools.cached_property
    def ckpt(self):
        from gptoss_model.checkpoint.load_hf import HFCheckpoint

        # Mapped safetensors pages count in RSS: drop the mappings every 64 MiB read, so memory
        # stays one layer whatever the checkpoint size.
        return HFCheckpoint(self.hf_dir, self.cfg, max_mapped_bytes=MAPPED_BYTES_LIMIT)

    def logits(self, ids: torch.Tensor) -> torch.Tensor:
        if self._model is None:
            from gptoss_model.model.reference import load_reference_model

            self._model = round_weights(load_reference_model(self.hf_dir, dtype=self.compute_dtype), self.round_to)
        return self._model(ids).logits.float()

    def _read(self, name: str) -> torch.Tensor:
        t = self.ckpt.read(name)
        # The candidate stores weights (not norms) in `round_to`; MXFP4 values and tensors stored
        # in that dtype already are exact there (and rounding a 2 GB expert tensor costs 3 GB).
        exact = self.ckpt.is_mxfp4(name) or t.dtype == self.round_to
        if self.round_to is not None and self.round_to != torch.float32 and "norm" not in name and not exact:
            t = t.to(self.round_to)
        return t.to(self.compute_dtype)

    def embed(self, ids: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.embedding(ids, self._read("model.embed_tokens.weight"))

    def prepare(self, ids: torch.Tensor, hidden: torch.Tensor) -> None:
        from transformers.masking_utils import create_causal_mask, create_sliding_window_causal_mask
        from transformers.models.gpt_oss.modeling_gpt_oss import GptOssRotaryEmbedding

        pos = torch.arange(ids.shape[1]).unsqueeze(0)
        kw = {"config": self.hf_config, "inputs_embeds": hidden, "attention_mask": None, "cache": None}
        self.masks = {"full_attention": create_causal_mask(**kw),
                      "sliding_attention": create_sliding_window_causal_mask(**kw)}
        self.position_embeddings = GptOssRotaryEmbedding(self.hf_config)(hidden.float(), pos)
        self.position_embeddings = tuple(t.to(self.compute_dtype) for t in self.position_embeddings)
        self.position_ids = pos

    def layer(self, i: int, x: torch.Tensor, forced_experts: torch.Tensor | None = None) -> dict:
        """x [b, s, h] -> attention, mlp, output [b, s, h], router logits and chosen experts [b*s, k]."""
        from transformers.models.gpt_oss.modeling_gpt_oss import GptOssDecoderLayer

        with torch.device("meta"):
            layer = GptOssDecoderLayer(self.hf_config, i)
        prefix = f"model.layers.{i}."
        layer.load_state_dict({k: self._read(prefix + k) for k in layer.state_dict()}, strict=True, assign=True)
        layer.eval()
        attn, _ = layer.self_attn(hidden_states=layer.input_layernorm(x),
                                  attention_mask=self.masks[self.hf_config.layer_types[i]],
                                  position_embeddings=self.position_embeddings, position_ids=self.position_ids)
        x2 = x + attn
        h2 = _flat(layer.post_attention_layernorm(x2))
        logits, scores, experts = layer.mlp.router(h2)
        if forced_experts is not None:
            experts = forced_experts
            scores = torch.softmax(logits.gather(1, experts), dim=1)
        mlp = layer.mlp.experts(h2, experts, scores).reshape(x.shape)
        del layer
        self.ckpt.close()
        return {"attention": attn, "mlp": mlp, "output": x2 + mlp, "router_logits": logits, "experts": experts}

    def head(self, x: torch.Tensor) -> torch.Tensor:
        from transformers.models.gpt_oss.modeling_gpt_oss import GptOssRMSNorm

        norm = GptOssRMSNorm(self.cfg.hidden_size, eps=self.cfg.rms_norm_eps).to(self.compute_dtype)
        norm.weight.data = self._read("model.norm.weight")
        return norm(x) @ self._read("lm_head.weight").T

    def close(self) -> None:
        self._model = None
        if "ckpt" in self.__dict__:
            self.ckpt.close()


class MegatronSide:
    """gptoss_model's megatron-core model (world 1, local spec, fp32): whole, or one layer materialised
    at a time.

    `cfg` builds the modules (a different one than the checkpoint's gives a deliberately wrong
    model, e.g. for testing that the gate bites); weights come from a megatron checkpoint.
    """

    def __init__(self, megatron_path: str | Path, cfg: GptOssModelConfig,
                 compute_dtype: torch.dtype = torch.float32, base_megatron_path: str | Path | None = None,
                 round_to: torch.dtype | None = None):
        """`base_megatron_path`: `megatron_path` is an adapter-only LoRA/DoRA checkpoint; its adapters
        are merged (fp32) into this base's weights as they are read (the whole model runs them
        unmerged). `round_to`: the whole model's weights rounded to this dtype (see `HFSide`)."""
        from gptoss_model.checkpoint.layout import compute_device
        from gptoss_model.checkpoint.megatron_reader import MegatronCheckpointReader

        self.cfg = cfg
        self.compute_dtype = compute_dtype
        self.path, self.base_path, self.round_to = megatron_path, base_megatron_path, round_to
        self._whole = None
        if base_megatron_path is not None:
            from gptoss_model.export.adapters import AdapterExportError, AdaptedReader, open_adapted, read_peft_config

            peft = read_peft_config(megatron_path)
            if peft is None:
                raise AdapterExportError(f"{megatron_path}: a base checkpoint was given but it holds no adapters")
            self.reader = AdaptedReader(*open_adapted(megatron_path, base_megatron_path, cfg, peft), peft)
        else:
            self.reader = MegatronCheckpointReader(megatron_path, cfg)
        self.name = f"megatron ({self.reader.iter_dir.parent.name}/{self.reader.iter_dir.name})"
        self.device = compute_device()  # one layer at a time there; results come back to the CPU
        self._world = None

    def __enter__(self) -> "MegatronSide":
        from gptoss_model.checkpoint.layout import build_model
        from gptoss_model.model.parallel import world_of_one

        self.reader.__enter__()
        self._world = world_of_one("layer-wise verification")
        self._world.__enter__()
        self.model = build_model(self.cfg, self.compute_dtype, device="meta")
        # The rotary module keeps buffers computed at construction: build it for real from a
        # one-layer model of the same attention config (its other sizes are irrelevant here).
        small = self.cfg.replace(num_layers=1, num_experts=self.cfg.experts_per_token, vocab_size=64,
                                 layer_types=(self.cfg.layer_types[0],))
        self.rotary = build_model(small, torch.float32, device=self.device).rotary_pos_emb
        return self

    def __exit__(self, *exc) -> None:
        self._whole = None
        if self._world is not None:
            self._world.__exit__(*exc)
            self._world = None

    def logits(self, ids: torch.Tensor) -> torch.Tensor:
        if self._whole is None:
            from gptoss_model.checkpoint.layout import build_model, load_megatron_checkpoint

            if self.base_path is not None:  # adapter-only LoRA/DoRA checkpoint on its base, unmerged
                from gptoss_model.export.adapters import load_adapted_megatron

                self._whole = load_adapted_megatron(self.base_path, self.path, self.cfg)
            else:
                self._whole = load_megatron_checkpoint(build_model(self.cfg, self.compute_dtype), self.path).eval()
            round_weights(self._whole, self.round_to)
        return megatron_logits(self._whole, ids)

    @property
    def storage_dtype(self) -> torch.dtype:
        return self.reader.stored_dtype("output_layer.weight")

    def _materialise(self, module: torch.nn.Module, prefix: str) -> torch.nn.Module:
        module.to_empty(device=self.device)
        with torch.no_grad():
            # One parameter read at a time: the stored copy of a whole layer is never held
            # beside its fp32 parameters.
            for n, p in module.named_parameters():
                p.copy_(self.reader.read([prefix + n])[prefix + n])
        return module.eval()

    def embed(self, ids: torch.Tensor) -> torch.Tensor:
        w = self.reader.read(["embedding.word_embeddings.weight"])["embedding.word_embeddings.weight"]
        return torch.nn.functional.embedding(ids, w.to(self.compute_dtype))  # on the CPU: one lookup

    def prepare(self, ids: torch.Tensor, hidden: torch.Tensor) -> None:
        emb, _ = self.rotary(ids.shape[1])
        self.rotary_pos_emb = emb

    def layer(self, i: int, x: torch.Tensor, forced_experts: torch.Tensor | None = None) -> dict:
        layer = self._materialise(self.model.decoder.layers[i], f"decoder.layers.{i}.")
        b, s, h = x.shape
        xs = x.transpose(0, 1).contiguous().to(self.device)  # megatron: [s, b, h]
        if forced_experts is not None:
            forced_experts = forced_experts.to(self.device)
        captured = {}
        router = layer.mlp.router
        own_routing = router.routing

        def routing(logits, *args, **kwargs):
            flat = logits.reshape(-1, self.cfg.num_experts)
            captured["logits"] = flat
            if forced_experts is None:
                probs, routing_map = own_routing(logits, *args, **kwargs)
            else:  # the reference's choice, in megatron's token order [s, b]
                idx = forced_experts.reshape(b, s, -1).transpose(0, 1).reshape(s * b, -1)
                routing_map = torch.zeros_like(flat, dtype=torch.bool).scatter_(1, idx, True)
                probs = torch.zeros_like(flat).scatter_(1, idx, torch.softmax(flat.gather(1, idx), dim=1))
            captured["map"] = routing_map
            return probs, routing_map

        router.routing = routing
        try:
            attn, attn_bias = layer.self_attention(layer.input_layernorm(xs), attention_mask=None,
                                                   rotary_pos_emb=self.rotary_pos_emb)
            attn = attn + attn_bias if attn_bias is not None else attn
            x2 = xs + attn
            mlp, mlp_bias = layer.mlp(layer.pre_mlp_layernorm(x2))
            mlp = mlp + mlp_bias if mlp_bias is not None else mlp
        finally:
            del router.routing
        out = {"attention": attn.transpose(0, 1), "mlp": mlp.transpose(0, 1), "output": (x2 + mlp).transpose(0, 1),
               "router_logits": captured["logits"].reshape(s, b, -1).transpose(0, 1).reshape(b * s, -1),
               "routing_map": captured["map"].reshape(s, b, -1).transpose(0, 1).reshape(b * s, -1)}
        layer.to("meta")
        return {k: v.cpu() for k, v in out.items()}

    def head(self, x: torch.Tensor) -> torch.Tensor:
        norm = self._materialise(self.model.decoder.final_layernorm, "decoder.final_layernorm.")
        w = self.reader.read(["output_layer.weight"])["output_layer.weight"].to(self.device, self.compute_dtype)
        out = norm(x.to(self.device)) @ w.T
        norm.to("meta")
        return out.cpu()

    def close(self) -> None:
        pass
