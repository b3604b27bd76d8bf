"""Validation of artifact kinds, names, versions, refs and file paths.

Every key the store builds goes through here, so a bad name fails early with a
message that says which part is wrong, instead of becoming a broken URL or an
escape from the store root.
"""
from __future__ import annotations

import re

from gptoss_model.errors import PermanentError
from gptoss_model.system.paths import relative_path_problem

KIND_RE = re.compile(r"^[a-z][a-z0-9-]{0,62}$")
SEGMENT_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,95}$")
VERSION_RE = re.compile(r"^[0-9a-f]{20}$")
MAX_NAME_SEGMENTS = 4
_SEGMENT = r"[A-Za-z0-9][A-Za-z0-9._-]{0,95}"
# KIND/NAME[@VERSION|@REF] as a JSON-schema pattern: parameter models carry it, so the Prefect
# server refuses a malformed spec when the run is created (parse_artifact_spec checks the rest).
ARTIFACT_NAME_PATTERN = rf"^{_SEGMENT}(/{_SEGMENT}){{0,{MAX_NAME_SEGMENTS - 1}}}$"
ARTIFACT_SPEC_PATTERN = rf"^[a-z][a-z0-9-]{{0,62}}/{_SEGMENT}(/{_SEGMENT}){{0,{MAX_NAME_SEGMENTS - 1}}}(@{_SEGMENT})?$"
# Names a version directory or a name segment may not take, because the store
# itself uses them inside `{kind}/{name}/`.
RESERVED_SEGMENTS = {"refs", "MANIFEST.json", ".claim.json"}
RESERVED_FILES = {"MANIFEST.json", ".claim.json"}


class InvalidNameError(PermanentError, ValueError):
    """A kind, name, version, ref or artifact file path that the store refuses."""


def validate_kind(kind: str) -> str:
    if not isinstance(kind, str) or not KIND_RE.match(kind):
        raise InvalidNameError(
            f"invalid artifact kind {kind!r}: use lowercase letters, digits and '-', "
            "starting with a letter (e.g. 'hf-checkpoint')"
        )
    return kind


def validate_name(name: str) -> str:
    """A name is 1-4 '/'-separated segments (HF repo ids like 'openai/gpt-oss-20b' fit)."""
    if not isinstance(name, str) or not name:
        raise InvalidNameError(f"invalid artifact name {name!r}: empty")
    segments = name.split("/")
    if len(segments) > MAX_NAME_SEGMENTS:
        raise InvalidNameError(
            f"invalid artifact name {name!r}: at most {MAX_NAME_SEGMENTS} '/'-separated segments"
        )
    for seg in segments:
        if seg in ("", ".", ".."):
            raise InvalidNameError(f"invalid artifact name {name!r}: empty, '.' or '..' segment")
        if seg in RESERVED_SEGMENTS or VERSION_RE.match(seg):
            raise InvalidNameError(
                f"invalid artifact name {name!r}: segment {seg!r} is reserved by the store"
            )
        if not SEGMENT_RE.match(seg):
            raise InvalidNameError(
                f"invalid artifact name {name!r}: segment {seg!r} may hold only letters, digits, "
                "'.', '_' and '-', starting with a letter or digit"
            )
    return name


def validate_version(version: str) -> str:
    if not isinstance(version, str) or not VERSION_RE.match(version):
        raise InvalidNameError(
            f"invalid artifact version {version!r}: expected 20 lowercase hex digits"
        )
    return version


def validate_ref(ref: str) -> str:
    if not isinstance(ref, str) or not SEGMENT_RE.match(ref) or VERSION_RE.match(ref):
        raise InvalidNameError(
            f"invalid ref {ref!r}: letters, digits, '.', '_' and '-', starting with a letter or "
            "digit, and not shaped like a version"
        )
    return ref


def validate_relpath(path: str) -> str:
    """A file path inside an artifact: relative, '/'-separated, no traversal."""
    problem = relative_path_problem(path)
    if problem:
        raise InvalidNameError(f"invalid file path {path!r} in artifact: {problem}")
    if path in RESERVED_FILES:
        raise InvalidNameError(f"invalid file path {path!r} in artifact: reserved by the store")
    return path


def parse_artifact_spec(spec: str) -> tuple[str, str, str | None]:
    """'KIND/NAME[@VERSION|@REF]' -> (kind, name, version_or_ref or None)."""
    base, _, selector = spec.partition("@")
    kind, _, name = base.partition("/")
    validate_kind(kind)
    validate_name(name)
    if selector:
        if not VERSION_RE.match(selector):
            validate_ref(selector)
        return kind, name, selector
    return kind, name, None
