"""The `gptoss` command: artifacts in the store, and the demo pipeline."""
from __future__ import annotations

import functools
import json
import re
import sys
from datetime import datetime
from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.console import Console
from rich.table import Table
from rich.tree import Tree

app = typer.Typer(help="GPT-OSS pipeline: Hugging Face -> Megatron -> Hugging Face, as Prefect flows.",
                  no_args_is_help=True, pretty_exceptions_show_locals=False)
artifacts = typer.Typer(help="Inspect and maintain the artifact store.", no_args_is_help=True)
app.add_typer(artifacts, name="artifacts")
train_app = typer.Typer(help="Plan training runs.", no_args_is_help=True)
app.add_typer(train_app, name="train")
# Piped output (logs, CI) gets a wide console so versions are never cut.
console = Console(width=None if sys.stdout.isatty() else 160)

StoreOpt = Annotated[Optional[str], typer.Option("--store", envvar="GPTOSS_STORE",
                                                 help="Store URL (file://... or s3://bucket/prefix).")]
EndpointOpt = Annotated[Optional[str], typer.Option("--s3-endpoint-url", envvar="GPTOSS_S3_ENDPOINT_URL",
                                                    help="S3-compatible endpoint URL.")]


# Set by the root callback on every invocation (before any command runs).
_options = {"debug": False}


@app.callback()
def _global_options(debug: Annotated[bool, typer.Option(
        "--debug", help="On an error, show the full traceback instead of one line.")] = False) -> None:
    """GPT-OSS pipeline: Hugging Face -> Megatron -> Hugging Face, as Prefect flows."""
    _options["debug"] = debug


def error_line(exc: BaseException) -> str:
    """One line for the terminal: the message (which names the file, artifact or parameter)."""
    from gptoss_model.errors import PermanentError
    from tasks.store import IntegrityError

    message = " ".join(str(exc).split()) or type(exc).__name__
    expected = (PermanentError, IntegrityError, ValueError, LookupError, FileExistsError, PermissionError,
                TimeoutError, ConnectionError)
    if isinstance(exc, expected):
        return f"error: {message}"
    return f"error: {type(exc).__name__}: {message} (rerun with --debug for the traceback)"


def one_line_errors(command):
    """Turn an exception into one line on stderr and exit status 1 (the traceback with --debug)."""
    @functools.wraps(command)
    def run(*args, **kwargs):
        try:
            return command(*args, **kwargs)
        except (typer.Exit, typer.Abort, typer.BadParameter):
            raise
        except KeyboardInterrupt:
            typer.echo("interrupted", err=True)
            raise typer.Exit(130) from None
        except Exception as exc:
            if _options["debug"]:
                raise
            typer.echo(error_line(exc), err=True)
            raise typer.Exit(1) from None
    return run


def _store(url: str | None, endpoint: str | None):
    from tasks.common import StoreSettings

    settings = StoreSettings()
    return StoreSettings(url=url or settings.url, s3_endpoint_url=endpoint or settings.s3_endpoint_url).open()


def _size(n: int) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if n < 1000 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return str(n)


def parse_duration(text: str) -> float:
    """'90s', '30m', '24h', '7d' -> seconds."""
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([smhd]?)\s*", text)
    if not m:
        raise typer.BadParameter(f"duration {text!r}: use a number with s, m, h or d (e.g. 24h)")
    return float(m.group(1)) * {"": 1, "s": 1, "m": 60, "h": 3600, "d": 86400}[m.group(2)]


@artifacts.command("ls")
@one_line_errors
def ls(kind: Annotated[Optional[str], typer.Argument(help="Only this kind, e.g. hf-checkpoint.")] = None,
       store: StoreOpt = None, s3_endpoint_url: EndpointOpt = None) -> None:
    """List committed artifact versions."""
    st = _store(store, s3_endpoint_url)
    problems: list[str] = []
    manifests = st.list(kind, problems=problems)
    table = Table(title=f"artifacts in {st.url}")
    for col in ("kind", "name", "version", "stage", "created", "files", "size"):
        table.add_column(col, justify="right" if col in ("files", "size") else "left",
                         no_wrap=True)
    for m in manifests:
        created = datetime.fromisoformat(m.created_at).strftime("%Y-%m-%d %H:%M")
        table.add_row(m.kind, m.name, m.version, m.producer.stage, created, str(len(m.files)), _size(m.total_bytes))
    console.print(table)
    for problem in problems:
        typer.echo(f"unreadable, not listed: {problem}", err=True)
    if problems:
        typer.echo(f"{len(problems)} unreadable manifest(s): `gptoss artifacts fsck --quarantine` moves them "
                   "aside (their versions are then rebuilt by the next run)", err=True)


