"""Pre-flight checks of everything a run will read or write, before any model is built.

Each check returns (field, why) pairs; `preflight` reports them with the config rules,
one line per problem. They read headers and small JSON/YAML files only (never a
pickle): the .idx header of every data prefix (`data.indexed.check_indexed`), `sft.json`, a checkpoint's tracker,
`metadata.json`, `run_config.yaml` and `conversion_report.json`, an HF `config.json`.
"""

from __future__ import annotations

import json
import struct
import uuid
from pathlib import Path

import yaml

from gptoss_model.model.config import GptOssModelConfig
from gptoss_model.data.indexed import check_indexed
from gptoss_model.training.config import RunConfig

_TOKEN_KINDS = "iu"  # token ids are integers (numpy kinds: signed, unsigned)


def _indexed_problems(prefix: str, field: str, *, tokens: bool = False) -> list[tuple[str, str]]:
    """The .bin/.idx pair of one prefix exists, agrees with its index header and holds documents
    (and, with `tokens`, integer token ids)."""
    for ext in (".bin", ".idx"):
        if prefix.endswith(ext):
            return [(field, f"{prefix}: give the prefix without {ext} (data_prefixes name "
                            f"{prefix[: -len(ext)]!r})")]
    missing = [ext for ext in (".bin", ".idx") if not Path(prefix + ext).is_file()]
    if missing:
        return [(field, f"{prefix}{'/'.join(missing)} does not exist")]
    try:
        dtype, sequences, documents = check_indexed(prefix)
    except (OSError, ValueError, struct.error) as e:
        return [(field, f"{prefix}.idx: {e}")]
    if sequences == 0 or documents == 0:
        return [(field, f"{prefix}.idx: holds no documents")]
    if tokens and dtype.kind not in _TOKEN_KINDS:
        return [(field, f"{prefix}.idx: token dtype {dtype} is not an integer type")]
    return []


def data_problems(run: RunConfig) -> list[tuple[str, str]]:
    from gptoss_model.data.packed_sft import PARTS, SFT_META_FILE, part_prefix

    problems = []
    for i, prefix in enumerate(run.data.data_paths):
        field = f"data.data_paths[{i}]"
        packed = all(Path(part_prefix(prefix, p) + ".idx").is_file() for p in PARTS)
        if run.data.kind == "sft":
            if not packed:
                plain = not _indexed_problems(prefix, field)
                problems.append((field, f"{prefix}: data.kind=sft needs packed SFT shards "
                                        f"({part_prefix(prefix, 'tokens')}.bin/.idx and its loss mask)"
                                 + ("; this is a pretraining prefix: set data.kind=pretrain" if plain else "")))
                continue
            for part in PARTS:
                problems += _indexed_problems(part_prefix(prefix, part), field)
            meta = Path(prefix).parent / SFT_META_FILE
            if meta.is_file():
                try:
                    json.loads(meta.read_text())
                except ValueError as e:
                    problems.append((field, f"{meta}: not valid JSON ({e})"))
            continue
        found = _indexed_problems(prefix, field, tokens=True)
        if found and packed:
            found = [(field, f"{prefix}: packed SFT shards (tokens/loss_mask/doc_lengths), not pretraining "
                             "data: set data.kind=sft")]
        problems += found
    return problems


def _yaml_section(path: Path, section: str) -> dict | None:
    try:
        data = yaml.safe_load(path.read_text())
    except (OSError, yaml.YAMLError):
        return None
    return (data or {}).get(section) if isinstance(data, dict) else None


def megatron_checkpoint_problems(root: Path, field: str) -> tuple[list[tuple[str, str]], Path | None]:
    """A complete Megatron-LM checkpoint: tracker -> iteration dir with metadata.json."""
    from gptoss_model.checkpoint.layout import CheckpointLayoutError, checkpoint_iter_dir

    try:
        it_dir = checkpoint_iter_dir(root)
    except CheckpointLayoutError as e:
        return [(field, str(e))], None
    if not (it_dir / "metadata.json").is_file():
        return [(field, f"{it_dir}: missing or incomplete (no metadata.json), although the tracker names it")], None
    return [], it_dir


