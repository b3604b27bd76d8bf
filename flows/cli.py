"""The `gptoss` command: artifacts in the store, and the demo pipeline."""
from __future__ import annotations

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
from typer.core import TyperGroup

from flows.terminal import one_line_errors, options


def stage_names() -> list[str]:
    """Every stage: a module in flows/ with its namesake in tasks/ (the two files a stage is)."""
    import pkgutil

    import flows
    import tasks

    def modules(package) -> set[str]:
        return {m.name for m in pkgutil.iter_modules(package.__path__) if not m.ispkg}

    return sorted(modules(flows) & modules(tasks))


def load_stage(name: str):
    """The `Stage` that tasks/<name>.py declares."""
    import importlib

    from tasks.stage import Stage

    module = importlib.import_module(f"tasks.{name}")
    found = [v for v in vars(module).values() if isinstance(v, Stage) and v.name == name]
    if len(found) != 1:
        raise LookupError(f"tasks/{name}.py declares {len(found)} stages named {name!r}; expected one")
    return found[0]


class _WithStageCommands(TyperGroup):
    """`gptoss <stage>` for every stage, built from its declaration when named (so `gptoss artifacts ls`
    does not import what the stages need). Where a group holds the name (`gptoss train plan`), the
    stage is its `run` subcommand."""

    def list_commands(self, ctx) -> list[str]:
        return sorted(set(super().list_commands(ctx)) | set(stage_names()))

    def get_command(self, ctx, name: str):
        command = super().get_command(ctx, name)
        if name not in stage_names() or (command is not None and not isinstance(command, TyperGroup)):
            return command
        if command is None:
            return _stage_command(name)
        if "run" not in command.commands:
            command.add_command(_stage_command(name, as_name="run"))
        return command


def _stage_command(name: str, as_name: str | None = None):
    from flows.stage_cli import run_in_this_process, stage_command

    stage = load_stage(name)
    single = typer.Typer(pretty_exceptions_show_locals=False)
    single.command(name=as_name or name, help=f"{stage.summary} (in this process, no Prefect server; with a progress bar)")(
        one_line_errors(stage_command(stage, run_in_this_process(stage))))
    return typer.main.get_command(single)


app = typer.Typer(help="GPT-OSS pipeline: Hugging Face -> Megatron -> Hugging Face, as Prefect flows.",
                  no_args_is_help=True, pretty_exceptions_show_locals=False, cls=_WithStageCommands)
artifacts = typer.Typer(help="Inspect and maintain the artifact store.", no_args_is_help=True)
app.add_typer(artifacts, name="artifacts")
train_app = typer.Typer(help="Plan and run training: `gptoss train plan`, `gptoss train run`.",
                        no_args_is_help=True)
app.add_typer(train_app, name="train")
# Piped output (logs, CI) gets a wide console so versions are never cut.
console = Console(width=None if sys.stdout.isatty() else 160)

StoreOpt = Annotated[Optional[str], typer.Option("--store", envvar="GPTOSS_STORE",
                                                 help="Store URL (file://... or s3://bucket/prefix).")]
EndpointOpt = Annotated[Optional[str], typer.Option("--s3-endpoint-url", envvar="GPTOSS_S3_ENDPOINT_URL",
                                                    help="S3-compatible endpoint URL.")]


@app.callback()
def _global_options(debug: Annotated[bool, typer.Option(
        "--debug", help="On an error, show the full traceback instead of one line.")] = False) -> None:
    """GPT-OSS pipeline: Hugging Face -> Megatron -> Hugging Face, as Prefect flows."""
    options["debug"] = debug


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
