"""The backend for a store URL: a local directory (`file://`, the embedded default), S3 or
any S3-compatible endpoint (`s3://`), and any other fsspec URL (best effort)."""
from __future__ import annotations

from urllib.parse import urlparse

from .base import Backend
from .fsspec_backend import FsspecBackend
from .local import LocalBackend
from .s3 import S3Backend


def backend_for_url(url: str, *, s3_endpoint_url: str | None = None, s3_credentials: dict | None = None,
                    storage_options: dict | None = None) -> Backend:
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
