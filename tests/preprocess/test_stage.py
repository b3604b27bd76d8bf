"""The preprocess stage: store in/out (file and moto S3), cache hits, CLI, crash resume, Dask, Prefect."""
from __future__ import annotations

import contextlib

import gzip
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tasks.common import StoreSettings, progress_to
from tasks.preprocess import PreprocessParams, run_preprocess
from tasks.store import ArtifactStore, ProgressSink
from tests.artifacts import commit_directory
from tests.preprocess.fixtures import GOLDEN, U16_TOKENIZER, corpus_lines, write_split
from tests.store.test_faults import silent_endpoint  # noqa: F401 - a fixture

REPO = Path(__file__).resolve().parents[2]


def commit_tokenizer(store: ArtifactStore, name: str = "tiny", source: Path = U16_TOKENIZER) -> str:
    """An hf-checkpoint artifact holding only tokenizer files (all the stage reads of it)."""
    return commit_directory(store, source, name=name, stage="test-tokenizer", params={}).spec


def _shard_bytes(store: ArtifactStore, manifest, tmp: Path) -> dict[str, bytes]:
    local = store.download(manifest, tmp)
    return {p.name: p.read_bytes() for p in sorted(local.glob("shard_*"))}


def _golden(name: str = "u16_eod") -> dict[str, bytes]:
    return {f"shard_00000_text_document.{ext}": (GOLDEN / f"{name}_text_document.{ext}").read_bytes()
            for ext in ("bin", "idx")}


def test_stage_on_file_store_cache_hit_and_cli(tmp_path):
    from typer.testing import CliRunner

    from flows.cli import app

    store = ArtifactStore((tmp_path / "store").as_uri())
    tok = commit_tokenizer(store)
    params = PreprocessParams(tokenizer=tok, name="docs", inputs=[str(GOLDEN / "corpus.jsonl")],
                              workdir=str(tmp_path / "work"), store=StoreSettings(url=store.url))
    seen = []

    class Recorded(ProgressSink):
        def render(self, force: bool) -> None:
            seen.append((self.done, self.total, self.note))

    with progress_to(Recorded()):  # what a progress bar or the run's progress artifact is shown
        first = run_preprocess(params, store)
    m = first.manifest
    assert m.kind == "dataset" and not first.cache_hit
    assert m.metrics["data_prefixes"] == ["shard_00000_text_document"]
    assert m.metrics["shards"][0]["documents"] == len(corpus_lines())
    assert m.metrics["shards"][0]["bytes"] == sum(len(v) for v in _golden().values())
    assert _shard_bytes(store, m, tmp_path / "pulled") == _golden()
    stage_progress = [s for s in seen if s[2]]  # the stage's own, beside the store's transfers
    assert stage_progress[-1][0] == stage_progress[-1][1]
    assert stage_progress[-1][2].startswith(f"{len(corpus_lines()):,} documents")
    assert m.inputs[0].kind == "hf-checkpoint"
    assert not list((tmp_path / "work").iterdir())  # staging and tokenised parts cleaned after commit

    again = run_preprocess(params.model_copy(update={"workers": 2}), store)
    assert again.cache_hit and again.manifest.version == m.version  # workers do not define the output

    result = CliRunner().invoke(app, ["preprocess", tok, "docs-cli", str(GOLDEN / "corpus.jsonl"),
                                      "--no-append-eod", "--tokenizer-engine", "tiktoken",
                                      "--store", store.url, "--workdir", str(tmp_path / "w2")])
    assert result.exit_code == 0, result.output
    assert "tokens/s" in result.output and "shard 0" in result.output
    cli = store.resolve("dataset", "docs-cli")
    assert cli.metrics["tokenizer_engine"] == "tiktoken" and m.metrics["tokenizer_engine"] == "tokenizers"
    assert _shard_bytes(store, cli, tmp_path / "pulled-cli") == _golden("u16_noeod")
    missing = tmp_path / "no-such-corpus.jsonl"
    bad = CliRunner().invoke(app, ["preprocess", tok, "docs-bad", str(missing), "--store", store.url,
                                   "--workdir", str(tmp_path / "w3")])
    lines = [line for line in bad.output.splitlines() if line.strip()]
    assert bad.exit_code == 1 and lines[-1].startswith("error: ") and str(missing) in lines[-1], bad.output
    assert "Traceback" not in bad.output


