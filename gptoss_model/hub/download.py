"""Download a Hugging Face repo snapshot into a verified local directory.

Why not `huggingface_hub.snapshot_download`: after the process is killed it
starts every file again from byte 0 (its partial files have per-process
names) and it checks sizes only, so a corrupted body of the right size is
accepted. GPT-OSS checkpoints are 13-65 GB, so this module resumes by
itself and verifies every byte:

* the revision (branch, tag or sha) is resolved to a commit sha first and
  everything else is read at that sha, so the result is one fixed version;
* the file list with LFS sha256 and git blob oids comes from the Hub's tree
  API (`HfApi.list_repo_tree`), which honours HF_ENDPOINT / `endpoint=`;
* each file streams into `dest/.partial/<path>` while being hashed; after a
  kill -9 the next call hashes the bytes on disk and asks for the rest with
  an HTTP Range request;
* LFS files must match the tree's sha256, other files its git blob oid; a
  mismatch discards the file and fetches it once more from byte 0, then fails
  naming the file and both digests; only verified files are renamed into
  place (atomic rename), so `dest/<path>` is always either absent or right.

The placement/verification engine (shared with `copy_local_snapshot`, for
local or fsspec mirrors in HF layout) is `gptoss_model.hub.transfer`;
this module adds the Hub: metadata, HTTP with Range, redirects, auth errors,
and `cached_snapshot`, the commit-keyed cache that `AutoBridge` reads repo
ids through (the one way into the Hub).

The token (argument, HF_TOKEN or the saved login, via huggingface_hub) goes
only to the endpoint host: redirects to a CDN are followed without it. It is
never logged and never part of results or error messages.
"""

from __future__ import annotations

import json
import logging
import os
import re
import time
from pathlib import Path
from urllib.parse import quote, urljoin, urlsplit

import httpx
from huggingface_hub import HfApi, constants, hf_hub_url
from huggingface_hub.errors import HfHubHTTPError, RevisionNotFoundError
from huggingface_hub.hf_api import RepoFile
from huggingface_hub.utils import build_hf_headers, get_session

from gptoss_model.errors import PermanentError
from gptoss_model.hub.transfer import (CHUNK, DownloadResult, Part, Progress, RemoteFile, Retry,
                                            SourceNotFoundError, Transfer, TransferError, safe_relpath,
                                            select_files)
from gptoss_model.settings import settings

__all__ = ["download_snapshot", "cached_snapshot", "resolve_revision", "list_remote_files", "snapshot_cache_dir",
           "HubDownloadError", "HubAuthError", "HubNotFoundError"]

log = logging.getLogger(__name__)

_COMMIT_SHA = re.compile(r"[0-9a-f]{40}")


class HubDownloadError(TransferError):
    """A Hub download failed; the message names the repo (and file)."""


class HubAuthError(PermanentError, HubDownloadError):
    """401/403: a token is required, or the one given was refused."""


class HubNotFoundError(HubDownloadError, SourceNotFoundError):
    """404: unknown repo, revision or file (permanent, as every SourceNotFoundError)."""


class HubResponseError(PermanentError, HubDownloadError):
    """The endpoint answered with something no Hub sends (e.g. a commit sha with path separators)."""


LIBRARY_NAME = "gptoss-pipeline"  # in the User-Agent, via build_hf_headers
_TIMEOUT = httpx.Timeout(30.0, read=120.0)  # per read: a stalled stream is retried from its bytes


# --------------------------------------------------------------------------
# Hub metadata
# --------------------------------------------------------------------------
def hub_endpoint(endpoint: str | None = None) -> str:
    # HF_ENDPOINT at call time: huggingface_hub.constants reads it at import.
    return (endpoint or settings().hf_endpoint or constants.ENDPOINT).rstrip("/")


def _api(endpoint: str | None, token) -> HfApi:
    return HfApi(endpoint=hub_endpoint(endpoint), token=token, library_name=LIBRARY_NAME)


