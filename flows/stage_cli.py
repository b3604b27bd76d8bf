"""Command lines derived from a stage's declaration: `gptoss <stage>` and `python -m flows.<stage>`.

The params model is the command line: the fields named in `stage.cli_args` are positional
arguments, every other field is an option `--field-name VALUE` with the field's description
as help, and the store is `--store URL` / `--s3-endpoint-url URL`. A value is YAML for a
field that is neither text nor a switch (`--workers 4`, `--overrides '{train.train_iters: 8}'`); a
switch is `--parity` / `--no-parity`.
Nothing is checked here that the params model does not check itself: a bad value is refused
by the model, in one line naming the field.

`gptoss <stage>` runs the stage in this process with a progress bar (no Prefect server
needed); `python -m flows.<stage>` runs the stage's flow (Prefect, ephemeral or
PREFECT_API_URL).
"""
from __future__ import annotations

import inspect
import sys
import types
import typing
from typing import Annotated, Any, Callable, Literal, Optional, Union

import typer
import yaml

STORE_FIELD = "store"
OPTION_PREFIX = "option_"  # the option form of a positional argument


def _is_text(annotation: Any) -> bool:
    """Whether a field takes its command-line string as is (str, str | None, a string Literal)."""
    origin = typing.get_origin(annotation)
    if annotation is str:
        return True
    if origin is Annotated:
        return _is_text(typing.get_args(annotation)[0])
    if origin in (Union, types.UnionType):
        return all(_is_text(a) for a in typing.get_args(annotation) if a is not type(None))
    if origin is Literal:
        return all(isinstance(a, str) for a in typing.get_args(annotation))
    return False


def _is_bool(annotation: Any) -> bool:
    if typing.get_origin(annotation) in (Union, types.UnionType):
        return any(_is_bool(a) for a in typing.get_args(annotation) if a is not type(None))
    return annotation is bool


def _is_list(annotation: Any) -> bool:
    origin = typing.get_origin(annotation)
    if origin in (Union, types.UnionType):
        return any(_is_list(a) for a in typing.get_args(annotation) if a is not type(None))
    return origin is list


def _value(annotation: Any, raw: Any) -> Any:
    if isinstance(raw, bool):
        return raw
    if isinstance(raw, list):
        return [_value(typing.get_args(annotation)[0] if typing.get_args(annotation) else str, r) for r in raw]
    if _is_text(annotation):
        return raw
    try:
        return yaml.safe_load(raw)
    except yaml.YAMLError:
        return raw  # the params model names the field and the value it refuses


def stage_command(stage, run: Callable[[Any], Any]) -> Callable:
    """A typer command for `stage`, calling `run(params)`; its signature is built from the params model."""
    fields = stage.params.model_fields
    parameters = []
    for name in stage.cli_args:
        field = fields[name]
        kind = list[str] if _is_list(field.annotation) else str
        required = field.is_required()
        annotation = Annotated[kind if required else Optional[kind],
                               typer.Argument(help=field.description or "", show_default=False)]
        parameters.append(inspect.Parameter(name, inspect.Parameter.POSITIONAL_OR_KEYWORD, annotation=annotation,
                                            default=inspect.Parameter.empty if required else None))
    for name, field in fields.items():
        if name == STORE_FIELD or (name in stage.cli_args and field.is_required()):
            continue
        # an optional positional is an option too: `convert SRC float32 4` or `convert SRC --workers 4`
        flag = f"--{name.replace('_', '-')}"
        if _is_bool(field.annotation):  # a switch, both ways: --parity / --no-parity
            kind, flag = bool, f"{flag}/--no-{flag[2:]}"
        else:
            kind = list[str] if _is_list(field.annotation) else str
        option = typer.Option(flag, help=field.description or "", show_default=False)
        parameters.append(inspect.Parameter(OPTION_PREFIX + name if name in stage.cli_args else name,
                                            inspect.Parameter.KEYWORD_ONLY,
                                            annotation=Annotated[Optional[kind], option], default=None))
    if STORE_FIELD in fields:
        for name, flag, help_ in (("store_url", "--store", "Store URL (file://... or s3://bucket/prefix)."),
                                  ("s3_endpoint_url", "--s3-endpoint-url", "S3-compatible endpoint URL.")):
            parameters.append(inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY, default=None,
                                                annotation=Annotated[Optional[str], typer.Option(flag, help=help_)]))

    def command(**given):
        for name in stage.cli_args:  # the option form wins over the positional one
            if given.get(OPTION_PREFIX + name) is not None:
                given[name] = given.pop(OPTION_PREFIX + name)
        data = {k: _value(fields[k].annotation, v) for k, v in given.items() if k in fields and v is not None}
        if STORE_FIELD in fields:
            store = {k: v for k, v in (("url", given.get("store_url")),
                                       ("s3_endpoint_url", given.get("s3_endpoint_url"))) if v is not None}
            if store:
                data[STORE_FIELD] = store
        return run(stage.params.model_validate(data))

    command.__signature__ = inspect.Signature(parameters)
    command.__name__ = stage.name
    command.__doc__ = stage.summary
    return command


def run_in_this_process(stage) -> Callable[[Any], None]:
    """`gptoss <stage>`: the stage here, a progress bar on the terminal, the result in one line."""
    def run(params) -> None:
        from tasks.common import progress_to
        from tasks.store import RichProgress

        bar = RichProgress()
        with progress_to(bar):
            try:
                result = stage.run(params)
            finally:
                bar.close()
        typer.echo(f"{result.spec} ({'cache hit' if result.cache_hit else 'committed'})")
        if stage.report is not None:
            show_table(*stage.report(result.manifest))
    return run


def show_table(title: str, rows: list[dict]) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title=title)
    columns = list(dict.fromkeys(k for row in rows for k in row))
    for column in columns:
        table.add_column(column)
    for row in rows:
        table.add_row(*(str(row.get(c, "")) for c in columns))
    Console(width=None if sys.stdout.isatty() else 160).print(table)


def run_flow_from_command_line(stage, flow, argv: list[str] | None = None) -> None:
    """`python -m flows.<stage> ...`: parse the arguments like `gptoss <stage>`, run the flow, print the spec."""
    from flows.terminal import one_line_errors

    app = typer.Typer(add_completion=False, pretty_exceptions_show_locals=False)
    app.command(name=stage.name, help=stage.summary)(
        one_line_errors(stage_command(stage, lambda params: typer.echo(flow(params).spec))))
    sys.exit(app(args=sys.argv[1:] if argv is None else argv, prog_name=f"python -m flows.{stage.name}",
                 standalone_mode=True))
