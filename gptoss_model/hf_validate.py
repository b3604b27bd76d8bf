"""Open a Hugging Face GPT-OSS checkpoint directory and refuse it before anything is built on it.

Every stage that reads an HF checkpoint (convert, verify, export's tokenizer
source) calls `open_validated_checkpoint` first, so a wrong model type, a
missing or misshaped tensor or a tensor GPT-OSS does not have is reported
naming the file, before an output byte is written.
"""
from __future__ import annotations

import json
from pathlib import Path

from gptoss_model.config import GptOssModelConfig, NotGptOssConfigError
from gptoss_model.load_hf import CheckpointError, HFCheckpoint


def read_config_json(hf_dir: Path) -> dict:
    path = hf_dir / "config.json"
    if not path.is_file():
        raise CheckpointError(f"{hf_dir}: no config.json; not a Hugging Face checkpoint directory")
    try:
        raw = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise CheckpointError(f"{path}: not valid JSON ({exc})") from None
    if not isinstance(raw, dict):
        raise CheckpointError(f"{path}: expected a JSON object, got {type(raw).__name__}")
    return raw


def open_validated_checkpoint(hf_dir: str | Path, **checkpoint_options) -> HFCheckpoint:
    """An open HFCheckpoint whose config is GPT-OSS and whose tensors are exactly GPT-OSS's.

    NotGptOssConfigError: config.json is not GPT-OSS (model_type/architecture/fields).
    CheckpointError: a tensor is missing, has the wrong shape, or is not part of GPT-OSS.
    """
    hf_dir = Path(hf_dir)
    raw = read_config_json(hf_dir)
    model_type, archs = raw.get("model_type"), raw.get("architectures")
    # Stricter than the config reader (which accepts either): both must say GPT-OSS when present.
    if (model_type is not None and model_type != "gpt_oss") or (archs and "GptOssForCausalLM" not in archs):
        raise NotGptOssConfigError(f"{hf_dir / 'config.json'}: not a GPT-OSS checkpoint (model_type="
                                   f"{model_type!r}, architectures={archs!r}); the converter needs "
                                   "model_type 'gpt_oss' and architecture 'GptOssForCausalLM'")
    cfg = GptOssModelConfig.from_hf_config(hf_dir)  # NotGptOssConfigError on anything else
    ckpt = HFCheckpoint(hf_dir, cfg, **checkpoint_options)
    ckpt.validate()
    unknown = ckpt.unknown_tensors()
    if unknown:
        more = f" (+{len(unknown) - 5} more)" if len(unknown) > 5 else ""
        raise CheckpointError(f"checkpoint {hf_dir} holds tensors that are not part of GPT-OSS: "
                              f"{unknown[:5]}{more}; refusing to convert (they would be dropped)")
    return ckpt
