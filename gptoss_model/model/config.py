"""GPT-OSS model configuration: one dataclass, named presets, and the Hugging Face reader.

The dataclass speaks the Hugging Face vocabulary (the checkpoint is the source
of truth); `gptoss_model.model.build` translates it to megatron-core's
TransformerConfig. No torch or megatron import here, so reading a config is
cheap and safe in any process (Prefect workers included).
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Mapping

from gptoss_model.errors import PermanentError

SLIDING = "sliding_attention"
FULL = "full_attention"

# megatron-core's quick_gelu is x * sigmoid(1.702 * x): the GLU gain is not a
# parameter there, so a checkpoint with another swiglu_alpha cannot be built.
MCORE_QUICK_GELU_ALPHA = 1.702


def read_json_object(path: Path, error: type[Exception]) -> dict:
    """The JSON object in `path`; invalid JSON or another JSON type raises `error` naming the file."""
    try:
        value = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise error(f"{path}: not valid JSON ({exc})") from None
    if not isinstance(value, dict):
        raise error(f"{path}: expected a JSON object, got {type(value).__name__}")
    return value


class NotGptOssConfigError(PermanentError, ValueError):
    """A config.json that does not describe a GPT-OSS model."""


def alternating_layer_types(num_layers: int) -> tuple[str, ...]:
    """GPT-OSS pattern: sliding window at even (0-based) layers, full attention at odd ones."""
    return tuple(SLIDING if i % 2 == 0 else FULL for i in range(num_layers))


@dataclass(frozen=True)
class GptOssModelConfig:
    num_layers: int
    hidden_size: int
    intermediate_size: int  # per-expert FFN width
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    num_experts: int
    experts_per_token: int
    vocab_size: int
    sliding_window: int
    layer_types: tuple[str, ...] = ()
    rope_theta: float = 150000.0
    # yarn; `rope_truncate=False` means the correction range is NOT rounded to
    # integers (getting this wrong costs ~0.7 in logits).
    rope_factor: float = 32.0
    rope_original_max_position_embeddings: int = 4096
    rope_beta_fast: float = 32.0
    rope_beta_slow: float = 1.0
    rope_truncate: bool = False
    max_position_embeddings: int = 131072
    swiglu_limit: float = 7.0
    swiglu_alpha: float = MCORE_QUICK_GELU_ALPHA
    rms_norm_eps: float = 1e-5
    attention_bias: bool = True
    tie_word_embeddings: bool = False
    initializer_range: float = 0.02
    # Tokenizer metadata, not architecture: ignored by ==.
    bos_token_id: int | None = field(default=None, compare=False)
    eos_token_id: int | list[int] | None = field(default=None, compare=False)
    pad_token_id: int | None = field(default=None, compare=False)
    # Keys of the source config.json that we do not model, kept for export.
    hf_extra: Mapping[str, Any] = field(default_factory=dict, compare=False, repr=False)

    def __post_init__(self):
        if not self.layer_types:
            object.__setattr__(self, "layer_types", alternating_layer_types(self.num_layers))
        else:
            object.__setattr__(self, "layer_types", tuple(self.layer_types))
        self.validate()

    # ------------------------------------------------------------------ checks
    def validate(self) -> None:
        problems = []
        if len(self.layer_types) != self.num_layers:
            problems.append(f"layer_types has {len(self.layer_types)} entries for {self.num_layers} layers")
        bad = sorted(set(self.layer_types) - {SLIDING, FULL})
        if bad:
            problems.append(f"unknown layer_types {bad}")
        if self.num_attention_heads % self.num_key_value_heads:
            problems.append("num_attention_heads must be a multiple of num_key_value_heads")
        if not 0 < self.experts_per_token <= self.num_experts:
            problems.append("experts_per_token must be in [1, num_experts]")
        if abs(self.swiglu_alpha - MCORE_QUICK_GELU_ALPHA) > 1e-9:
            problems.append(f"swiglu_alpha={self.swiglu_alpha}: megatron-core only has {MCORE_QUICK_GELU_ALPHA}")
        if not self.attention_bias:
            problems.append("attention_bias=False is not a GPT-OSS layout")
        if self.tie_word_embeddings:
            problems.append("tie_word_embeddings=True is not a GPT-OSS layout (lm_head is separate)")
        if problems:
            raise ValueError("invalid GPT-OSS config: " + "; ".join(problems))

    # --------------------------------------------------------------- derived
    @property
    def heads_per_group(self) -> int:
        return self.num_attention_heads // self.num_key_value_heads

    def replace(self, **changes) -> "GptOssModelConfig":
        if "num_layers" in changes and "layer_types" not in changes:
            changes["layer_types"] = alternating_layer_types(changes["num_layers"])
        return dataclasses.replace(self, **changes)

    # ------------------------------------------------------------- HF format
    def to_hf_config(self) -> dict[str, Any]:
        """A config.json dict in the layout of the openai/gpt-oss repositories."""
        out = dict(self.hf_extra)
        out.update(
            architectures=["GptOssForCausalLM"],
            model_type="gpt_oss",
            num_hidden_layers=self.num_layers,
            hidden_size=self.hidden_size,
            intermediate_size=self.intermediate_size,
            num_attention_heads=self.num_attention_heads,
            num_key_value_heads=self.num_key_value_heads,
            head_dim=self.head_dim,
            num_local_experts=self.num_experts,
            num_experts_per_tok=self.experts_per_token,
            experts_per_token=self.experts_per_token,
            vocab_size=self.vocab_size,
            sliding_window=self.sliding_window,
            layer_types=list(self.layer_types),
            rope_theta=self.rope_theta,
            rope_scaling=dict(
                rope_type="yarn",
                factor=self.rope_factor,
                original_max_position_embeddings=self.rope_original_max_position_embeddings,
                beta_fast=self.rope_beta_fast,
                beta_slow=self.rope_beta_slow,
                truncate=self.rope_truncate,
            ),
            initial_context_length=self.rope_original_max_position_embeddings,
            max_position_embeddings=self.max_position_embeddings,
            swiglu_limit=self.swiglu_limit,
            rms_norm_eps=self.rms_norm_eps,
            attention_bias=self.attention_bias,
            attention_dropout=0.0,
            tie_word_embeddings=self.tie_word_embeddings,
            initializer_range=self.initializer_range,
            hidden_act="silu",
        )
        for key in ("bos_token_id", "eos_token_id", "pad_token_id"):
            if getattr(self, key) is not None:
                out[key] = getattr(self, key)
        out.pop("rope_parameters", None)  # superseded by rope_theta + rope_scaling above
        return out

    @classmethod
    def from_hf_config(cls, source: "Mapping[str, Any] | str | Path") -> "GptOssModelConfig":
        """Build from a config.json dict, a config.json path, or a checkpoint directory."""
        where = "<dict>"
        if not isinstance(source, Mapping):
            path = Path(source)
            if path.is_dir():
                path = path / "config.json"
            where = str(path)
            if not path.is_file():
                raise FileNotFoundError(f"no config.json at {path}")
            source = read_json_object(path, NotGptOssConfigError)
        return _from_hf_dict(dict(source), where)


# Keys read by _from_hf_dict; everything else lands in hf_extra.
_READ_KEYS = {
    "architectures", "model_type", "num_hidden_layers", "hidden_size", "intermediate_size",
    "num_attention_heads", "num_key_value_heads", "head_dim", "num_local_experts",
    "num_experts_per_tok", "experts_per_token", "vocab_size", "sliding_window", "layer_types",
    "rope_theta", "rope_scaling", "rope_parameters", "max_position_embeddings", "swiglu_limit",
    "swiglu_alpha", "rms_norm_eps", "attention_bias", "tie_word_embeddings",
    "initializer_range", "bos_token_id", "eos_token_id", "pad_token_id",
}


def _from_hf_dict(d: dict[str, Any], where: str) -> GptOssModelConfig:
    model_type = d.get("model_type")
    archs = d.get("architectures") or []
    if model_type != "gpt_oss" and "GptOssForCausalLM" not in archs:
        raise NotGptOssConfigError(
            f"{where}: not a GPT-OSS config (model_type={model_type!r}, architectures={archs!r}); "
            "expected model_type 'gpt_oss' / architecture 'GptOssForCausalLM'"
        )
    required = ["num_hidden_layers", "hidden_size", "intermediate_size", "num_attention_heads",
                "num_key_value_heads", "num_local_experts", "vocab_size"]
    missing = [k for k in required if k not in d]
    if missing:
        raise NotGptOssConfigError(f"{where}: GPT-OSS config lacks required keys {missing}")

    # transformers <5 writes rope_theta + rope_scaling; >=5 writes rope_parameters (theta inside).
    rope = dict(d.get("rope_scaling") or {})
    rope.update(d.get("rope_parameters") or {})
    rope_type = rope.get("rope_type", rope.get("type", "yarn"))
    if rope_type != "yarn":
        raise NotGptOssConfigError(f"{where}: rope_type {rope_type!r}; GPT-OSS uses yarn")
    theta = d.get("rope_theta", rope.get("rope_theta", 150000.0))
    topk = d.get("num_experts_per_tok", d.get("experts_per_token", 4))
    n_heads = d["num_attention_heads"]
    try:
        return GptOssModelConfig(
            num_layers=d["num_hidden_layers"],
            hidden_size=d["hidden_size"],
            intermediate_size=d["intermediate_size"],
            num_attention_heads=n_heads,
            num_key_value_heads=d["num_key_value_heads"],
            head_dim=d.get("head_dim") or d["hidden_size"] // n_heads,
            num_experts=d["num_local_experts"],
            experts_per_token=topk,
            vocab_size=d["vocab_size"],
            sliding_window=d.get("sliding_window", 128),
            layer_types=tuple(d.get("layer_types") or ()),
            rope_theta=float(theta),
            rope_factor=float(rope.get("factor", 32.0)),
            rope_original_max_position_embeddings=int(
                rope.get("original_max_position_embeddings", d.get("initial_context_length", 4096))),
            rope_beta_fast=float(rope.get("beta_fast", 32.0)),
            rope_beta_slow=float(rope.get("beta_slow", 1.0)),
            rope_truncate=bool(rope.get("truncate", False)),
            max_position_embeddings=d.get("max_position_embeddings", 131072),
            swiglu_limit=float(d.get("swiglu_limit", 7.0)),
            swiglu_alpha=float(d.get("swiglu_alpha", MCORE_QUICK_GELU_ALPHA)),
            rms_norm_eps=float(d.get("rms_norm_eps", 1e-5)),
            attention_bias=bool(d.get("attention_bias", True)),
            tie_word_embeddings=bool(d.get("tie_word_embeddings", False)),
            initializer_range=float(d.get("initializer_range", 0.02)),
            bos_token_id=d.get("bos_token_id"),
            eos_token_id=d.get("eos_token_id"),
            pad_token_id=d.get("pad_token_id"),
            hf_extra={k: v for k, v in d.items() if k not in _READ_KEYS},
        )
    except ValueError as e:
        raise NotGptOssConfigError(f"{where}: {e}") from e


# ---------------------------------------------------------------------- presets
def gpt_oss_20b() -> GptOssModelConfig:
    return GptOssModelConfig(
        num_layers=24, hidden_size=2880, intermediate_size=2880, num_attention_heads=64,
        num_key_value_heads=8, head_dim=64, num_experts=32, experts_per_token=4,
        vocab_size=201088, sliding_window=128, eos_token_id=200002, pad_token_id=199999,
    )


def gpt_oss_120b() -> GptOssModelConfig:
    return gpt_oss_20b().replace(num_layers=36, num_experts=128)


def tiny() -> GptOssModelConfig:
    """Test/demo size. intermediate_size != hidden_size on purpose: a transposed
    down_proj must fail on shape or on logits, never pass silently."""
    return GptOssModelConfig(
        num_layers=4, hidden_size=64, intermediate_size=48, num_attention_heads=4,
        num_key_value_heads=2, head_dim=16, num_experts=8, experts_per_token=4,
        vocab_size=512, sliding_window=8, rope_original_max_position_embeddings=32,
        max_position_embeddings=1024,
    )


PRESETS = {"tiny": tiny, "gpt_oss_20b": gpt_oss_20b, "gpt_oss_120b": gpt_oss_120b}


def preset(name: str) -> GptOssModelConfig:
    key = name.replace("-", "_").lower()
    if key not in PRESETS:
        raise KeyError(f"unknown preset {name!r}; known: {sorted(PRESETS)}")
    return PRESETS[key]()


@dataclass
class PeftConfig:
    """The adapters a run trains (the `peft` section of a training config): part of the model,
    since a checkpoint's reader must rebuild them to read it."""

    method: Literal["lora", "dora"] | None = None  # None: full training
    dim: int = 32
    alpha: float = 32.0
    dropout: float = 0.0
    target_modules: list[str] = field(
        default_factory=lambda: ["linear_qkv", "linear_proj", "linear_fc1", "linear_fc2"])