def _token_sent(token) -> bool:
    return "authorization" in build_hf_headers(token=token)


def _hub_error(e: Exception, repo_id: str, revision: str, token, endpoint: str) -> HubDownloadError:
    """Our own message for a failed Hub API call. Built from names only, so no
    token text can leak; the caller raises it `from None` for the same reason."""
    where = f"Hub repo {repo_id!r} revision {revision!r} at {endpoint}"
    if isinstance(e, httpx.TransportError):
        return HubDownloadError(f"Cannot reach {where}: {type(e).__name__}")
    status = getattr(getattr(e, "response", None), "status_code", None)
    if status == 401:
        if _token_sent(token):
            return HubAuthError(f"Access to {where} refused (HTTP 401): the token given was rejected "
                                "(invalid or expired, or without access to this repo).")
        return HubAuthError(f"Access to {where} refused (HTTP 401): a token is required (private or gated "
                            "repo, or it does not exist). Pass a token or set HF_TOKEN.")
    if status == 403:
        return HubAuthError(f"Access to {where} refused (HTTP 403): the token has no access to this repo "
                            "(gated: accept its terms on the Hub; or the token lacks read permission).")
    if isinstance(e, RevisionNotFoundError):
        return HubNotFoundError(f"Revision {revision!r} not found in Hub repo {repo_id!r} at {endpoint} (HTTP 404).")
    if status == 404:
        return HubNotFoundError(f"Hub repo {repo_id!r} not found at {endpoint} (revision {revision!r}, HTTP 404).")
    return HubDownloadError(f"Hub request for {where} failed (HTTP {status}).")


def _call_hub(fn, repo_id, revision, token, endpoint):
    """Run an HfApi call; retry transient failures (network, 5xx, 429)."""
    for attempt in range(3):
        try:
            return fn()
        except (HfHubHTTPError, httpx.TransportError) as e:
            status = getattr(getattr(e, "response", None), "status_code", None)
            transient = isinstance(e, httpx.TransportError) or status in (429, 500, 502, 503, 504)
            if not transient or attempt == 2:
                err = _hub_error(e, repo_id, revision, token, hub_endpoint(endpoint))
                raise err from None
            time.sleep(1.0 * 2**attempt)


def resolve_revision(repo_id: str, revision: str = "main", token=None, *, endpoint: str | None = None) -> str:
    """Branch, tag or sha -> commit sha (the version everything is read at)."""
    info = _call_hub(lambda: _api(endpoint, token).model_info(repo_id, revision=revision),
                     repo_id, revision, token, endpoint)
    # The sha names local directories: anything but 40 hex digits (e.g. "x/../../victim") is refused.
    if not isinstance(info.sha, str) or not _COMMIT_SHA.fullmatch(info.sha):
        raise HubResponseError(f"Hub repo {repo_id!r}: the endpoint answered revision {revision!r} with "
                               f"{str(info.sha)[:60]!r}, not a 40-hex-digit commit sha; refusing it.")
    return info.sha


def list_remote_files(repo_id: str, commit: str, token=None, *, endpoint: str | None = None) -> list[RemoteFile]:
    """All files at `commit` with size, git blob oid and LFS sha256."""
    def fetch():
        # expand=False still carries lfs{oid,size} and blob oids, 1000 entries a
        # page; expand=True adds last-commit data we do not need, 50 a page.
        tree = _api(endpoint, token).list_repo_tree(repo_id, recursive=True, expand=False, revision=commit)
        return [RemoteFile(e.path, e.size, e.blob_id, e.lfs.sha256 if e.lfs else None)
                for e in tree if isinstance(e, RepoFile)]
    files = _call_hub(fetch, repo_id, commit, token, endpoint)
    for f in files:
        safe_relpath(f.path, f"Hub repo {repo_id!r}")
    return files


