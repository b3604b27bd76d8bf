"""Object-storage backends behind the artifact store.

Three: a local directory (`file://`, the embedded default), S3 and any
S3-compatible endpoint (`s3://`, talking boto3 directly: conditional puts for
the commit point, and multipart transfers that keep up with boto3's transfer
manager where s3fs is ~3x slower), and any other fsspec URL (best effort: no
atomic create, so concurrent writers are only protected by claims).
"""
from __future__ import annotations

import hashlib
import os
import tempfile
import threading
import uuid
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlparse

from .settings import settings

CHUNK = 8 << 20
Progress = Callable[[int], None]


class PreconditionFailed(Exception):
    """A conditional write lost: the object exists (or changed)."""


@dataclass(frozen=True)
class ObjectInfo:
    key: str
    size: int
    mtime: float  # seconds since the epoch


def _noop(_: int) -> None:
    pass


def hash_file(path: Path, progress: Progress = _noop) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(CHUNK):
            h.update(chunk)
            progress(len(chunk))
    return h.hexdigest()


class LocalBackend:
    """A directory on a local (or mounted) filesystem."""

    def __init__(self, root: str | Path):
        self.root = Path(root).expanduser().resolve()
        self.url = self.root.as_uri()

    def path(self, key: str) -> Path:
        return self.root / key

    def put_bytes(self, key: str, data: bytes, *, if_absent: bool = False) -> None:
        dest = self.path(key)
        dest.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=dest.parent, prefix=f".{dest.name}.", suffix=".tmp")
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
            if if_absent:
                # link() fails if the target exists: an atomic create-if-absent.
                try:
                    os.link(tmp, dest)
                except FileExistsError:
                    raise PreconditionFailed(key) from None
            else:
                os.replace(tmp, dest)
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)

    def get_bytes(self, key: str) -> bytes | None:
        try:
            return self.path(key).read_bytes()
        except (FileNotFoundError, NotADirectoryError):
            return None

    def exists(self, key: str) -> bool:
        return self.path(key).is_file()

    def list(self, prefix: str) -> Iterator[ObjectInfo]:
        base = self.path(prefix)
        if not base.is_dir():
            return
        for dirpath, _, files in os.walk(base):
            for fn in files:
                p = Path(dirpath) / fn
                try:
                    st = p.stat()
                except FileNotFoundError:
                    continue
                yield ObjectInfo(p.relative_to(self.root).as_posix(), st.st_size, st.st_mtime)

    def delete(self, keys: list[str]) -> None:
        for key in keys:
            p = self.path(key)
            p.unlink(missing_ok=True)
            # Drop directories left empty, up to the store root.
            parent = p.parent
            while parent != self.root and parent.is_dir():
                try:
                    parent.rmdir()
                except OSError:
                    break
                parent = parent.parent

    def upload_file(self, src: Path, key: str, progress: Progress = _noop) -> str:
        # A staging file nobody else links to is hard-linked into the store, not copied:
        # a 42 GB checkpoint is not written twice (nor held twice on disk). A file with other
        # links (a kept download work copy) is copied, so editing it can never change a
        # committed artifact. Either way every byte is hashed for the manifest.
        dest = self.path(key)
        if os.stat(src).st_nlink == 1 and _link_into_place(Path(src), dest):
            return hash_file(dest, progress)
        return copy_hashing(src, dest, progress)

    def download_file(self, key: str, dest: Path, size: int, progress: Progress = _noop) -> str:
        return copy_hashing(self.path(key), dest, progress)


