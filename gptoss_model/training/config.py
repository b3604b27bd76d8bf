"""The training run's configuration: a tree of plain dataclasses, one per component.

    run = RunConfig(name="demo", dir="/results/demo")
    run = apply_overrides(run, ["train.train_iters=20", "optimizer.lr=1e-3"])
    save_yaml(run, "run.yaml"); assert load_yaml("run.yaml") == run

Each section is owned by the code that reads it (model -> build, parallelism
-> parallel_state, data -> datasets, train -> the loop, optimizer ->
get_megatron_optimizer, scheduler -> OptimizerParamScheduler, checkpoint,
logging, peft). Every field is a YAML scalar or list, so the same tree comes
from a recipe function, a YAML file, `key.sub=value` command-line overrides
or a Prefect parameter dict, and any field of any section can be overridden.
Unknown keys and wrongly typed values are refused with the dotted key named; a
`Literal[...]` field also names the values it takes.

No torch or megatron import here: Prefect workers read configs cheaply.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Literal, Mapping

import yaml

from gptoss_model.errors import PermanentError
from gptoss_model.model.config import PeftConfig


class ConfigError(PermanentError, ValueError):
    """A config that is malformed or refused by the pre-flight checks (names the field)."""


@dataclass
class ModelConfig:
    preset: str = "tiny"  # tiny | gpt_oss_20b | gpt_oss_120b (ignored when hf_config is set)
    hf_config: str | None = None  # HF checkpoint dir or config.json: the architecture source of truth
    params_dtype: Literal["auto", "bfloat16", "float32"] = "auto"  # auto: bfloat16 with CUDA, float32 on CPU
    moe_token_dispatcher_type: Literal["alltoall", "allgather"] = "alltoall"
    moe_grouped_gemm: bool = True  # used where Transformer Engine runs (GPU)
    moe_permute_fusion: bool = True


@dataclass
class ParallelismConfig:
    tensor_model_parallel_size: int = 1
    pipeline_model_parallel_size: int = 1
    expert_model_parallel_size: int = 1
    expert_tensor_parallel_size: int = 1
    context_parallel_size: int = 1
    sequence_parallel: bool = False
    use_distributed_optimizer: bool = False
    overlap_grad_reduce: bool = False
    overlap_param_gather: bool = False


@dataclass
class DataConfig:
    kind: Literal["pretrain", "sft"] = "pretrain"  # GPTDataset over .bin/.idx | packed, loss-masked
    data_paths: list[str] = field(default_factory=list)  # prefixes (without .bin/.idx)
    blend_weights: list[float] | None = None  # one per data path; None: by size
    split: str = "98,2,0"  # train,valid,test shares of each prefix (pretrain)
    seq_length: int = 2048
    eod_token_id: int = 199999  # o200k_harmony <|endoftext|>
    pad_token_id: int | None = None  # sft: default from the dataset's sft.json
    reset_position_ids: bool = False  # pretrain: restart positions after each EOD
    reset_attention_mask: bool = False  # pretrain: no attention across EOD
    eod_mask_loss: bool = False
    seed: int = 1234
    cache_dir: str | None = None  # GPTDataset index cache; default {run dir}/data_cache


@dataclass
class TrainConfig:
    train_iters: int = 1000
    global_batch_size: int = 128
    micro_batch_size: int = 1
    eval_interval: int = 100  # 0: never
    eval_iters: int = 10
    manual_gc: bool = True
    manual_gc_interval: int = 100  # 0: collect only at start
    seed: int = 1234
    exit_on_nonfinite: bool = True
    replica_check_interval: int = 100  # compare every replicated parameter across ranks every N steps; 0: never
    hang_timeout: float = 300.0  # seconds without progress (of any rank) before the run ends; 0: no watchdog
    collective_timeout_minutes: int = 30  # torch.distributed's process-group timeout
    # A file whose appearance (any rank seeing it) makes every rank save a checkpoint and exit with
    # EXIT_SAVED: how a scheduler's "time limit near" signal becomes a clean stop (infra/slurm).
    stop_file: str | None = None
    # The input files' sha256 list (training/input_digests.py) the first rank of every node checks
    # before the model is built; the train stage writes it beside the run config.
    input_digests: str | None = None


@dataclass
class OptimizerConfig:
    optimizer: Literal["adam", "sgd"] = "adam"
    lr: float = 3e-4
    min_lr: float = 3e-5
    adam_beta1: float = 0.9
    adam_beta2: float = 0.95
    adam_eps: float = 1e-8
    weight_decay: float = 0.1
    clip_grad: float = 1.0
    bf16: bool | None = None  # None: with CUDA (fp32 master weights and moments)


@dataclass
class SchedulerConfig:
    lr_warmup_iters: int = 2000
    lr_decay_iters: int | None = None  # None: train_iters
    lr_decay_style: Literal["cosine", "linear", "constant", "inverse-square-root"] = "cosine"
    lr_warmup_init: float = 0.0


@dataclass
class CheckpointConfig:
    save: str | None = None  # where iter_XXXXXXX/ go; default {run dir}/checkpoints
    save_interval: int = 500  # 0: only at the end
    load: str | None = None  # resume from here (newest complete); default: save
    pretrained_checkpoint: str | None = None  # initial weights: megatron dir (tracker) or HF dir
    save_optim: bool = True
    save_rng: bool = True
    save_final: bool = True


@dataclass
class LoggingConfig:
    log_interval: int = 1
    tensorboard_dir: str | None = None  # default {run dir}/tensorboard; "" disables
    metrics_jsonl: str | None = None  # default {run dir}/metrics.jsonl
    memory_check: bool = True  # pre-flight: refuse a run whose estimate exceeds the device


@dataclass
class RunConfig:
    name: str = "gptoss-run"
    dir: str = "results/gptoss-run"
    model: ModelConfig = field(default_factory=ModelConfig)
    parallelism: ParallelismConfig = field(default_factory=ParallelismConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    optimizer: OptimizerConfig = field(default_factory=OptimizerConfig)
    scheduler: SchedulerConfig = field(default_factory=SchedulerConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    peft: PeftConfig = field(default_factory=PeftConfig)

    # ------------------------------------------------------------ resolved paths
    def save_dir(self) -> Path:
        return Path(self.checkpoint.save or Path(self.dir) / "checkpoints")

    def load_dir(self) -> Path:
        return Path(self.checkpoint.load or self.save_dir())

    def tensorboard_dir(self) -> Path | None:
        if self.logging.tensorboard_dir == "":
            return None
        return Path(self.logging.tensorboard_dir or Path(self.dir) / "tensorboard")

    def metrics_path(self) -> Path:
        return Path(self.logging.metrics_jsonl or Path(self.dir) / "metrics.jsonl")

    def data_cache_dir(self) -> Path:
        return Path(self.data.cache_dir or Path(self.dir) / "data_cache")

    def lr_decay_iters(self) -> int:
        return self.scheduler.lr_decay_iters or self.train.train_iters


# ------------------------------------------------------------- dict / YAML
def to_dict(cfg) -> dict:
    return dataclasses.asdict(cfg)


def from_dict(data: Mapping[str, Any], cls=RunConfig, where: str = "") -> Any:
    """Build `cls` from a nested mapping; missing keys take defaults, unknown keys are refused."""
    if not isinstance(data, Mapping):
        raise ConfigError(f"{where or 'config'}: expected a mapping, got {type(data).__name__}")
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - names)
    if unknown:
        raise ConfigError(f"unknown key{'s' if len(unknown) > 1 else ''} "
                          f"{', '.join(_join(where, k) for k in unknown)}; valid keys: {sorted(names)}")
    kwargs = {k: _coerce(v, hints[k], _join(where, k)) for k, v in data.items()}
    return cls(**kwargs)


def _join(prefix: str, key: str) -> str:
    return f"{prefix}.{key}" if prefix else key


def _coerce(value: Any, hint: Any, where: str) -> Any:
    if dataclasses.is_dataclass(hint):
        return value if isinstance(value, hint) else from_dict(value, hint, where)
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        if value is None:
            if type(None) in args:
                return None
            raise ConfigError(f"{where}: may not be null")
        literals = [a for a in args if typing.get_origin(a) is Literal]
        if literals and len(literals) == len(args) - (type(None) in args):
            return _choice(value, sum(map(typing.get_args, literals), ()), where, nullable=type(None) in args)
        errors = []
        for arg in (a for a in args if a is not type(None)):
            try:
                return _coerce(value, arg, where)
            except ConfigError as e:
                errors.append(str(e))
        raise ConfigError(errors[0])
    if origin is Literal:
        return _choice(value, args, where)
    if origin is list:
        if isinstance(value, (str, bytes)) or not isinstance(value, Iterable):
            raise ConfigError(f"{where}: expected a list, got {value!r}")
        return [_coerce(v, args[0], f"{where}[{i}]") for i, v in enumerate(value)]
    if hint is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{where}: expected true/false, got {value!r}")
    if hint is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        raise ConfigError(f"{where}: expected an integer, got {value!r}")
    if hint is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):  # YAML 1.1 reads "1e-4" (no dot) as a string
            try:
                return float(value)
            except ValueError:
                pass
        raise ConfigError(f"{where}: expected a number, got {value!r}")
    if hint is str:
        if isinstance(value, str):
            return value
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return str(value)
        raise ConfigError(f"{where}: expected a string, got {value!r}")
    return value


def _choice(value: Any, allowed: tuple, where: str, nullable: bool = False) -> Any:
    if any(value == a and type(value) is type(a) for a in allowed):  # True is not 1
        return value
    raise ConfigError(f"{where}: {value!r} is not one of {', '.join(map(repr, allowed))}"
                      + (" or null" if nullable else ""))


def choice_problems(cfg, where: str = "") -> list[tuple[str, str]]:
    """(field, rule) for every `Literal` field of `cfg`'s tree outside its values. Parsing refuses
    these already; this catches a config built or changed in Python (a recipe, a test)."""
    problems = []
    hints = typing.get_type_hints(type(cfg))
    for f in dataclasses.fields(cfg):
        value, key, hint = getattr(cfg, f.name), _join(where, f.name), hints[f.name]
        if dataclasses.is_dataclass(value):
            problems += choice_problems(value, key)
        elif Literal in (typing.get_origin(hint), *map(typing.get_origin, typing.get_args(hint))):
            try:
                _coerce(value, hint, key)
            except ConfigError as e:
                problems.append((key, str(e).removeprefix(f"{key}: ")))
    return problems


def to_yaml(cfg: RunConfig) -> str:
    return yaml.safe_dump(to_dict(cfg), sort_keys=False, default_flow_style=False)


def save_yaml(cfg: RunConfig, path: str | Path) -> None:
    Path(path).write_text(to_yaml(cfg))


def load_yaml(path: str | Path) -> RunConfig:
    path = Path(path)
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except FileNotFoundError:
        raise ConfigError(f"{path}: no such run config (a recipe name or the path of a YAML run config)") from None
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: not valid YAML: {e}") from e
    try:
        return from_dict(data)
    except ConfigError as e:
        raise ConfigError(f"{path}: {e}") from e


# -------------------------------------------------------------- overrides
def parse_override(text: str) -> tuple[str, Any]:
    """`optimizer.lr=1e-4` -> ("optimizer.lr", 1e-4); the value is read as YAML."""
    key, sep, raw = text.partition("=")
    if not sep or not key.strip():
        raise ConfigError(f"override {text!r}: expected key.sub=value")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError:
        value = raw
    return key.strip(), value


def apply_overrides(cfg: RunConfig, overrides: Iterable[str] | Mapping[str, Any]) -> RunConfig:
    """A new config with dotted-key overrides (CLI strings, or a flat/nested dict) applied."""
    items = (_flatten(overrides) if isinstance(overrides, Mapping)
             else [parse_override(o) for o in overrides])
    data = to_dict(cfg)
    for key, value in items:
        node, parts = data, key.split(".")
        for i, part in enumerate(parts[:-1]):
            if not isinstance(node.get(part), dict):
                raise ConfigError(f"override {key}: {'.'.join(parts[:i + 1])} is not a config section; "
                                  f"sections: {sorted(k for k, v in node.items() if isinstance(v, dict))}")
            node = node[part]
        if parts[-1] not in node:
            raise ConfigError(f"override {key}: unknown key {parts[-1]!r} in "
                              f"{'.'.join(parts[:-1]) or 'the run config'}; valid keys: {sorted(node)}")
        if isinstance(node[parts[-1]], dict) and not isinstance(value, Mapping):
            raise ConfigError(f"override {key}: is a section; set one of its keys {sorted(node[parts[-1]])}")
        node[parts[-1]] = value
    return from_dict(data)


def _flatten(d: Mapping[str, Any], prefix: str = "") -> list[tuple[str, Any]]:
    out = []
    for k, v in d.items():
        key = _join(prefix, k)
        if isinstance(v, Mapping) and v:
            out += _flatten(v, key)
        else:
            out.append((key, v))
    return out