def pretrained_problems(run: RunConfig, m: GptOssModelConfig) -> list[tuple[str, str]]:
    from gptoss_model.checkpoint.layout import TRACKER_FILE

    source = run.checkpoint.pretrained_checkpoint
    if not source:
        return []
    field, root = "checkpoint.pretrained_checkpoint", Path(source)
    if not root.exists():
        return [(field, f"{root} does not exist")]
    if (root / "config.json").is_file() and not (root / TRACKER_FILE).is_file():
        try:
            theirs = GptOssModelConfig.from_hf_config(root)
        except Exception as e:  # noqa: BLE001 - any unreadable config is this field's problem
            return [(field, f"{root / 'config.json'}: {e}")]
        return _architecture_problems(field, root / "config.json", theirs, m)
    if not (root / TRACKER_FILE).is_file():
        return [(field, f"{root}: neither a megatron checkpoint (no {TRACKER_FILE}) nor a Hugging Face "
                        "checkpoint (no config.json)")]
    problems, it_dir = megatron_checkpoint_problems(root, field)
    if it_dir is None:
        return problems
    peft = _yaml_section(it_dir / "run_config.yaml", "peft")
    if peft and peft.get("method"):
        problems.append((field, f"{it_dir} holds only {peft['method']} adapters; the base must be full weights "
                                "(the convert stage's output, or a full training checkpoint)"))
    report = root / "conversion_report.json"
    if report.is_file():
        try:
            r = json.loads(report.read_text())
        except ValueError as e:
            return problems + [(field, f"{report}: not valid JSON ({e})")]
        for key, mine in (("num_layers", m.num_layers), ("num_experts", m.num_experts)):
            if key in r and r[key] != mine:
                problems.append((field, f"{report}: {key}={r[key]} but the model has {mine} "
                                        "(model.preset / model.hf_config describe another architecture)"))
    return problems


def _architecture_problems(field: str, where: Path, theirs: GptOssModelConfig,
                           mine: GptOssModelConfig) -> list[tuple[str, str]]:
    keys = ("num_layers", "hidden_size", "num_attention_heads", "num_key_value_heads", "num_experts",
            "intermediate_size", "vocab_size")
    diff = [f"{k}={getattr(theirs, k)} (model: {getattr(mine, k)})" for k in keys
            if getattr(theirs, k) != getattr(mine, k)]
    return [(field, f"{where} describes another architecture: {', '.join(diff)}")] if diff else []


def resume_problems(run: RunConfig) -> list[tuple[str, str]]:
    """The checkpoint a restart resumes from (checkpoint.load, default the save dir)."""
    from gptoss_model.checkpoint.layout import TRACKER_FILE

    root = run.load_dir()
    field = "checkpoint.load" if run.checkpoint.load else "checkpoint.save"
    if not (root / TRACKER_FILE).is_file():
        if run.checkpoint.load and not root.is_dir():
            return [(field, f"{root} does not exist (nothing to resume from)")]
        return []
    problems, it_dir = megatron_checkpoint_problems(root, field)
    if it_dir is None:
        return problems
    peft = _yaml_section(it_dir / "run_config.yaml", "peft") or {}
    saved = peft.get("method")
    if saved != run.peft.method:
        problems.append((field, f"{it_dir} was saved with peft.method={saved}, this run has "
                                f"peft.method={run.peft.method}; point checkpoint.load elsewhere or match peft"))
    return problems


def writable_problems(run: RunConfig) -> list[tuple[str, str]]:
    """Create-and-remove probes where the run writes: checkpoints, and the run dir (metrics)."""
    problems = []
    for field, target in (("checkpoint.save", run.save_dir()), ("dir", Path(run.dir))):
        existing = target
        while not existing.exists() and existing != existing.parent:
            existing = existing.parent
        if not existing.is_dir():
            problems.append((field, f"{target}: {existing} is not a directory"))
            continue
        probe = existing / f".gptoss-write-probe-{uuid.uuid4().hex}"
        try:
            probe.mkdir()
            probe.rmdir()
        except OSError as e:
            problems.append((field, f"{target} is not writable ({e.strerror} creating a directory in {existing})"))
    return problems