def test_sft_mode_through_the_stage(tmp_path):
    from gptoss_model.data.packed_sft import PackedSFTDataset
    from gptoss_model.checkpoint.tiny import _write_tokenizer, build_tokenizer

    chat_tokenizer = tmp_path / "chat_tok"
    chat_tokenizer.mkdir()
    _write_tokenizer(chat_tokenizer, build_tokenizer(), 1024)
    store = ArtifactStore((tmp_path / "store").as_uri())
    tok = commit_tokenizer(store, "tiny-chat", chat_tokenizer)
    corpus = tmp_path / "chat.jsonl"
    corpus.write_text("".join(json.dumps({"messages": [{"role": "user", "content": f"q{i}"},
                                                       {"role": "assistant", "content": "answer " * (i % 9 + 1)}]})
                              + "\n" for i in range(40)))
    m = run_preprocess(PreprocessParams(tokenizer=tok, name="chat", inputs=[str(corpus)], mode="sft",
                                        target_length=128, workdir=str(tmp_path / "w")), store).manifest
    assert 0.5 < m.metrics["packing_efficiency"] <= 1.0 and m.metrics["documents"] == 40
    local = store.download(m, tmp_path / "pulled")
    datasets = PackedSFTDataset.from_artifact(local)
    assert sum(len(d) for d in datasets) == m.metrics["samples"]
    assert max(int(d.sample_lengths.max()) for d in datasets) <= 128
    assert m.metrics["data_prefixes"] == json.loads((local / "sft.json").read_text())["prefixes"]


def test_dask_workers_must_write_to_the_store_the_run_commits_to(tmp_path):
    from gptoss_model.errors import InvalidParameterError

    params = PreprocessParams(tokenizer="hf-checkpoint/x", name="d", inputs=["a"], dask_address="tcp://127.0.0.1:1",
                              store=StoreSettings(url=(tmp_path / "elsewhere").as_uri()))
    with pytest.raises(InvalidParameterError, match="Dask workers would write to file://.*elsewhere"):
        run_preprocess(params, ArtifactStore((tmp_path / "store").as_uri()))


def test_compressed_inputs_corrupt_or_truncated_are_one_clear_error(tmp_path):
    import zstandard

    from gptoss_model.data.sources import CorpusError, expand_sources, iter_lines, plan_units

    data = b"".join(b'{"text": "document %d"}\n' % i for i in range(50_000))
    z = zstandard.ZstdCompressor().compress(data)
    cases = {"truncated.jsonl.gz": gzip.compress(data)[:-2000], "truncated.jsonl.zst": z[: len(z) // 2],
             "corrupt.jsonl.zst": b"not zstd at all" * 64, "corrupt.jsonl.gz": b"not gzip at all" * 64,
             "two_frames.jsonl.zst": z + zstandard.ZstdCompressor().compress(b'{"text": "last"}\n')}
    for name, blob in cases.items():
        (tmp_path / name).write_bytes(blob)
        unit = plan_units(expand_sources([str(tmp_path / name)]))[0]
        if name.startswith("two_frames"):
            assert sum(1 for _ in iter_lines(unit)) == 50_001  # every frame read
            continue
        with pytest.raises(CorpusError, match=rf"{name}: (gzip|zstd) stream is corrupt or truncated after line \d+"):
            for _ in iter_lines(unit):
                pass


def test_a_silent_s3_input_endpoint_fails_within_the_timeouts_naming_the_input(silent_endpoint, monkeypatch):
    from gptoss_model.data.sources import InputUnreachable, expand_sources
    from tasks.store.s3 import S3Backend

    monkeypatch.setattr(S3Backend, "READ_TIMEOUT", 1)
    monkeypatch.setattr(S3Backend, "MAX_ATTEMPTS", 2)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "test")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "test")
    params = PreprocessParams(tokenizer="hf-checkpoint/x", name="d", inputs=["s3://corpora/web/*.jsonl"],
                              input_s3_endpoint_url=silent_endpoint)
    started = time.monotonic()
    with pytest.raises(InputUnreachable, match=r"s3://corpora/web/\*\.jsonl: ReadTimeoutError"):
        expand_sources(params.inputs, params.storage_options())
    elapsed = time.monotonic() - started
    print(f"\na silent input endpoint failed after {elapsed:.1f} s (read timeout 1 s, 2 attempts)")
    assert elapsed < 15