@artifacts.command("show")
@one_line_errors
def show(spec: Annotated[str, typer.Argument(help="KIND/NAME[@VERSION|@REF] (default ref: latest).")],
         store: StoreOpt = None, s3_endpoint_url: EndpointOpt = None,
         as_json: Annotated[bool, typer.Option("--json", help="Print the raw manifest only.")] = False) -> None:
    """Show a version's manifest and its lineage."""
    st = _store(store, s3_endpoint_url)
    m = st.resolve_spec(spec)
    if as_json:
        typer.echo(m.model_dump_json(indent=2))
        return
    head = {k: v for k, v in m.model_dump().items() if k != "files"}
    console.print_json(json.dumps(head))
    files = Table(title=f"{len(m.files)} files, {_size(m.total_bytes)}")
    for col in ("path", "size", "sha256"):
        files.add_column(col)
    for f in m.files:
        files.add_row(f.path, _size(f.size), f.sha256[:16] + "...")
    console.print(files)

    def grow(node: Tree, lineage: dict) -> None:
        for child in lineage["inputs"]:
            label = f"{child['spec']}" + (" [red](missing)[/red]" if child.get("missing") else
                                          f" [dim]({child['stage']})[/dim]")
            grow(node.add(label), child)

    tree = Tree(f"[bold]{m.spec}[/bold] [dim]({m.producer.stage})[/dim]")
    grow(tree, st.lineage(m))
    console.print("lineage:", tree)


@artifacts.command("pull")
@one_line_errors
def pull(spec: Annotated[str, typer.Argument(help="KIND/NAME[@VERSION|@REF].")],
         dest: Annotated[Path, typer.Argument(help="Local directory to write into.")],
         overwrite: Annotated[bool, typer.Option(
             "--overwrite", help="Replace files of the same paths already in DEST.")] = False,
         store: StoreOpt = None, s3_endpoint_url: EndpointOpt = None) -> None:
    """Download a version with a progress bar, verifying every file's sha256.

    DEST ends up with the whole verified version or nothing new: files are verified
    beside it first, then moved in. Files already there are refused without --overwrite."""
    from tasks.store import RichProgress

    st = _store(store, s3_endpoint_url)
    m = st.resolve_spec(spec)
    st.pull(m, dest, overwrite=overwrite, progress=RichProgress())
    console.print(f"{m.spec}: {len(m.files)} files verified in {dest}")


@artifacts.command("gc")
@one_line_errors
def gc(older_than: Annotated[str, typer.Option(help="Only leftovers untouched this long (e.g. 30m, 24h).")] = "24h",
       dry_run: Annotated[bool, typer.Option("--dry-run", help="List what would go; delete nothing.")] = False,
       workdir: Annotated[Optional[Path], typer.Option(
           envvar="GPTOSS_WORKDIR", help="Where stages keep staging and download work dirs "
           "(default: the temp dir).")] = None,
       store: StoreOpt = None, s3_endpoint_url: EndpointOpt = None) -> None:
    """Remove what crashed or abandoned runs left: uncommitted versions, unfinished S3
    multipart uploads, staging, training run and download work dirs. Nothing a live run holds."""
    from tasks.store.housekeeping import Leftover, abort_stale_uploads, clean_work_dirs, remove_incomplete_versions
    from gptoss_model.settings import settings

    st = _store(store, s3_endpoint_url)
    age = parse_duration(older_than)
    found = abort_stale_uploads(st, age, dry_run=dry_run)
    found += [Leftover("incomplete version", f"{st.url}/{p}")
              for p in remove_incomplete_versions(st, age, dry_run=dry_run)]
    found += clean_work_dirs(workdir or settings().workdir, age, dry_run=dry_run)
    verb = "would remove" if dry_run else "removed"
    for item in found:
        size = f" ({_size(item.bytes)})" if item.bytes else ""
        typer.echo(f"{verb} {item.what} {item.where}{size}")  # unwrapped: one path per line
    counts = {what: sum(1 for i in found if i.what == what) for what in
              ("incomplete version", "multipart upload", "staging dir", "training run dir", "download work dir")}
    typer.echo(f"{verb} " + ", ".join(f"{n} {what}(s)" for what, n in counts.items()))


