"""JSONL corpora on any fsspec URL: listing, splitting into work units, reading records.

A source is a path, a glob or any fsspec URL (`s3://bucket/corpus/*.jsonl.zst`); each
expands to files in sorted order, and sources keep the order they were given in, so the
document stream (file by file, line by line) is fully determined by the arguments.

Work units are byte ranges of uncompressed files (cut at about `unit_bytes`, each unit
owning the lines that START inside its range) and whole compressed files (`.gz`, `.zst`
cannot be entered mid-stream). Units only split the work: the output never depends on them.

Bad records are reported with `file:line`. Blank lines are not records (they are skipped
and counted); every other line must be a JSON object with a string under each key.
"""
from __future__ import annotations

import contextlib

from dataclasses import dataclass, field
from typing import Iterator, Sequence

import fsspec
import orjson

from gptoss_model.errors import PermanentError

# One JSONL line the tokenizer is handed whole takes ~180x its size in memory (a 50 MB line
# peaked at 9 GB RSS): longer lines are bad input (refused or skipped, named by file:line).
MAX_RECORD_BYTES = 8 << 20
DEFAULT_UNIT_BYTES = 64 << 20  # the most a unit holds unless asked: few tasks for a cluster engine
MIN_UNIT_BYTES = 4 << 20       # below this, per-unit start-up costs more than balance gains
UNITS_PER_WORKER = 8           # enough that the last units finish close together


