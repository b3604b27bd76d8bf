"""Preprocess stage: JSONL corpora (any fsspec URL) -> a `dataset` artifact.

flows/preprocess.py -> here -> gptoss_model/data/ (pretrain.py, sft.py)

The tokenizer is the `tokenizer.json` of an hf-checkpoint artifact (pulled from the store,
never downloaded from a hub). `mode="pretrain"` writes megatron indexed `.bin/.idx` shards;
`mode="sft"` renders chat records with the checkpoint's chat template and writes packed,
loss-masked shards plus `sft.json`. The version fingerprints the parameters, the tokenizer
artifact and the input files (URL, size, ETag / mtime), so the same corpus preprocessed the
same way is a cache hit. The staging dir and the tokenised parts beside it survive a killed
attempt: a rerun redoes only unfinished work units and shards.

Given `dask_address`, the work units and shards run as Prefect tasks on that Dask cluster
(prefect-dask). Nothing then goes through this machine: workers read the inputs (object
store URLs, or paths every worker sees), put their parts under the version's prefix in the
artifact store (`_parts/`), write the shards there too, and the commit adopts the shards
and drops the parts. A rerun after a crash resumes from the parts in the store.
"""
from __future__ import annotations

import re
import shutil
import time
from pathlib import Path
from typing import Literal

from pydantic import Field, field_validator, model_validator

from gptoss_model.data.pretrain import PretrainOptions, build_pretraining_dataset
from gptoss_model.data.sft import build_sft_dataset
from gptoss_model.data.sources import expand_sources, input_errors_named, input_filesystem
from gptoss_model.data.tokenizer import tokenizer_spec
from gptoss_model.data.workspace import LocalDir
from gptoss_model.errors import InvalidParameterError
from tasks.common import PlainUrl, StageParams, StageProgress, StoreSettings, artifact_key, in_prefect_run
from tasks.dask_runner import dask_map
from tasks.kinds import Kind
from tasks.stage import Input, Stage, StageRun, Version
from tasks.store import ArtifactStore
from tasks.store.manifest import FileEntry
from tasks.store.names import ARTIFACT_NAME_PATTERN, ARTIFACT_SPEC_PATTERN
from tasks.store.workspace import StoreWorkspace, open_store