def test_params_are_validated():
    with pytest.raises(ValueError, match="inputs"):
        PreprocessParams(tokenizer="hf-checkpoint/x", name="d", inputs=[])
    with pytest.raises(ValueError, match="dask_address"):
        PreprocessParams(tokenizer="hf-checkpoint/x", name="d", inputs=["a"], dask_address="not an address")
    with pytest.raises(ValueError, match="json_keys must be distinct"):
        PreprocessParams(tokenizer="hf-checkpoint/x", name="d", inputs=["a"], json_keys=["text", "text"])
    with pytest.raises(ValueError, match="split_sentences"):
        PreprocessParams(tokenizer="hf-checkpoint/x", name="d", inputs=["a"], split_sentences=True)
    with pytest.raises(ValueError, match="shard_samples for sft"):
        PreprocessParams(tokenizer="hf-checkpoint/x", name="d", inputs=["a"], mode="sft", shard_tokens=5)
    with pytest.raises(ValueError, match="dask_address applies to mode=pretrain"):
        PreprocessParams(tokenizer="hf-checkpoint/x", name="d", inputs=["a"], mode="sft",
                         dask_address="tcp://127.0.0.1:8786")
    with pytest.raises(ValueError, match="tokenizer_engine applies to mode=pretrain"):
        PreprocessParams(tokenizer="hf-checkpoint/x", name="d", inputs=["a"], mode="sft", tokenizer_engine="tiktoken")
    with pytest.raises(ValueError, match="tokenizer_engine"):
        PreprocessParams(tokenizer="hf-checkpoint/x", name="d", inputs=["a"], tokenizer_engine="sentencepiece")
    for url in ("s3://user:hunter2@bucket/c.jsonl", "https://me:hunter2@host/c.jsonl.gz"):
        with pytest.raises(ValueError, match=r"inputs\.1\n.*holds credentials") as refused:
            PreprocessParams(tokenizer="hf-checkpoint/x", name="d", inputs=["a.jsonl", url])
        assert "hunter2" not in str(refused.value)  # the error (and so the log) never shows it
    for where in ({"input_s3_endpoint_url": "http://k:hunter2@minio:9000"},
                  {"store": {"url": "s3://k:hunter2@bucket/store"}}):
        with pytest.raises(ValueError, match="holds credentials") as refused:
            PreprocessParams(tokenizer="hf-checkpoint/x", name="d", inputs=["a.jsonl"], **where)
        assert "hunter2" not in str(refused.value)
    ok = PreprocessParams(tokenizer="hf-checkpoint/x", name="d", inputs=["/data/my corpus/a.jsonl", "s3://b/x@1.jsonl"])
    assert ok.inputs[0] == "/data/my corpus/a.jsonl"


@pytest.mark.s3
def test_s3_inputs_and_store(tmp_path, s3_bucket, s3_endpoint):
    """Inputs (.jsonl.gz and .jsonl) read from moto S3, the dataset written to an S3 store."""
    import s3fs

    fs = s3fs.S3FileSystem(client_kwargs={"endpoint_url": s3_endpoint})
    parts = write_split(corpus_lines(), tmp_path / "split", 2)
    fs.pipe(f"{s3_bucket}/corpus/a.jsonl.gz", gzip.compress(parts[0].read_bytes()))
    fs.pipe(f"{s3_bucket}/corpus/b.jsonl", parts[1].read_bytes())
    store = ArtifactStore(f"s3://{s3_bucket}/artifacts", s3_endpoint_url=s3_endpoint)
    tok = commit_tokenizer(store)
    params = PreprocessParams(tokenizer=tok, name="s3docs", inputs=[f"s3://{s3_bucket}/corpus/*"],
                              workdir=str(tmp_path / "work"), unit_mb=1,
                              store=StoreSettings(url=store.url, s3_endpoint_url=s3_endpoint))
    m = run_preprocess(params, store).manifest
    assert m.metrics["input_files"] == 2
    assert _shard_bytes(store, m, tmp_path / "pulled") == _golden()


