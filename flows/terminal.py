"""What every command line here shares: an error is one line naming what is wrong (the traceback
with `gptoss --debug`), and exit status 1."""
from __future__ import annotations

import functools

import typer

# Set by the root callback on every invocation (before any command runs).
options = {"debug": False}


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
            if options["debug"]:
                raise
            typer.echo(error_line(exc), err=True)
            raise typer.Exit(1) from None
    return run
