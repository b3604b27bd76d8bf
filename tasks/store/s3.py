"""S3 and S3-compatible endpoints through boto3 directly: conditional puts for the
commit point, multipart transfers that keep up with boto3's transfer manager
(where s3fs is ~3x slower), sha256 recorded on every object (so an interrupted
commit resumes), and timeouts that turn a silent endpoint into a clear error.
"""
from __future__ import annotations

import hashlib
import logging
import os
import threading
from collections import deque
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor, wait
from pathlib import Path

from gptoss_model.settings import settings

from .base import CHUNK, ObjectInfo, PreconditionFailed, Progress, no_progress

log = logging.getLogger(__name__)


class StoreUnreachable(ConnectionError):
    """The store's endpoint did not answer within the timeouts, after the bounded retries."""


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
    # An endpoint that accepts connections and never answers must fail, not hang: every
    # request gets these timeouts and at most MAX_ATTEMPTS tries (with backoff).
    CONNECT_TIMEOUT = 10
    READ_TIMEOUT = 30
    MAX_ATTEMPTS = 3
    SHA256_KEY = "sha256"  # object metadata (or, for multipart uploads, object tag) holding the sha256
    local_root = None

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
                connect_timeout=self.CONNECT_TIMEOUT, read_timeout=self.READ_TIMEOUT,
                retries={"max_attempts": self.MAX_ATTEMPTS, "mode": "standard"},
                # Integrity is the per-part CRC32 the server checks plus our sha256 of the whole
                # object; SigV4 payload signing would hash every byte a second time on http endpoints.
                s3={"payload_signing_enabled": False, **({"addressing_style": "path"} if self.endpoint_url else {})},
            ),
        )
        self.client = _EndpointErrors(self.client, f"{self.url} (endpoint {self.client.meta.endpoint_url})")
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

    def get_range(self, key: str, start: int, count: int) -> bytes:
        """`count` bytes from `start` (fewer at the object's end)."""
        return self.client.get_object(Bucket=self.bucket, Key=self._k(key),
                                      Range=f"bytes={start}-{start + count - 1}")["Body"].read()

    def get_with_etag(self, key: str) -> tuple[bytes, str] | None:
        from botocore.exceptions import ClientError

        try:
            obj = self.client.get_object(Bucket=self.bucket, Key=self._k(key))
        except ClientError as exc:
            if self._error_code(exc) in ("NoSuchKey", "404"):
                return None
            raise
        return obj["Body"].read(), obj["ETag"]

    def replace(self, key: str, data: bytes, *, if_match: str | None) -> str | None:
        from botocore.exceptions import ClientError

        if if_match is None:
            self.put_bytes(key, data)
            return None
        try:
            return self.client.put_object(Bucket=self.bucket, Key=self._k(key), Body=data, IfMatch=if_match)["ETag"]
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

    def multipart_uploads(self, prefix: str = "") -> Iterator[tuple[str, str, float]]:
        """Unfinished multipart uploads under `prefix`: (key, upload id, initiated at)."""
        strip = len(self.prefix) + 1 if self.prefix else 0
        paginator = self.client.get_paginator("list_multipart_uploads")
        for page in paginator.paginate(Bucket=self.bucket, Prefix=self._k(prefix)):
            for up in page.get("Uploads", []):
                yield up["Key"][strip:], up["UploadId"], up["Initiated"].timestamp()

    def abort_upload(self, key: str, upload_id: str) -> None:
        self.client.abort_multipart_upload(Bucket=self.bucket, Key=self._k(key), UploadId=upload_id)

    def _part_size(self, size: int) -> int:
        return max(self.MIN_PART, -(-size // self.MAX_PARTS))

    def recorded_sha256(self, key: str, size: int) -> str | None:
        """The sha256 recorded with an uploaded object of this size (None: absent, other size, unknown).

        A commit retry keeps an object whose recorded sha256 equals its staging file's."""
        from botocore.exceptions import ClientError

        try:
            head = self.client.head_object(Bucket=self.bucket, Key=self._k(key))
        except ClientError as exc:
            if self._error_code(exc) in ("NoSuchKey", "404", "NotFound"):
                return None
            raise
        if head["ContentLength"] != size:
            return None
        if head.get("Metadata", {}).get(self.SHA256_KEY):
            return head["Metadata"][self.SHA256_KEY]
        try:
            tags = self.client.get_object_tagging(Bucket=self.bucket, Key=self._k(key))["TagSet"]
        except ClientError:  # a server without tagging: nothing recorded
            return None
        return next((tag["Value"] for tag in tags if tag["Key"] == self.SHA256_KEY), None)

    def upload_file(self, src: Path, key: str, progress: Progress = no_progress) -> str:
        size = src.stat().st_size
        if size <= self.MULTIPART_THRESHOLD:
            data = src.read_bytes()
            digest = hashlib.sha256(data).hexdigest()
            self.client.put_object(Bucket=self.bucket, Key=self._k(key), Body=data,
                                   Metadata={self.SHA256_KEY: digest}, **self.CHECKSUM)
            progress(size)
            return digest
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
                    number += 1
                    in_flight.acquire()
                    futures.append(self.parts_pool.submit(send, number, body))
                    h.update(body)  # after the submit: this part's hash overlaps its own send
            digest = h.hexdigest()
            parts = [fut.result() for fut in futures]
            self.client.complete_multipart_upload(Bucket=self.bucket, Key=self._k(key), UploadId=upload_id,
                                                  MultipartUpload={"Parts": parts})
        except BaseException:
            self.client.abort_multipart_upload(Bucket=self.bucket, Key=self._k(key), UploadId=upload_id)
            raise
        self._record_sha256_tag(key, digest)
        return digest

    def _record_sha256_tag(self, key: str, digest: str) -> None:
        # Multipart metadata is fixed before the sha256 is known (it is computed while the parts
        # go out); a tag can be set afterwards. Best effort: without it a retry re-uploads the file.
        from botocore.exceptions import ClientError

        try:
            self.client.put_object_tagging(Bucket=self.bucket, Key=self._k(key),
                                           Tagging={"TagSet": [{"Key": self.SHA256_KEY, "Value": digest}]})
        except ClientError as exc:
            log.info("%s: could not tag %s with its sha256 (%s); a commit retry will upload it again",
                     self.url, key, self._error_code(exc))

    def download_file(self, key: str, dest: Path, size: int, progress: Progress = no_progress) -> str:
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

        def fetch(offset: int) -> list[bytes]:
            end = min(offset + part, size) - 1
            body = self.client.get_object(Bucket=self.bucket, Key=self._k(key),
                                          Range=f"bytes={offset}-{end}")["Body"]
            pos, chunks = offset, []
            for chunk in body.iter_chunks(CHUNK):
                os.pwrite(fd, chunk, pos)
                chunks.append(chunk)
                pos += len(chunk)
                progress(len(chunk))
            if pos != end + 1:
                raise OSError(f"short read of {key} bytes {offset}-{end}: got {pos - offset}")
            return chunks

        # Parts are fetched in parallel and hashed here in file order as they arrive (no second
        # read of the file); at most `ahead` fetched-but-unhashed parts are held in memory.
        h, ahead = hashlib.sha256(), self.max_concurrency + 2
        offsets, pending = iter(range(0, size, part)), deque()
        try:
            while True:
                while len(pending) < ahead and (offset := next(offsets, None)) is not None:
                    pending.append(self.parts_pool.submit(fetch, offset))
                if not pending:
                    break
                for chunk in pending.popleft().result():
                    h.update(chunk)
        finally:
            for fut in pending:
                fut.cancel()
            wait(pending)  # no fetch may write after the descriptor is closed
            os.close(fd)
        return h.hexdigest()


class _EndpointErrors:
    """The boto3 client, with connection failures and timeouts (after botocore's bounded
    retries) raised as one StoreUnreachable naming the store and its endpoint."""

    def __init__(self, client, where: str):
        self._client, self._where = client, where

    def _translate(self, call):
        from botocore.exceptions import ConnectionClosedError, ConnectTimeoutError, EndpointConnectionError, \
            ReadTimeoutError

        def run(*args, **kwargs):
            try:
                return call(*args, **kwargs)
            except (EndpointConnectionError, ConnectTimeoutError, ReadTimeoutError, ConnectionClosedError) as exc:
                raise StoreUnreachable(f"store {self._where} did not answer: {exc} "
                                       f"(gave up after {S3Backend.MAX_ATTEMPTS} tries)") from exc
        return run

    def get_paginator(self, name: str):
        paginator = self._client.get_paginator(name)
        translate = self._translate

        class Paginator:
            def paginate(self, **kwargs):
                pages = iter(paginator.paginate(**kwargs))
                next_page = translate(lambda: next(pages, None))
                while (page := next_page()) is not None:
                    yield page
        return Paginator()

    def __getattr__(self, name: str):
        attr = getattr(self._client, name)
        return self._translate(attr) if callable(attr) else attr