def _big_corpus(tmp_path: Path, copies: int = 40) -> Path:
    path = tmp_path / "big.jsonl"
    path.write_bytes(b"".join(corpus_lines()) * copies)  # ~3 MB: several 1 MB units
    return path


def test_kill_9_then_resume_redoes_only_unfinished_work(tmp_path):
    store_url = (tmp_path / "store").as_uri()
    store = ArtifactStore(store_url)
    tok = commit_tokenizer(store)
    corpus = _big_corpus(tmp_path)
    work = tmp_path / "work"
    args = [sys.executable, str(Path(__file__).with_name("stage_child.py")), store_url, tok, str(corpus), str(work)]
    env = {**os.environ, "GPTOSS_PREPROCESS_SLOW_UNITS": "1.5"}  # widen the window the kill lands in
    child = subprocess.Popen(args, cwd=REPO, env=env, start_new_session=True)
    try:
        deadline = time.monotonic() + 120
        while not list(work.glob("*.parts/unit_*.json")):
            assert child.poll() is None, "the child finished before it could be killed"
            assert time.monotonic() < deadline
            time.sleep(0.05)
        os.killpg(child.pid, signal.SIGKILL)
    finally:
        child.wait()
    done_before = len(list(work.glob("*.parts/unit_*.json")))
    assert store.get_ref("dataset", "big", "latest") is None  # nothing committed

    resumed = subprocess.run(args, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    metrics = json.loads(resumed.stdout.strip().splitlines()[-1])
    assert metrics["resumed_units"] == done_before >= 1
    assert metrics["resumed_units"] < metrics["work_units"]

    fresh = ArtifactStore((tmp_path / "fresh").as_uri())
    tok2 = commit_tokenizer(fresh)
    clean = run_preprocess(PreprocessParams(tokenizer=tok2, name="big", inputs=[str(corpus)], unit_mb=1,
                                            shard_tokens=300_000, workdir=str(tmp_path / "w2")), fresh).manifest
    resumed_manifest = store.resolve("dataset", "big")
    assert [(f.path, f.sha256) for f in resumed_manifest.files] == [(f.path, f.sha256) for f in clean.files]
    assert len(clean.metrics["shards"]) > 1


def test_kill_9_of_the_stage_process_alone_takes_its_workers_with_it(tmp_path):
    """SIGKILL of the preprocess process only (not its group): no cleanup code runs, so its
    worker processes must die of their parent-death signal; none is left 5 s later."""
    import psutil

    from tests.processes import kill_alone_and_count_survivors

    store_url = (tmp_path / "store").as_uri()
    tok = commit_tokenizer(ArtifactStore(store_url))
    args = [sys.executable, str(Path(__file__).with_name("stage_child.py")), store_url, tok,
            str(_big_corpus(tmp_path)), str(tmp_path / "work"), "2"]
    child = subprocess.Popen(args, cwd=REPO, start_new_session=True)
    try:
        deadline = time.monotonic() + 120
        while len(psutil.Process(child.pid).children(recursive=True)) < 2:
            assert child.poll() is None, "the child finished before its workers started"
            assert time.monotonic() < deadline
            time.sleep(0.05)
        time.sleep(0.5)  # every worker started
        assert not kill_alone_and_count_survivors(child, "the preprocess process")
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(child.pid, signal.SIGKILL)


@pytest.mark.s3
def test_store_workspace_resumes_from_the_parts_in_the_store(tmp_path, s3_bucket, s3_endpoint):
    """Parts and shards written through the store (as Dask workers do): the same bytes as a local
    build, each shard's reported sha256 true of the stored object, and a rerun that lost one unit's
    and one shard's done marker redoes only those."""
    import hashlib

    from gptoss_model.data.pretrain import PretrainOptions, build_pretraining_dataset
    from gptoss_model.data.tokenizer import tokenizer_spec
    from tasks.store.workspace import StoreWorkspace

    settings = StoreSettings(url=f"s3://{s3_bucket}/ws", s3_endpoint_url=s3_endpoint)
    out, parts = StoreWorkspace(settings, "v"), StoreWorkspace(settings, "v/_parts")
    corpus, spec = str(_big_corpus(tmp_path, copies=8)), tokenizer_spec(U16_TOKENIZER)
    options = PretrainOptions(unit_bytes=200_000, shard_tokens=60_000)
    first = build_pretraining_dataset([corpus], spec, out, parts, options)
    assert first["work_units"] > 2 and len(first["shards"]) > 2
    local = build_pretraining_dataset([corpus], spec, tmp_path / "out", tmp_path / "parts", options)
    assert [(f["path"], f["size"]) for f in local["output_files"]] == \
        [(f["path"], f["size"]) for f in first["output_files"]]
    for f in first["output_files"]:  # the digest the upload computed is the stored bytes', and a local build's
        stored = out.get_bytes(f["path"])
        assert hashlib.sha256(stored).hexdigest() == f["sha256"]
        assert stored == (tmp_path / "out" / f["path"]).read_bytes()

    out.backend.delete(["v/_parts/unit_000001.json", "v/_parts/shard_00001.json"])
    again = build_pretraining_dataset([corpus], spec, out, parts, options)
    assert again["resumed_units"] == first["work_units"] - 1
    assert again["resumed_shards"] == len(first["shards"]) - 1
    assert again["output_files"] == first["output_files"]


@pytest.mark.prefect
@pytest.mark.s3
def test_flow_on_a_dask_cluster_reads_and_writes_the_object_store(tmp_path, prefect_harness, monkeypatch,
                                                                   s3_bucket, s3_endpoint):
    """Units and shards run on a 2-worker Dask cluster, reading the corpus from S3 and writing parts
    and shards to the S3 store themselves: the same bytes as the local run (which also checks the
    tiktoken engine the Dask run uses against tokenizers), nothing left in `_parts`."""
    import s3fs
    from distributed import LocalCluster
    from prefect.settings import PREFECT_API_URL

    from flows.preprocess import preprocess_flow

    store = ArtifactStore(f"s3://{s3_bucket}/artifacts", s3_endpoint_url=s3_endpoint)
    tok = commit_tokenizer(store)
    s3fs.S3FileSystem(client_kwargs={"endpoint_url": s3_endpoint}).pipe(
        f"{s3_bucket}/corpus/big.jsonl", _big_corpus(tmp_path, copies=15).read_bytes())
    base = dict(tokenizer=tok, inputs=[f"s3://{s3_bucket}/corpus/big.jsonl"], unit_mb=1, shard_tokens=200_000,
                store=StoreSettings(url=store.url, s3_endpoint_url=s3_endpoint))
    local = preprocess_flow(PreprocessParams(name="local", workdir=str(tmp_path / "w1"), **base))

    monkeypatch.setenv("PREFECT_API_URL", PREFECT_API_URL.value())  # the Dask workers report to the same server
    with LocalCluster(n_workers=2, threads_per_worker=1, processes=True, dashboard_address=None) as cluster:
        on_dask = preprocess_flow(PreprocessParams(name="dask", workdir=str(tmp_path / "w2"),
                                                   dask_address=cluster.scheduler_address,
                                                   tokenizer_engine="tiktoken", **base))
    assert on_dask.metrics["work_units"] > 1 and len(on_dask.metrics["shards"]) > 1
    here = f"{socket.gethostname()}:{os.getpid()}"
    for ran_on in (on_dask.metrics["tokenizing_processes"], on_dask.metrics["assembling_processes"]):
        assert here not in ran_on and 1 <= len(ran_on) <= 2  # the Dask workers, not the flow's process
    assert len(on_dask.metrics["tokenizing_processes"]) == 2
    assert [(f.path, f.sha256) for f in on_dask.files] == [(f.path, f.sha256) for f in local.files]
    stored = [o.key for o in store.backend.list(store.prefix("dataset", "dask", on_dask.version) + "/")]
    assert not [k for k in stored if "/_parts/" in k] and len(stored) >= len(on_dask.files) + 1

    from prefect.client.orchestration import get_client

    with get_client(sync_client=True) as client:
        artifacts = client.read_artifacts()
    assert {"progress", "table"} <= {a.type for a in artifacts}
    assert any("(tiktoken engine)" in (a.description or "") for a in artifacts if a.type == "table")