def auto_unit_bytes(total_bytes: int, workers: int) -> int:
    """A unit size that gives every local worker about UNITS_PER_WORKER units (the pool hands them
    out as workers free up, so the run ends within about one small unit of perfect balance)."""
    return min(DEFAULT_UNIT_BYTES, max(MIN_UNIT_BYTES, total_bytes // (max(workers, 1) * UNITS_PER_WORKER)))
_READ_BLOCK = 1 << 20


class CorpusError(PermanentError, ValueError):
    """The corpus cannot be read or holds a record the policy does not accept."""


class BadRecordError(CorpusError):
    """A record the `fail` policy refuses; the message starts with `file:line`."""

    def __init__(self, message: str, reason: str = "", where: str = ""):
        super().__init__(message)
        self.reason, self.where = reason, where

    @classmethod
    def at(cls, reason: str, where: str, detail: str) -> "BadRecordError":
        return cls(f"{where}: {reason.replace('_', ' ')}: {detail}", reason, where)

    def __reduce__(self):  # keeps reason/where across process boundaries
        return type(self), (str(self), self.reason, self.where)


@dataclass(frozen=True)
class SourceFile:
    url: str           # fully qualified (protocol included)
    size: int
    compression: str | None


@dataclass(frozen=True)
class WorkUnit:
    """Lines of `file` starting in [start, end); whole file when compressed."""

    index: int
    file: SourceFile
    start: int
    end: int

    @property
    def label(self) -> str:
        return f"{self.file.url}[{self.start}:{self.end}]"


@dataclass
class BadRecords:
    """Skipped records per reason, with the first few positions of each."""

    counts: dict = field(default_factory=dict)
    examples: dict = field(default_factory=dict)
    max_examples: int = 5

    def add(self, reason: str, where: str, detail: str) -> None:
        self.counts[reason] = self.counts.get(reason, 0) + 1
        shown = self.examples.setdefault(reason, [])
        if len(shown) < self.max_examples:
            shown.append(f"{where}: {detail}")

    def merge(self, other: "BadRecords") -> None:
        for reason, n in other.counts.items():
            self.counts[reason] = self.counts.get(reason, 0) + n
            shown = self.examples.setdefault(reason, [])
            shown.extend(other.examples.get(reason, [])[: self.max_examples - len(shown)])

    def as_dict(self) -> dict:
        return {"counts": dict(sorted(self.counts.items())), "examples": dict(sorted(self.examples.items()))}

    @classmethod
    def from_dict(cls, data: dict) -> "BadRecords":
        return cls(counts=dict(data.get("counts", {})), examples={k: list(v) for k, v in
                                                                 data.get("examples", {}).items()})


class InputUnreachable(ConnectionError):
    """An input's endpoint did not answer in time (transient: a retry may reach it)."""


def input_filesystem(url: str, storage_options: dict | None):
    """(fsspec filesystem, path) for an input URL. `storage_options["retries"]` caps s3fs's own
    retries (5 by default, on top of botocore's), so an endpoint that never answers fails
    within a few timeouts instead of minutes."""
    options = dict(storage_options or {})
    retries = options.pop("retries", None)
    fs, path = fsspec.core.url_to_fs(url, **options)
    if retries is not None and hasattr(fs, "retries"):
        fs.retries = retries
    return fs, path


@contextlib.contextmanager
def input_errors_named(url: str):
    """A network failure reading an input becomes InputUnreachable naming the input."""
    try:
        yield
    except (CorpusError, FileNotFoundError, PermissionError):
        raise
    except Exception as e:  # noqa: BLE001 - botocore/aiohttp errors share no base class with OSError
        if isinstance(e, (TimeoutError, ConnectionError)) or type(e).__module__.split(".")[0] in (
                "botocore", "aiohttp", "aiobotocore", "urllib3", "requests"):
            raise InputUnreachable(f"{url}: {type(e).__name__}: {e}") from e
        raise


def expand_sources(sources: Sequence[str], storage_options: dict | None = None) -> list[SourceFile]:
    """Every file the sources name, in order; an unmatched source is an error."""
    files: list[SourceFile] = []
    for source in sources:
        with input_errors_named(source):
            files += _expand_one(source, storage_options)
    return files


def _expand_one(source: str, storage_options: dict | None) -> list[SourceFile]:
    fs, path = input_filesystem(source, storage_options)
    if fsspec.core.has_magic(path):
        paths = sorted(fs.glob(path))
    elif fs.isdir(path):
        paths = sorted(p for p in fs.find(path) if p.endswith((".jsonl", ".json", ".jsonl.gz", ".json.gz",
                                                              ".jsonl.zst", ".json.zst")))
    elif fs.exists(path):
        paths = [path]
    else:
        raise CorpusError(f"{source}: no such file")
    if not paths:
        raise CorpusError(f"{source}: matches no file")
    return [SourceFile(url=fs.unstrip_protocol(p), size=int(fs.size(p)), compression=fsspec.utils.infer_compression(p))
            for p in paths]


def plan_units(files: Sequence[SourceFile], unit_bytes: int = DEFAULT_UNIT_BYTES) -> list[WorkUnit]:
    units: list[WorkUnit] = []
    for f in files:
        if f.compression or f.size <= unit_bytes:
            units.append(WorkUnit(len(units), f, 0, f.size))
            continue
        for start in range(0, f.size, unit_bytes):
            units.append(WorkUnit(len(units), f, start, min(f.size, start + unit_bytes)))
    return units


def _open_raw(unit: WorkUnit, storage_options: dict | None):
    fs, path = input_filesystem(unit.file.url, storage_options)
    if unit.file.compression == "zstd":
        return _ZstdFrames(fs.open(path, "rb", block_size=8 << 20))
    return fs.open(path, "rb", compression=unit.file.compression, block_size=8 << 20)


class TruncatedStreamError(EOFError):
    """A compressed file ends inside a frame."""


class _ZstdFrames:
    """Decompress a .zst file frame after frame, refusing one that ends mid-frame.

    zstandard's stream reader (fsspec's) returns a truncated file's data up to the cut as
    if it were complete: a corpus copied in part would silently lose its tail."""

    def __init__(self, raw):
        import zstandard

        self._raw, self._zstd = raw, zstandard
        self._frame = zstandard.ZstdDecompressor().decompressobj()
        self._mid_frame = False

    def read(self, size: int = -1) -> bytes:
        while True:
            block = self._raw.read(size if size and size > 0 else 8 << 20)
            if not block:
                if self._mid_frame:
                    raise TruncatedStreamError("the file ends inside a zstd frame (truncated)")
                return b""
            out = []
            while block:
                self._mid_frame = True
                out.append(self._frame.decompress(block))
                block = b""
                if self._frame.eof:  # a frame ended; what follows it starts the next one
                    self._mid_frame = False
                    block = self._frame.unused_data
                    self._frame = self._zstd.ZstdDecompressor().decompressobj()
            data = b"".join(out)
            if data:
                return data

    def seek(self, *_a):
        raise OSError("a compressed file is read from its start")

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self._raw.close()


def _decompression_errors() -> tuple[type[BaseException], ...]:
    import gzip
    import zlib

    import zstandard

    return EOFError, gzip.BadGzipFile, zlib.error, zstandard.ZstdError


def iter_lines(unit: WorkUnit, storage_options: dict | None = None) -> Iterator[tuple[int, bytes]]:
    """(line number within the unit, 1-based; line bytes without the newline) for the unit's lines.

    A compressed file that is corrupt or truncated is a CorpusError naming the file and the
    last line read (EOFError would otherwise end a CLI run as a bare "Aborted.")."""
    number = 0
    try:
        with input_errors_named(unit.file.url):
            for number, line in _iter_lines(unit, storage_options):
                yield number, line
    except _decompression_errors() as e:
        raise CorpusError(f"{unit.file.url}: {unit.file.compression} stream is corrupt or truncated after line "
                          f"{number}: {e}") from None


def _iter_lines(unit: WorkUnit, storage_options: dict | None) -> Iterator[tuple[int, bytes]]:
    with _open_raw(unit, storage_options) as stream:
        position = 0
        if unit.start > 0:
            # The line straddling `start` belongs to the unit before: skip through its newline.
            stream.seek(unit.start - 1)
            position = unit.start - 1
        number = 0
        pending = b""
        skipping = unit.start > 0
        limit = None if unit.file.compression else unit.end
        while True:
            block = stream.read(_READ_BLOCK)
            if not block:
                break
            data = pending + block if pending else block
            begin = 0
            while True:
                cut = data.find(b"\n", begin)
                if cut < 0:
                    break
                if skipping:
                    skipping = False
                else:
                    if limit is not None and position >= limit:
                        return
                    number += 1
                    yield number, data[begin:cut].rstrip(b"\r")
                position += cut + 1 - begin
                begin = cut + 1
            pending = data[begin:]
        if pending and not skipping and (limit is None or position < limit):
            yield number + 1, pending.rstrip(b"\r")


def lines_before(unit: WorkUnit, storage_options: dict | None = None) -> int:
    """How many lines of the file precede the unit's first line (read only on the error path)."""
    if unit.start == 0:
        return 0
    fs, path = input_filesystem(unit.file.url, storage_options)
    newlines = 0
    with fs.open(path, "rb") as f:
        remaining = unit.start - 1
        while remaining > 0:
            block = f.read(min(_READ_BLOCK, remaining))
            if not block:
                break
            newlines += block.count(b"\n")
            remaining -= len(block)
        newlines += f.readline().count(b"\n")  # the straddling line, if any, ends in this unit's skip
    return newlines


class RecordReader:
    """Turns a unit's lines into {key: text} records under a bad-input policy ("fail" or "skip")."""

    def __init__(self, unit: WorkUnit, json_keys: Sequence[str], policy: str,
                 storage_options: dict | None = None, *, conversations: bool = False,
                 max_record_bytes: int = MAX_RECORD_BYTES):
        if policy not in ("fail", "skip"):
            raise CorpusError(f"bad-input policy must be 'fail' or 'skip', got {policy!r}")
        self.unit, self.json_keys, self.policy = unit, tuple(json_keys), policy
        self.storage_options = storage_options
        self.conversations = conversations  # values are chat `messages` lists, not strings
        self.max_record_bytes = max_record_bytes
        self.last_line = 0
        self.bad = BadRecords()
        self.blank_lines = 0
        self.lines = 0
        self._lines_before: int | None = None

    def _where(self, line_in_unit: int) -> str:
        if self._lines_before is None:
            self._lines_before = lines_before(self.unit, self.storage_options)
        return f"{self.unit.file.url}:{self._lines_before + line_in_unit}"

    def reject(self, reason: str, line_in_unit: int, detail: str) -> None:
        where = self._where(line_in_unit) if line_in_unit else self.unit.file.url
        if self.policy == "fail":
            raise BadRecordError.at(reason, where, detail)
        self.bad.add(reason, where, detail)

    def __iter__(self) -> Iterator[tuple[str, ...]]:
        for number, line in iter_lines(self.unit, self.storage_options):
            self.lines = number
            if not line.strip():
                self.blank_lines += 1
                continue
            if len(line) > self.max_record_bytes:
                self.reject("record_too_large", number, f"{len(line):,} bytes, above max_record_bytes="
                            f"{self.max_record_bytes:,} (tokenising one record takes ~180x its size in memory)")
                self.last_line = number
                continue
            record = self._parse(number, line)
            self.last_line = number
            if record is not None:
                yield record
        if self.lines == 0 and self.unit.start == 0:
            self.reject("empty_file", 0, "no lines")

    def _parse(self, number: int, line: bytes) -> tuple[str, ...] | None:
        try:
            data = orjson.loads(line)
        except orjson.JSONDecodeError as e:
            try:
                text = line.decode("utf-8")
            except UnicodeDecodeError as u:
                self.reject("invalid_utf8", number, f"byte {u.start}: {u.reason}")
                return None
            import json  # the stdlib accepts what orjson refuses (NaN, huge ints): same as Megatron-LM

            try:
                data = json.loads(text)
            except json.JSONDecodeError:
                self.reject("malformed_json", number, str(e))
                return None
            try:  # its \ud800-style escapes may leave half a surrogate pair, which no tokenizer takes
                json.dumps(data, ensure_ascii=False).encode("utf-8")
            except UnicodeEncodeError as u:
                self.reject("lone_surrogate", number, f"a \\u escape decodes to half a surrogate pair ({u.reason})")
                return None
        if not isinstance(data, dict):
            self.reject("malformed_json", number, f"a JSON {type(data).__name__}, not an object")
            return None
        values = []
        for key in self.json_keys:
            if key not in data:
                self.reject("missing_key", number, f"no key {key!r} (keys: {sorted(data)[:8]})")
                return None
            value = data[key]
            if self.conversations:
                problem = _conversation_problem(value)
                if problem:
                    self.reject("not_a_conversation", number, f"key {key!r}: {problem}")
                    return None
            elif not isinstance(value, str):
                self.reject("not_a_string", number, f"key {key!r} holds {'null' if value is None else type(value).__name__}")
                return None
            values.append(value)
        return tuple(values)


def _conversation_problem(value) -> str | None:
    """Why `value` is not an OpenAI/HF-style `messages` list, or None."""
    if not isinstance(value, list) or not value:
        return "expected a non-empty list of messages"
    for i, message in enumerate(value):
        if not isinstance(message, dict) or not isinstance(message.get("role"), str):
            return f"message {i} has no string 'role'"
        if not isinstance(message.get("content"), str):
            return f"message {i} ({message['role']}) has no string 'content'"
    if not any(m["role"] == "assistant" for m in value):
        return "no assistant message (nothing to train on)"
    return None
