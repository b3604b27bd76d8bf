"""Files named by someone else (a Hub tree, a manifest, a mirror listing) and the locks
that keep two writers out of one directory.

Every path that arrives from outside is checked with `relative_path_problem`
before it is joined to a local root, so nothing lands (or is deleted) outside it.
"""
from __future__ import annotations

import fcntl
import os
import re
from pathlib import Path


def relative_path_problem(path) -> str | None:
    """Why `path` is not a safe relative, '/'-separated path inside a root; None when it is."""
    if not isinstance(path, str) or not path:
        return "empty"
    if path.startswith("/") or re.match(r"^[A-Za-z]:", path):
        return "absolute paths are not allowed"
    if "\\" in path or any(ord(c) < 32 or ord(c) == 127 for c in path):
        return "backslashes and control characters are not allowed"
    if any(part in ("", ".", "..") for part in path.split("/")):
        return "empty, '.' or '..' component"
    return None


# scheme://authority-without-@[/rest], or a plain path (no "://" in it); spaces allowed in paths.
# A JSON-schema pattern too: the Prefect server refuses a run whose URL parameter breaks it.
URL_WITHOUT_CREDENTIALS_PATTERN = (r"^(?:[A-Za-z][A-Za-z0-9+.-]*://[^/?#@\s]*(?:[/?#].*)?"
                                   r"|(?:[^:]|:[^/]|:/[^/])+(?::/?)?)$")


def url_credentials_problem(url: str, field: str | None = None) -> str | None:
    """Why `url` may not be stored with a run (it carries a user:password@), naming `field`."""
    scheme, sep, rest = url.partition("://")
    if sep and "@" in re.split(r"[/?#]", rest, maxsplit=1)[0]:
        return (f"{field + ': ' if field else ''}{scheme}://…@… holds credentials (user:password@), which would be stored in the "
                "run's parameters and the artifact's manifest; give them through the filesystem's own "
                "configuration (environment, profile, storage options or a Prefect Secret block) instead")
    return None


def is_within(root: Path, path: Path) -> bool:
    """`path` resolves to `root` or below it (symlinks and '..' followed)."""
    root, path = Path(root).resolve(), Path(path).resolve()
    return path == root or root in path.parents


def work_dir_lock(directory: Path) -> Path:
    """The lock file that says a local work dir is in use: `.{name}.lock` beside it.

    Staging dirs (the store's run_stage) and download work dirs (verified transfers)
    share this rule, so `gptoss artifacts gc` can tell a live one (lock held) from a leftover."""
    directory = Path(directory)
    return directory.parent / f".{directory.name}.lock"


def try_lock(path: Path, *, blocking: bool = False) -> int | None:
    """An exclusive flock on `path` (created if needed): its fd, or None if held elsewhere.

    The kernel releases it when the holder dies, even by kill -9. The lock file is
    never unlinked: unlinking races a locker that already opened the old inode.
    """
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | (0 if blocking else fcntl.LOCK_NB))
    except BlockingIOError:
        os.close(fd)
        return None
    return fd