def _link_into_place(src: Path, dest: Path) -> bool:
    """Hard-link src to dest (replacing it) through a temp name; False where links do not work."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = dest.with_name(f".{dest.name}.{uuid.uuid4().hex}.tmp")
    try:
        os.link(src, tmp)
    except OSError:  # another filesystem (EXDEV), or one without hard links
        return False
    try:
        os.replace(tmp, dest)
    finally:
        tmp.unlink(missing_ok=True)
    return True


def copy_hashing(src: Path, dest: Path, progress: Progress = _noop) -> str:
    """Copy through a temp file renamed into place, hashing on the way."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = dest.with_name(f".{dest.name}.{uuid.uuid4().hex}.tmp")
    h = hashlib.sha256()
    try:
        with open(src, "rb") as fin, open(tmp, "wb") as fout:
            while chunk := fin.read(CHUNK):
                h.update(chunk)
                fout.write(chunk)
                progress(len(chunk))
        os.replace(tmp, dest)
    finally:
        tmp.unlink(missing_ok=True)
    return h.hexdigest()


class S3Backend:
    """S3 or an S3-compatible endpoint through boto3.

    Credentials come from the caller (a Prefect block) or boto3's usual chain
    (environment, profile, instance role); they are held only by the client.
    """

    # Same shape as boto3's transfer manager (8 MiB parts, CRC32 per part),
    # which measured fastest against S3-compatible servers here.
    MULTIPART_THRESHOLD = 16 << 20
    MIN_PART = 8 << 20
    CHECKSUM = {"ChecksumAlgorithm": "CRC32"}
    MAX_PARTS = 10_000

    def __init__(self, bucket: str, prefix: str = "", *, endpoint_url: str | None = None,
                 region: str | None = None, credentials: dict | None = None, max_concurrency: int = 10):
        import boto3
        from botocore.config import Config

        self.bucket = bucket
        self.prefix = prefix.strip("/")
        self.url = f"s3://{bucket}/{self.prefix}".rstrip("/")
        self.endpoint_url = endpoint_url or settings().s3_endpoint_url
        session = boto3.session.Session(**(credentials or {}))
        self.client = session.client(
            "s3",
            endpoint_url=self.endpoint_url,
            region_name=region or settings().aws_region,
            config=Config(
                max_pool_connections=max_concurrency * 2 + 8,
                retries={"max_attempts": 6, "mode": "standard"},
                s3={"addressing_style": "path"} if self.endpoint_url else {},
            ),
        )
        self.max_concurrency = max_concurrency
        self.parts_pool = ThreadPoolExecutor(max_concurrency, thread_name_prefix="s3-part")

    def _k(self, key: str) -> str:
        return f"{self.prefix}/{key}" if self.prefix else key

    def _error_code(self, exc) -> str:
        return str(getattr(exc, "response", {}).get("Error", {}).get("Code", ""))

    def put_bytes(self, key: str, data: bytes, *, if_absent: bool = False) -> None:
        from botocore.exceptions import ClientError

        kwargs = {"IfNoneMatch": "*"} if if_absent else {}
        try:
            self.client.put_object(Bucket=self.bucket, Key=self._k(key), Body=data, **kwargs)
        except ClientError as exc:
            if self._error_code(exc) in ("PreconditionFailed", "412", "ConditionalRequestConflict"):
                raise PreconditionFailed(key) from None
            raise

    def get_bytes(self, key: str) -> bytes | None:
        from botocore.exceptions import ClientError

        try:
            return self.client.get_object(Bucket=self.bucket, Key=self._k(key))["Body"].read()
        except ClientError as exc:
            if self._error_code(exc) in ("NoSuchKey", "404"):
                return None
            raise

    def get_etag(self, key: str) -> tuple[bytes, str] | None:
        from botocore.exceptions import ClientError

        try:
            obj = self.client.get_object(Bucket=self.bucket, Key=self._k(key))
        except ClientError as exc:
            if self._error_code(exc) in ("NoSuchKey", "404"):
                return None
            raise
        return obj["Body"].read(), obj["ETag"]

    def replace_if_match(self, key: str, data: bytes, etag: str) -> str:
        from botocore.exceptions import ClientError

        try:
            return self.client.put_object(Bucket=self.bucket, Key=self._k(key), Body=data, IfMatch=etag)["ETag"]
        except ClientError as exc:
            if self._error_code(exc) in ("PreconditionFailed", "412", "NoSuchKey", "404",
                                         "ConditionalRequestConflict"):
                raise PreconditionFailed(key) from None
            raise

    def exists(self, key: str) -> bool:
        from botocore.exceptions import ClientError

        try:
            self.client.head_object(Bucket=self.bucket, Key=self._k(key))
            return True
        except ClientError as exc:
            if self._error_code(exc) in ("NoSuchKey", "404", "NotFound"):
                return False
            raise

    def list(self, prefix: str) -> Iterator[ObjectInfo]:
        full = self._k(prefix)
        strip = len(self.prefix) + 1 if self.prefix else 0
        for page in self.client.get_paginator("list_objects_v2").paginate(Bucket=self.bucket, Prefix=full):
            for obj in page.get("Contents", []):
                yield ObjectInfo(obj["Key"][strip:], obj["Size"], obj["LastModified"].timestamp())

    def delete(self, keys: list[str]) -> None:
        for i in range(0, len(keys), 1000):
            batch = [{"Key": self._k(k)} for k in keys[i:i + 1000]]
            if batch:
                self.client.delete_objects(Bucket=self.bucket, Delete={"Objects": batch, "Quiet": True})

    def _part_size(self, size: int) -> int:
        return max(self.MIN_PART, -(-size // self.MAX_PARTS))

    def upload_file(self, src: Path, key: str, progress: Progress = _noop) -> str:
        size = src.stat().st_size
        if size <= self.MULTIPART_THRESHOLD:
            data = src.read_bytes()
            self.client.put_object(Bucket=self.bucket, Key=self._k(key), Body=data, **self.CHECKSUM)
            progress(size)
            return hashlib.sha256(data).hexdigest()
        part = self._part_size(size)
        upload_id = self.client.create_multipart_upload(Bucket=self.bucket, Key=self._k(key),
                                                        **self.CHECKSUM)["UploadId"]
        # One sequential read feeds both the sha256 and the parts in flight;
        # the semaphore bounds memory to a few parts per worker.
        in_flight = threading.BoundedSemaphore(self.max_concurrency + 2)
        try:
            def send(number: int, body: bytes) -> dict:
                try:
                    resp = self.client.upload_part(Bucket=self.bucket, Key=self._k(key), UploadId=upload_id,
                                                   PartNumber=number, Body=body, **self.CHECKSUM)
                finally:
                    in_flight.release()
                progress(len(body))
                done = {"PartNumber": number, "ETag": resp["ETag"]}
                if resp.get("ChecksumCRC32"):
                    done["ChecksumCRC32"] = resp["ChecksumCRC32"]
                return done

            h = hashlib.sha256()
            futures = []
            with open(src, "rb") as f:
                number = 0
                while body := f.read(part):
                    h.update(body)
                    number += 1
                    in_flight.acquire()
                    futures.append(self.parts_pool.submit(send, number, body))
            digest = h.hexdigest()
            parts = [fut.result() for fut in futures]
            self.client.complete_multipart_upload(Bucket=self.bucket, Key=self._k(key), UploadId=upload_id,
                                                  MultipartUpload={"Parts": parts})
        except BaseException:
            self.client.abort_multipart_upload(Bucket=self.bucket, Key=self._k(key), UploadId=upload_id)
            raise
        return digest

    def download_file(self, key: str, dest: Path, size: int, progress: Progress = _noop) -> str:
        if size <= self.MULTIPART_THRESHOLD:
            body = self.client.get_object(Bucket=self.bucket, Key=self._k(key))["Body"]
            h = hashlib.sha256()
            with open(dest, "wb") as f:
                for chunk in body.iter_chunks(CHUNK):
                    h.update(chunk)
                    f.write(chunk)
                    progress(len(chunk))
            return h.hexdigest()
        part = self._part_size(size)
        with open(dest, "wb") as f:
            f.truncate(size)
        fd = os.open(dest, os.O_WRONLY)
        try:
            def fetch(offset: int) -> None:
                end = min(offset + part, size) - 1
                body = self.client.get_object(Bucket=self.bucket, Key=self._k(key),
                                              Range=f"bytes={offset}-{end}")["Body"]
                pos = offset
                for chunk in body.iter_chunks(CHUNK):
                    os.pwrite(fd, chunk, pos)
                    pos += len(chunk)
                    progress(len(chunk))
                if pos != end + 1:
                    raise OSError(f"short read of {key} bytes {offset}-{end}: got {pos - offset}")

            for fut in [self.parts_pool.submit(fetch, off) for off in range(0, size, part)]:
                fut.result()
        finally:
            os.close(fd)
        return hash_file(dest)


class FsspecBackend:
    """Any other fsspec filesystem. No atomic create: claims guard commits."""

    def __init__(self, url: str, storage_options: dict | None = None):
        import fsspec

        self.fs, root = fsspec.core.url_to_fs(url, **(storage_options or {}))
        self.root = root.rstrip("/")
        self.url = url.rstrip("/")

    def _k(self, key: str) -> str:
        return f"{self.root}/{key}"

    def put_bytes(self, key: str, data: bytes, *, if_absent: bool = False) -> None:
        if if_absent and self.fs.exists(self._k(key)):
            raise PreconditionFailed(key)
        self.fs.pipe_file(self._k(key), data)

    def get_bytes(self, key: str) -> bytes | None:
        try:
            return self.fs.cat_file(self._k(key))
        except FileNotFoundError:
            return None

    def exists(self, key: str) -> bool:
        return self.fs.isfile(self._k(key))

    def list(self, prefix: str) -> Iterator[ObjectInfo]:
        try:
            found = self.fs.find(self._k(prefix), detail=True)
        except FileNotFoundError:
            return
        for path, info in found.items():
            mtime = info.get("mtime") or info.get("LastModified") or 0
            mtime = mtime.timestamp() if hasattr(mtime, "timestamp") else float(mtime)
            yield ObjectInfo(path[len(self.root) + 1:], int(info.get("size") or 0), mtime)

    def delete(self, keys: list[str]) -> None:
        if keys:
            self.fs.rm([self._k(k) for k in keys])

    def upload_file(self, src: Path, key: str, progress: Progress = _noop) -> str:
        h = hashlib.sha256()
        with open(src, "rb") as fin, self.fs.open(self._k(key), "wb") as fout:
            while chunk := fin.read(CHUNK):
                h.update(chunk)
                fout.write(chunk)
                progress(len(chunk))
        return h.hexdigest()

    def download_file(self, key: str, dest: Path, size: int, progress: Progress = _noop) -> str:
        h = hashlib.sha256()
        with self.fs.open(self._k(key), "rb") as fin, open(dest, "wb") as fout:
            while chunk := fin.read(CHUNK):
                h.update(chunk)
                fout.write(chunk)
                progress(len(chunk))
        return h.hexdigest()


def backend_for_url(url: str, *, s3_endpoint_url: str | None = None, s3_credentials: dict | None = None,
                    storage_options: dict | None = None):
    parsed = urlparse(url)
    if parsed.scheme in ("", "file"):
        path = parsed.path if parsed.scheme == "file" else url
        if parsed.scheme == "file" and parsed.netloc not in ("", "localhost"):
            path = parsed.netloc + parsed.path  # file://relative/dir
        return LocalBackend(path)
    if parsed.scheme in ("s3", "s3a"):
        if not parsed.netloc:
            raise ValueError(f"store URL {url!r} names no bucket")
        return S3Backend(parsed.netloc, parsed.path, endpoint_url=s3_endpoint_url, credentials=s3_credentials)
    return FsspecBackend(url, storage_options)
