"""The one distinction every stage's retry policy needs: can a retry fix this?

A `PermanentError` says no: the input is malformed, a parameter is invalid, a
numeric gate failed, a repository does not exist. Retrying it only delays the
same failure (and hides the real message behind back-off). Anything else (a
dropped connection, a full disk, a killed worker) is worth another attempt.

Library errors derive from `PermanentError` *and* the builtin they always
were (ValueError, LookupError, ...), so existing `except ValueError` callers
keep working.
"""
from __future__ import annotations


class PermanentError(Exception):
    """An error that a retry of the same call cannot fix."""


class InvalidParameterError(PermanentError, ValueError):
    """A parameter value the library refuses (names the parameter and the rule)."""


def is_permanent(exc: BaseException | None) -> bool:
    return isinstance(exc, PermanentError)