@artifacts.command("fsck")
@one_line_errors
def fsck(quarantine: Annotated[bool, typer.Option(
             "--quarantine", help="Move unreadable manifests and refs aside (to .quarantine/ in the store).")] = False,
         store: StoreOpt = None, s3_endpoint_url: EndpointOpt = None) -> None:
    """Check every manifest and ref, and that committed files are present at their sizes.
    Exit status 1 when something is wrong (and was not quarantined)."""
    from tasks.store.housekeeping import fsck as check
    from tasks.store.housekeeping import quarantine as move_aside

    st = _store(store, s3_endpoint_url)
    problems = check(st)
    left = 0
    for problem in problems:
        if quarantine and problem.quarantinable:
            typer.echo(f"quarantined {problem.what} -> {st.url}/{move_aside(st, problem.key)}")
        else:
            typer.echo(problem.what)
            left += 1
    typer.echo(f"{len(problems)} problem(s) in {st.url}" + (f", {left} left" if quarantine else ""))
    if left:
        raise typer.Exit(1)

@train_app.command("plan")
@one_line_errors
def train_plan(
        recipe: Annotated[str, typer.Argument(help="Recipe name (gpt_oss_20b_pretrain, ...) or a YAML run config.")],
        gpus: Annotated[int, typer.Option(help="GPUs in the whole job (nodes x GPUs per node).")],
        device: Annotated[str, typer.Option(help="h100, h200 or a100-80g.")] = "h100",
        set_: Annotated[list[str], typer.Option("--set", help="Override a config key: key.sub=value.")] = [],  # noqa: B006
) -> None:
    """Per-rank memory and the parallel layout of a run on GPUs, from any machine (no GPU needed)."""
    from gptoss_model.train import load_run_config
    from gptoss_model.training.config import ConfigError
    from gptoss_model.training.plan import plan

    source = recipe if Path(recipe).is_file() else f"recipe:{recipe}"
    try:
        typer.echo(plan(load_run_config(source, set_), gpus, device).table())
    except ConfigError as e:
        typer.echo(f"error: {e}", err=True)
        raise typer.Exit(2) from None


@app.command("preprocess")
@one_line_errors
def preprocess(
        tokenizer: Annotated[str, typer.Argument(help="hf-checkpoint/NAME[@VERSION|@REF] whose tokenizer is used.")],
        name: Annotated[str, typer.Argument(help="Output dataset artifact name.")],
        inputs: Annotated[list[str], typer.Argument(help="JSONL paths, globs or fsspec URLs (.gz/.zst too).")],
        mode: Annotated[str, typer.Option(help="pretrain (indexed .bin/.idx) or sft (packed chat).")] = "pretrain",
        json_key: Annotated[list[str], typer.Option("--json-key", help="pretrain: JSON key(s) to tokenise.")] = ["text"],  # noqa: B006
        append_eod: Annotated[bool, typer.Option(help="pretrain: end each document with the eos token.")] = True,
        bad_input: Annotated[str, typer.Option(help="fail (default) or skip bad records.")] = "fail",
        shard_tokens: Annotated[Optional[int], typer.Option(help="pretrain: tokens per output shard.")] = None,
        target_length: Annotated[int, typer.Option(help="sft: packed sample length.")] = 2048,
        workers: Annotated[int, typer.Option(help="Local tokenising processes.")] = 1,
        tokenizer_engine: Annotated[str, typer.Option(help="pretrain: tokenizers (Megatron-LM's path) or "
                                                      "tiktoken (same ids, checked; a fraction of the CPU).")]
        = "tokenizers",
        dask_address: Annotated[Optional[str], typer.Option(help="Dask scheduler address to scale out on.")] = None,
        workdir: Annotated[Optional[str], typer.Option(help="Staging parent (a rerun resumes from it).")] = None,
        store: StoreOpt = None, s3_endpoint_url: EndpointOpt = None) -> None:
    """Tokenise JSONL corpora into a dataset artifact, with a progress bar (documents, tokens, tokens/s)."""
    from rich.progress import BarColumn, DownloadColumn, Progress, TextColumn, TimeElapsedColumn

    from tasks.common import StoreSettings
    from tasks.preprocess import PreprocessParams, run_preprocess, summary_rows

    settings = StoreSettings(url=store or StoreSettings().url,
                             s3_endpoint_url=s3_endpoint_url or StoreSettings().s3_endpoint_url)
    params = PreprocessParams(tokenizer=tokenizer, name=name, inputs=inputs, mode=mode, json_keys=json_key,
                              append_eod=append_eod, bad_input=bad_input, shard_tokens=shard_tokens,
                              target_length=target_length, workers=workers, dask_address=dask_address,
                              tokenizer_engine=tokenizer_engine,
                              workdir=workdir, store=settings)
    bar = Progress(TextColumn("{task.description}"), BarColumn(), DownloadColumn(), TimeElapsedColumn(),
                   TextColumn("{task.fields[counts]}"), console=console)
    started = datetime.now()
    with bar:
        job = bar.add_task(f"preprocess {name}", total=None, counts="")

        def show(documents: int, tokens: int, done: int, total: int) -> None:
            rate = tokens / max((datetime.now() - started).total_seconds(), 1e-9)
            bar.update(job, completed=done, total=total,
                       counts=f"{documents:,} docs  {tokens:,} tokens  {rate:,.0f} tokens/s")

        result = run_preprocess(params, settings.open(), progress=show)
    m = result.manifest
    table = Table(title=f"{m.spec} ({'cache hit' if result.cache_hit else 'committed'})")
    rows = summary_rows(m.metrics)
    columns = list(dict.fromkeys(k for row in rows for k in row))
    for col in columns:
        table.add_column(col)
    for row in rows:
        table.add_row(*(str(row.get(c, "")) for c in columns))
    console.print(table)
    console.print(f"{m.metrics['documents']:,} documents, {m.metrics['tokens']:,} tokens; "
                  f"data_prefixes: {', '.join(m.metrics['data_prefixes'])}")


