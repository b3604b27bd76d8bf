"""Open a Hugging Face GPT-OSS checkpoint directory and refuse it before anything is built on it.

Every stage that reads an HF checkpoint (convert, verify, export's tokenizer
source) calls `open_validated_checkpoint` first, so a wrong model type, a
missing or misshaped tensor or a tensor GPT-OSS does not have is reported
naming the file, before an output byte is written.
"""
from __future__ import annotations

from pathlib import Path

from gptoss_model.model.config import GptOssModelConfig, NotGptOssConfigError, read_json_object
from gptoss_model.checkpoint.hf_reader import CheckpointError, HFCheckpoint

INDEX_FILE = "model.safetensors.index.json"
# safetensors dtype codes a GPT-OSS tensor may be stored in: floats for weights, uint8 for MXFP4
FLOAT_DTYPES = {"BF16", "F16", "F32"}
MXFP4_DTYPE = "U8"


def read_checkpoint_json(path: Path, what: str) -> dict:
    """A JSON object from `path`; anything else is a CheckpointError naming the file."""
    if not path.is_file():
        raise CheckpointError(f"{path.parent}: no {path.name}; {what}")
    return read_json_object(path, CheckpointError)


def read_config_json(hf_dir: Path) -> dict:
    return read_checkpoint_json(hf_dir / "config.json", "not a Hugging Face checkpoint directory")


def safetensors_files(hf_dir: Path) -> list[Path]:
    """The weight files the checkpoint names (through its index, or the single file)."""
    index = hf_dir / INDEX_FILE
    if index.is_file():
        weight_map = read_checkpoint_json(index, "").get("weight_map")
        if not isinstance(weight_map, dict) or not weight_map:
            raise CheckpointError(f"{index}: no weight_map (or an empty one)")
        files = sorted({hf_dir / str(v) for v in weight_map.values()})
        missing = [f.name for f in files if not f.is_file()]
        if missing:
            raise CheckpointError(f"{index} maps tensors to {missing[:3]}, which do not exist")
        return files
    single = hf_dir / "model.safetensors"
    if not single.is_file():
        raise CheckpointError(f"{hf_dir}: neither {INDEX_FILE} nor model.safetensors")
    return [single]


def require_checkpoint_files(paths: list[str], where: str) -> None:
    """A downloaded file set is a checkpoint only with a config.json and safetensors weights."""
    missing = [what for what, ok in (("config.json", "config.json" in paths),
                                     ("*.safetensors weights", any(p.endswith(".safetensors") for p in paths)))
               if not ok]
    if missing:
        raise CheckpointError(f"{where}: not a Hugging Face checkpoint: no {' and no '.join(missing)} among its "
                              f"{len(paths)} file(s) (check the source and allow/ignore patterns)")


def check_tensor_files(hf_dir: Path) -> None:
    """Every weight file opens (a truncated one is named) and every tensor has a dtype GPT-OSS uses.

    An int8 `lm_head.weight` would otherwise be cast to bf16 and committed: shapes alone
    do not catch it, and the logit gate does not run on full-size models.
    """
    from safetensors import SafetensorError, safe_open

    for file in safetensors_files(hf_dir):
        try:
            with safe_open(file, "pt") as f:
                for name in f.keys():
                    dtype = f.get_slice(name).get_dtype()
                    want = {MXFP4_DTYPE} if name.endswith(("_blocks", "_scales")) else FLOAT_DTYPES
                    if dtype not in want:
                        raise CheckpointError(f"{file}: tensor {name!r} is stored as {dtype}; expected "
                                              f"{' or '.join(sorted(want))}")
        except SafetensorError as exc:
            raise CheckpointError(f"{file}: not a readable safetensors file ({exc})") from None


def open_validated_checkpoint(hf_dir: str | Path, **checkpoint_options) -> HFCheckpoint:
    """An open HFCheckpoint whose config is GPT-OSS and whose tensors are exactly GPT-OSS's.

    NotGptOssConfigError: config.json is not GPT-OSS (model_type/architecture/fields).
    CheckpointError: a file is unreadable (named), a tensor is missing, has the wrong shape or
    dtype, or is not part of GPT-OSS.
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
    check_tensor_files(hf_dir)
    ckpt = HFCheckpoint(hf_dir, cfg, **checkpoint_options)
    ckpt.validate()
    unknown = ckpt.unknown_tensors()
    if unknown:
        more = f" (+{len(unknown) - 5} more)" if len(unknown) > 5 else ""
        raise CheckpointError(f"checkpoint {hf_dir} holds tensors that are not part of GPT-OSS: "
                              f"{unknown[:5]}{more}; refusing to convert (they would be dropped)")
    return ckpt