class _HubTransfer(Transfer):
    def __init__(self, repo_id, commit, endpoint, token, dest_dir, max_workers, progress):
        super().__init__(dest_dir, max_workers, progress)
        self.repo_id, self.commit, self.endpoint = repo_id, commit, endpoint
        self.where = f"Hub repo {repo_id!r}@{commit[:12]}"
        self.headers = build_hf_headers(token=token, library_name=LIBRARY_NAME)
        self.token_sent = "authorization" in self.headers
        self._origin = _origin(endpoint)

    def _fill(self, rf: RemoteFile, part: Part) -> None:
        url = hf_hub_url(self.repo_id, rf.path, revision=self.commit, endpoint=self.endpoint)
        range_start = part.have
        for _ in range(10):  # redirects, followed by hand to control the token
            headers = dict(self.headers)
            if _origin(url) != self._origin:
                headers.pop("authorization", None)  # never hand the token to a CDN
            if range_start:
                headers["Range"] = f"bytes={range_start}-"
            try:
                with get_session().stream("GET", url, headers=headers, follow_redirects=False,
                                          timeout=_TIMEOUT) as r:
                    if r.is_redirect:
                        url = urljoin(url, r.headers["Location"])
                        continue
                    self._check_status(r, rf, url, part)
                    if range_start and r.status_code == 200:
                        part.reset()  # the server ignored Range: take the body from byte 0
                    for chunk in r.iter_bytes(CHUNK):
                        part.add(chunk)
                        if part.have > rf.size:
                            return  # more than the tree says: verification reports it
                    return
            except httpx.TransportError as e:
                raise Retry(type(e).__name__) from None
        raise HubDownloadError(f"{self.where}: file {rf.path!r}: too many redirects.")

    def _check_status(self, r: httpx.Response, rf: RemoteFile, url: str, part: Part) -> None:
        s, ours = r.status_code, _origin(url) == self._origin
        if s in (401, 403) and ours:
            need = "the token given was rejected" if self.token_sent else "a token is required (set HF_TOKEN)"
            raise HubAuthError(f"{self.where}: file {rf.path!r}: HTTP {s}: {need}.")
        if s == 404:
            raise HubNotFoundError(f"{self.where}: file {rf.path!r} not found at {_strip_query(url)} (HTTP 404).")
        if s == 416:
            part.reset()  # our partial is longer than the file: start over
            raise Retry("HTTP 416 (range not satisfiable)")
        if s in (401, 403, 408, 429) or s >= 500:
            raise Retry(f"HTTP {s}")  # a 401/403 from a CDN: expired signed URL, re-resolve
        if s == 206:
            first = r.headers.get("Content-Range", "").removeprefix("bytes ").split("-")[0]
            if first != str(part.have):
                raise Retry(f"unexpected Content-Range {r.headers.get('Content-Range')!r}")
        elif s != 200:
            raise HubDownloadError(f"{self.where}: file {rf.path!r}: unexpected HTTP {s}.")


def _origin(url: str) -> tuple:
    u = urlsplit(url)
    return u.scheme, u.hostname, u.port or (443 if u.scheme == "https" else 80)


def _strip_query(url: str) -> str:
    return url.split("?", 1)[0]  # signed CDN URLs carry credentials in the query