@app.command("demo")
@one_line_errors
def demo(config: Annotated[Path, typer.Option(help="Pipeline run config.")] = Path("configs/demo.yaml"),
         store: StoreOpt = None) -> None:
    """Run the demo pipeline end to end on a random tiny GPT-OSS checkpoint (CPU, local store)."""
    import os

    from flows.local_server import local_prefect_server
    from gptoss_model.settings import settings

    # A project-local Prefect home, without telemetry; set before Prefect is imported.
    os.environ.setdefault("PREFECT_HOME", str(Path(".gptoss/prefect").resolve()))
    home = settings().prefect_home
    home.mkdir(parents=True, exist_ok=True)
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    if store:
        os.environ["GPTOSS_STORE"] = store
    with local_prefect_server(home / "demo-server.log") as api_url:
        console.print(f"Prefect server for this demo: {api_url.removesuffix('/api')} (stops with the demo)")
        from flows.pipeline import gptoss_pipeline

        outputs = gptoss_pipeline(demo_params(config))
    for kind, spec in outputs.items():
        console.print(f"[green]{kind}[/green]: {spec}")
    ls(kind=None, store=store, s3_endpoint_url=None)


def demo_params(config: Path):
    """The pipeline parameters of a demo config, its local source checkpoint written first if missing
    (paths in the config are relative to the checkout, where the demo runs)."""
    from flows.pipeline import PipelineParams

    params = PipelineParams.from_yaml(config)
    source = params.download.source_url
    if source and "://" not in source:
        ensure_demo_source(Path(source))
    return params


def ensure_demo_source(source: Path) -> None:
    """The demo's random tiny checkpoint, written whole or not at all: into a temp dir
    beside `source`, renamed into place once complete (a killed demo leaves no half source).
    Demos started together take turns (a lock beside it): one writes, the others reuse it."""
    import os
    import shutil
    import tempfile

    from gptoss_model.system.paths import try_lock, work_dir_lock
    from gptoss_model.checkpoint.tiny import write_tiny_checkpoint

    source.parent.mkdir(parents=True, exist_ok=True)
    lock = try_lock(work_dir_lock(source), blocking=True)
    try:
        if source.exists():
            if not _complete_checkpoint(source):
                raise FileExistsError(f"{source} exists but is not a complete checkpoint (config.json and every "
                                      "safetensors shard); remove it, or set download.source_url elsewhere")
            return
        tmp = Path(tempfile.mkdtemp(prefix=f".{source.name}.partial-", dir=source.parent))
        try:
            write_tiny_checkpoint(tmp, dtype="bfloat16", seed=0)
            tmp.rename(source)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    finally:
        os.close(lock)
    console.print(f"wrote a random tiny GPT-OSS checkpoint to {source}")


def _complete_checkpoint(root: Path) -> bool:
    index = root / "model.safetensors.index.json"
    if not (root / "config.json").is_file():
        return False
    if index.is_file():
        shards = set(json.loads(index.read_text()).get("weight_map", {}).values())
        return bool(shards) and all((root / shard).is_file() for shard in shards)
    return (root / "model.safetensors").is_file()


if __name__ == "__main__":
    app()