class PreprocessParams(StageParams):
    """Tokenise JSONL corpora with a checkpoint's tokenizer into a dataset artifact (pretrain or packed SFT)."""

    inputs: list[PlainUrl] = Field(
        ..., min_length=1, description="JSONL sources: paths, globs or fsspec URLs (s3://...), plain, .gz or "
        ".zst; read in the order given, each glob sorted; no user:password@ (use the filesystem's own credentials)")
    tokenizer: str = Field(..., pattern=ARTIFACT_SPEC_PATTERN, description="hf-checkpoint/NAME[@VERSION|@REF] "
                           "whose tokenizer (and chat template, for sft) is used")
    name: str = Field(..., pattern=ARTIFACT_NAME_PATTERN, description="output dataset artifact name")
    mode: Literal["pretrain", "sft"] = "pretrain"
    json_keys: list[str] = Field(["text"], min_length=1, description="pretrain: JSON keys to tokenise; one "
                                 "indexed dataset per key and shard (Megatron-LM's --json-keys)")
    append_eod: bool = Field(True, description="pretrain: end each document that produced tokens with the "
                             "tokenizer's eos token (Megatron-LM's --append-eod)")
    split_sentences: Literal[False] = Field(False, description="Megatron-LM's --split-sentences is not "
                                            "supported (GPT pretraining uses whole documents)")
    bad_input: Literal["fail", "skip"] = Field("fail", description="fail: stop at the first bad record "
                                               "(file:line), commit nothing; skip: count and report them")
    shard_tokens: int | None = Field(None, ge=1, description="pretrain: close a shard after the document "
                                     "that reaches this many tokens; None: one shard")
    messages_key: str = Field("messages", description="sft: the key holding the chat messages")
    target_length: int = Field(2048, ge=16, description="sft: packed sample length (tokens)")
    shard_samples: int | None = Field(None, ge=1, description="sft: packed samples per shard; None: one shard")
    max_record_mb: int = Field(8, ge=1, le=1024, description="a longer JSONL line is bad input (refused, or "
                               "skipped with bad_input=skip): tokenising one record takes ~180x its size in memory")
    unit_mb: int | None = Field(None, ge=1, le=4096, description="work unit size: plain files are split into byte "
                                "ranges of about this size (output bytes do not depend on it); None: about "
                                "8 units per local worker, 4-64 MB each, and 64 MB on Dask")
    workers: int = Field(1, ge=1, le=256, description="local tokenising processes (output bytes do not "
                         "depend on it)")
    tokenizer_engine: Literal["tokenizers", "tiktoken"] = Field(
        "tokenizers", description="pretrain: tokenizers is Megatron-LM's own path; tiktoken runs byte-level BPE "
        "tokenizers with the same ids on a fraction of the CPU, refuses a tokenizer it cannot convert, and "
        "checks a sample of every work unit against tokenizers (output bytes do not depend on it)")
    dask_address: str | None = Field(None, description="scheduler address (tcp://host:8786) of a Dask cluster "
                                     "to run the work units on, through prefect-dask; the workers write parts "
                                     "and shards to the store (pretrain)")
    input_s3_endpoint_url: PlainUrl | None = Field(None, description="S3-compatible endpoint for s3:// inputs; "
                                              "default: the store's endpoint")
    workdir: str | None = Field(None, description="staging dir parent (kept across attempts, so a rerun "
                                "resumes)")
    store: StoreSettings = Field(default_factory=StoreSettings)

    @field_validator("json_keys")
    @classmethod
    def _distinct_keys(cls, keys: list[str]) -> list[str]:
        if len(set(keys)) != len(keys) or not all(re.fullmatch(r"[A-Za-z0-9_.-]+", k) for k in keys):
            raise ValueError(f"json_keys must be distinct names of letters, digits, '_', '.', '-': {keys}")
        return keys

    @field_validator("dask_address")
    @classmethod
    def _address(cls, address: str | None) -> str | None:
        if address is not None and not re.fullmatch(r"(tcp|tls|inproc|ucx)://[^\s/]+(:\d+)?|[^\s/:]+:\d+", address):
            raise ValueError(f"dask_address {address!r}: expected a scheduler address like tcp://host:8786")
        return address

    @model_validator(mode="after")
    def _mode_fits(self) -> "PreprocessParams":
        if self.mode == "sft" and self.shard_tokens is not None:
            raise ValueError("shard_tokens applies to mode=pretrain; use shard_samples for sft")
        if self.mode == "sft" and self.dask_address is not None:
            raise ValueError("dask_address applies to mode=pretrain; sft packs the whole corpus in one process")
        if self.mode == "sft" and self.tokenizer_engine != "tokenizers":
            raise ValueError("tokenizer_engine applies to mode=pretrain; sft renders the chat template through "
                             "transformers")
        return self

    def storage_options(self) -> dict:
        """fsspec options for the inputs: s3 ones get the store's timeouts and retries (an endpoint
        that accepts connections and never answers fails instead of hanging)."""
        if not any(i.startswith(("s3://", "s3a://")) for i in self.inputs):
            return {}
        from tasks.store.s3 import S3Backend

        # botocore retries (MAX_ATTEMPTS); s3fs's own retry loop on top would multiply the wait
        options: dict = {"retries": 1, "config_kwargs": {"connect_timeout": S3Backend.CONNECT_TIMEOUT,
                                           "read_timeout": S3Backend.READ_TIMEOUT,
                                           "retries": {"max_attempts": S3Backend.MAX_ATTEMPTS, "mode": "standard"}}}
        endpoint = self.input_s3_endpoint_url or self.store.s3_endpoint_url
        if endpoint:
            options["client_kwargs"] = {"endpoint_url": endpoint}
        return options

    def fingerprint_params(self, input_files: list[dict]) -> dict:
        """What defines the output: options and the input files' identity (not workers, units, dask)."""
        common = {"mode": self.mode, "bad_input": self.bad_input, "inputs": self.inputs, "files": input_files,
                  "max_record_mb": self.max_record_mb}
        if self.mode == "sft":
            return {**common, "messages_key": self.messages_key, "target_length": self.target_length,
                    "shard_samples": self.shard_samples}
        return {**common, "json_keys": self.json_keys, "append_eod": self.append_eod,
                "shard_tokens": self.shard_tokens}


def _input_identity(params: PreprocessParams) -> list[dict]:
    identity = []
    for f in expand_sources(params.inputs, params.storage_options()):
        fs, path = input_filesystem(f.url, params.storage_options())
        with input_errors_named(f.url):
            info = fs.info(path)
        stamp = info.get("ETag") or info.get("etag") or info.get("mtime") or info.get("LastModified")
        identity.append({"url": f.url, "size": f.size, "stamp": str(stamp)})
    return identity


TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja",
                   "chat_template.json", "added_tokens.json")


def tokenizer_dir(store: ArtifactStore, source, workdir: Path) -> Path:
    """A local directory with the checkpoint's tokenizer files only (not its weights)."""
    if store.is_local:
        return store.local_path(source)
    wanted = source.model_copy(update={"files": [f for f in source.files if f.path in TOKENIZER_FILES]})
    return store.download(wanted, workdir)