def download_snapshot(repo_id: str, revision: str, dest_dir, *, allow_patterns=None, ignore_patterns=None,
                      token=None, max_workers: int = 4, progress: Progress | None = None,
                      endpoint: str | None = None) -> DownloadResult:
    """Download `repo_id` at `revision` into `dest_dir` (HF layout), verified.

    Resumes after a crash from `dest_dir/.partial`; files already in place
    and verified are not fetched again. `token`: str, None (HF_TOKEN or the
    saved login) or False (send none). `progress(bytes_done, bytes_total)`
    is called from worker threads. Other files in `dest_dir` are left alone:
    the result lists exactly the selected files.
    """
    t0 = time.monotonic()
    revision = revision or "main"
    endpoint = hub_endpoint(endpoint)
    commit = resolve_revision(repo_id, revision, token, endpoint=endpoint)
    files = select_files(list_remote_files(repo_id, commit, token, endpoint=endpoint), allow_patterns, ignore_patterns)
    log.info("Hub repo %s: revision %s -> %s; %d files, %d bytes", repo_id, revision, commit,
             len(files), sum(f.size for f in files))
    records = _HubTransfer(repo_id, commit, endpoint, token, dest_dir, max_workers, progress).run(files)
    result = DownloadResult(f"{endpoint}/{repo_id}", repo_id, revision, commit, records, time.monotonic() - t0)
    log.info("Hub repo %s@%s: %d bytes fetched in %.1f s", repo_id, commit[:12], result.bytes_fetched,
             result.seconds)
    return result


# --------------------------------------------------------------------------
# A snapshot cache for callers that want a directory, not a download stage
# --------------------------------------------------------------------------
_COMPLETE = ".complete.json"


def snapshot_cache_dir() -> Path:
    """Where `cached_snapshot` keeps snapshots: $HF_HOME/gptoss-pipeline/snapshots (HF_HOME read at
    call time; huggingface_hub's default home otherwise)."""
    return Path(settings().hf_home or constants.HF_HOME).expanduser() / "gptoss-pipeline" / "snapshots"


def cached_snapshot(repo_id: str, revision: str | None = None, *, allow_patterns=None, ignore_patterns=None,
                    token=None, endpoint: str | None = None, cache_dir=None, progress: Progress | None = None) -> Path:
    """A verified local copy of `repo_id` at `revision`, as a directory in HF layout.

    The revision is resolved to a commit and the snapshot downloaded with `download_snapshot`
    into `cache_dir/<org>--<name>/<commit>`, so a killed call resumes where it stopped and
    every byte is verified. A snapshot completed earlier with the same patterns is reused
    without re-hashing (its directory is named after an immutable commit). With
    HF_HUB_OFFLINE set, the commit last downloaded for `revision` is used, or the call fails.
    """
    revision = revision or "main"
    root = Path(cache_dir or snapshot_cache_dir()) / repo_id.replace("/", "--")
    ref = root / "refs" / quote(revision, safe="")
    patterns = [sorted(allow_patterns or []), sorted(ignore_patterns or [])]
    if settings().hf_hub_offline:
        commit = ref.read_text().strip() if ref.is_file() else revision if _is_sha(revision) else None
        if commit is None or not _complete(root / commit, commit, patterns):
            raise HubDownloadError(f"Hub repo {repo_id!r} revision {revision!r}: HF_HUB_OFFLINE is set and no "
                                   f"complete snapshot of it is cached under {root}.")
        return root / commit
    commit = resolve_revision(repo_id, revision, token, endpoint=endpoint)
    dest = root / commit
    if not _complete(dest, commit, patterns):
        result = download_snapshot(repo_id, commit, dest, allow_patterns=allow_patterns,
                                   ignore_patterns=ignore_patterns, token=token, progress=progress,
                                   endpoint=endpoint)
        files = [{"path": f.path, "size": f.size, "sha256": f.sha256} for f in result.files]
        _write_atomically(dest / _COMPLETE, json.dumps({"commit": commit, "patterns": patterns,
                                                        "files": files}))
    _write_atomically(ref, commit)
    return dest


def _is_sha(revision: str) -> bool:
    return _COMMIT_SHA.fullmatch(revision) is not None


def _complete(dest: Path, commit: str, patterns) -> bool:
    try:
        done = json.loads((dest / _COMPLETE).read_text())
    except (OSError, ValueError):
        return False
    return (done.get("commit") == commit and done.get("patterns") == patterns
            and all((dest / f["path"]).is_file() and (dest / f["path"]).stat().st_size == f["size"]
                    for f in done.get("files", [])))


def _write_atomically(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)
