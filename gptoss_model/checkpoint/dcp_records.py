"""Read a tensor item of a torch_dist (DCP) checkpoint straight from its bytes, without `torch.load`.

torch's `FileSystemReader.read_data` reads every tensor item with `torch.load`
of its file slice: a zip archive made by `torch.save`. That unpickles the
item's `data.pkl`, copies the record into a fresh storage, and the caller then
copies it again into the buffer it wanted; per item that is three passes over
the bytes and a few milliseconds of zip and pickle handling (an export reads
thousands of items: one per expert per layer).

The archive stores the tensor's bytes as one uncompressed record
(`<archive>/data/0`); DCP writes each item's tensor with a storage of exactly
its own size (a view is cloned first), so the record is the tensor's bytes in
row-major order. `record_span` finds that record from the zip's central
directory and checks what it can (one data record, stored not compressed,
little endian, exactly numel x itemsize bytes); the reader then reads the
bytes straight into the destination buffer. An item that does not look like
that (another serialization format, transforms, a view saved whole) returns
None and is read the torch way. Nothing is unpickled here, so a crafted
checkpoint cannot run code through this path.
"""

from __future__ import annotations

import os
import struct
import zipfile
from dataclasses import dataclass

_LOCAL_HEADER = struct.Struct("<IHHHHHIIIHH")  # the 30-byte zip local file header
_LOCAL_MAGIC = 0x04034B50


@dataclass(frozen=True)
class RecordSpan:
    """Where an item's tensor bytes lie in its file: [offset, offset + nbytes)."""

    offset: int
    nbytes: int


class _Window:
    """A read-only file object over [start, start + length) of an open fd (what zipfile needs)."""

    def __init__(self, fd: int, start: int, length: int):
        self.fd, self.start, self.length, self.pos = fd, start, length, 0

    def seekable(self) -> bool:
        return True

    def tell(self) -> int:
        return self.pos

    def seek(self, pos: int, whence: int = 0) -> int:
        self.pos = {0: pos, 1: self.pos + pos, 2: self.length + pos}[whence]
        return self.pos

    def read(self, n: int = -1) -> bytes:
        n = self.length - self.pos if n is None or n < 0 else min(n, self.length - self.pos)
        data = os.pread(self.fd, max(n, 0), self.start + self.pos)
        self.pos += len(data)
        return data


def record_span(fd: int, item_offset: int, item_length: int, expected_nbytes: int) -> RecordSpan | None:
    """The tensor bytes of one torch_save item at [item_offset, +item_length) of `fd`, or None."""
    if os.pread(fd, 4, item_offset) != b"PK\x03\x04":
        return None
    try:
        archive = zipfile.ZipFile(_Window(fd, item_offset, item_length))
    except (zipfile.BadZipFile, OSError):
        return None
    with archive:
        infos = archive.infolist()
        data = [i for i in infos if "/data/" in i.filename and not i.filename.endswith("/")]
        order = [i for i in infos if i.filename.endswith("/byteorder")]
        if len(data) != 1 or not data[0].filename.endswith("/data/0"):
            return None
        record = data[0]
        if record.compress_type != zipfile.ZIP_STORED or record.file_size != expected_nbytes:
            return None
        if order and archive.read(order[0]).strip() != b"little":
            return None
    header = os.pread(fd, _LOCAL_HEADER.size, item_offset + record.header_offset)
    if len(header) != _LOCAL_HEADER.size:
        return None
    fields = _LOCAL_HEADER.unpack(header)
    if fields[0] != _LOCAL_MAGIC:
        return None
    start = record.header_offset + _LOCAL_HEADER.size + fields[9] + fields[10]
    if start + expected_nbytes > item_length:
        return None
    return RecordSpan(item_offset + start, expected_nbytes)


def read_into(fd: int, span: RecordSpan, buffer: memoryview) -> None:
    """Fill `buffer` (exactly span.nbytes) from the file; short reads are continued, EOF is an error."""
    done = 0
    while done < span.nbytes:
        n = os.preadv(fd, [buffer[done:]], span.offset + done)
        if n <= 0:
            raise OSError(f"unexpected end of file reading {span.nbytes} bytes at offset {span.offset}")
        done += n