def plan_preprocess(run: StageRun[PreprocessParams]) -> Version:
    params, store = run.params, run.store
    on_dask = params.dask_address is not None
    if on_dask and open_store(params.store).url != store.url:
        raise InvalidParameterError(f"store: the Dask workers would write to {params.store.url}, but this run "
                                    f"commits to {store.url}; pass the store as params.store")
    source = run.inputs["tokenizer"]
    input_files = _input_identity(params)
    scratch_dirs: list[Path] = []

    def build(staging: Path, version_prefix: str | None = None):
        scratch_dirs.append(staging.with_name(staging.name + ".tokenizer"))
        checkpoint_dir = tokenizer_dir(store, source, scratch_dirs[-1])
        progress = StageProgress(f"preprocess {params.name}")  # bytes of input read; the note counts tokens
        started = time.monotonic()
        uploaded: list[FileEntry] = []
        if params.mode == "sft":
            metrics = build_sft_dataset(params.inputs, checkpoint_dir, staging, target_length=params.target_length,
                                        messages_key=params.messages_key, bad_input=params.bad_input,
                                        shard_samples=params.shard_samples, max_record_bytes=params.max_record_mb << 20,
                                        storage_options=params.storage_options(), progress=progress)
        else:
            if on_dask:  # every worker reaches the store; this machine only plans and commits
                out = StoreWorkspace(params.store, version_prefix)
                parts = StoreWorkspace(params.store, f"{version_prefix}/{PARTS_DIR}")
            else:
                scratch_dirs.append(staging.with_name(staging.name + ".parts"))  # beside staging: never uploaded
                out, parts = LocalDir(staging), LocalDir(scratch_dirs[-1])
            options = PretrainOptions(json_keys=tuple(params.json_keys), append_eod=params.append_eod,
                                      bad_input=params.bad_input, shard_tokens=params.shard_tokens,
                                      unit_bytes=params.unit_mb << 20 if params.unit_mb else None,
                                      tokenizer_engine=params.tokenizer_engine,
                                      max_record_bytes=params.max_record_mb << 20)
            metrics = build_pretraining_dataset(
                params.inputs, tokenizer_spec(checkpoint_dir), out, parts, options, workers=params.workers,
                map_fn=dask_map(params.dask_address, run.stage.name) if on_dask else None, progress=progress,
                storage_options=params.storage_options())
            output_files = metrics.pop("output_files")
            if on_dask:
                uploaded = [FileEntry(**f) for f in output_files]
        progress.finish()
        seconds = time.monotonic() - started
        metrics.update(mode=params.mode, tokenizer=source.spec, tokenize_seconds=round(seconds, 3),
                       tokens_per_second=round(metrics["tokens"] / max(seconds, 1e-9)))
        _publish_summary(params, metrics)
        return (metrics, uploaded) if on_dask else metrics

    def clean_up(_) -> None:  # committed: tokenised parts and pulled tokenizer files are no longer needed
        for scratch in scratch_dirs:
            shutil.rmtree(scratch, ignore_errors=True)

    return Version(name=params.name, identity=params.fingerprint_params(input_files), build=build, inputs=[source],
                   resumable=True, writes_to_store=on_dask, after=clean_up)


PARTS_DIR = "_parts"  # under the version's prefix: removed by the commit, or by `gc` with the abandoned version


def summary_rows(metrics: dict) -> list[dict]:
    """One row per shard, then one per skipped-record reason (shown in Prefect and the CLI)."""
    rows = [{"item": f"shard {s['shard']}", **{k: v for k, v in s.items() if k != "shard"}}
            for s in metrics.get("shards", [])]
    skipped = metrics.get("skipped_records", {})
    for reason, count in skipped.get("counts", {}).items():
        rows.append({"item": f"skipped: {reason}", "documents": count,
                     "first positions": "; ".join(skipped["examples"].get(reason, [])[:3])})
    return rows


def report(manifest) -> tuple[str, list[dict]]:
    m = manifest.metrics
    return (f"{manifest.spec}: {m['documents']:,} documents, {m['tokens']:,} tokens, "
            f"{m['tokens_per_second']:,} tokens/s; data_prefixes: {', '.join(m['data_prefixes'])}", summary_rows(m))


def _publish_summary(params: PreprocessParams, metrics: dict) -> None:
    if not in_prefect_run():
        return
    from prefect.artifacts import create_table_artifact

    engine = metrics.get("tokenizer_engine")  # pretrain only
    create_table_artifact(table=summary_rows(metrics), key=artifact_key(Kind.DATASET, params.name, "summary"),
                          description=f"preprocess {params.name}: {metrics['documents']:,} documents, "
                                      f"{metrics['tokens']:,} tokens, {metrics['tokens_per_second']:,} tokens/s"
                                      + (f" ({engine} engine)" if engine else ""))


PREPROCESS = Stage(name="preprocess", output=Kind.DATASET, params=PreprocessParams, code_version="1",
                   inputs=(Input("tokenizer", Kind.HF_CHECKPOINT),), plan=plan_preprocess,
                   task_name="preprocess-dataset", cli_args=("tokenizer", "name", "inputs"), report=report,
                   describe=lambda p: f"preprocess {p.name} ({p.mode}, {len(p.inputs)} input(s))")
run_preprocess = PREPROCESS.run
preprocess_dataset = PREPROCESS.task
