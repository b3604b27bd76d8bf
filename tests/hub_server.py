"""A small in-process Hugging Face Hub for tests (no internet here).

It speaks the routes huggingface_hub and `gptoss_model.hub.download` call
(see /work/shared/notes/prefect-s3-hub-on-this-machine.md, Hub section):

  GET  /api/models/{repo}[/revision/{rev}]      JSON with `sha`, `siblings`
  GET  /api/models/{repo}/tree/{rev}[/{path}]   ?recursive=&expand= (paginated)
  HEAD /{repo}/resolve/{rev}/{path}             X-Repo-Commit, ETag, X-Linked-*
  GET  /{repo}/resolve/{rev}/{path}             Range -> 206 + Content-Range

and the upload routes of `HfApi.create_repo` / `upload_folder` (legacy LFS
transfer, so tests set huggingface_hub's HF_HUB_DISABLE_XET):

  POST /api/repos/create                         {"name", "organization"}
  POST /api/models/{repo}/preupload/{rev}        upload mode per file (lfs for *.safetensors)
  POST /{repo}.git/info/lfs/objects/batch        "basic" upload actions -> PUT /lfs-upload/{oid}
  POST /api/models/{repo}/commit/{rev}           NDJSON header + file/lfsFile lines -> a new commit

LFS files can be served the way the real Hub does it: a 302 from `resolve`
to a second server (another origin, like the CDN), so tests can check that
the Authorization header never leaves the endpoint host.

Test hooks: `corrupt()` flips a served byte while the tree keeps the true
sha256, `throttle` (bytes/s) slows bodies so a client can be killed mid-file,
`bytes_served` / `requests` count what went over the wire.
"""

from __future__ import annotations

import base64
import hashlib
import json
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import parse_qs, quote, unquote, urlsplit

_CHUNK = 64 * 1024


def git_blob_oid(data: bytes) -> str:
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


@dataclass
class _File:
    data: bytes
    lfs: bool
    sha256: str
    oid: str  # git oid of what git stores: the content, or the LFS pointer
    pointer_size: int = 0


@dataclass
class _Repo:
    repo_id: str
    token: str | None
    commits: dict[str, dict[str, _File]] = field(default_factory=dict)
    refs: dict[str, str] = field(default_factory=dict)  # branch/tag -> sha


@dataclass
class LoggedRequest:
    method: str
    path: str  # raw request path, query included
    status: int
    range: str | None
    authorized: bool  # an Authorization header was present
    host: str  # "hub" or "cdn"
    file: str | None = None  # repo-relative path for resolve and CDN requests


class HubServer:
    """`with HubServer() as hub: hub.add_repo(...); hub.endpoint` ..."""

    def __init__(self, *, lfs_redirect: bool = True, tree_page_size: int = 1000):
        self.repos: dict[str, _Repo] = {}
        self.lfs_redirect = lfs_redirect
        self.tree_page_size = tree_page_size
        self.throttle: float | None = None  # bytes per second for file bodies
        self.ignore_range = False  # answer Range requests with the whole body (200)
        self.bytes_served: Counter[str] = Counter()  # repo-relative path -> body bytes
        self.requests: list[LoggedRequest] = []
        self._corruptions: dict[tuple[str, str], list] = {}  # -> [offset, remaining or None]
        self._drops: dict[tuple[str, str], list] = {}  # -> [after_bytes, remaining]
        self._lock = threading.Lock()
        self.uploaded_blobs: dict[str, bytes] = {}  # sha256 -> LFS object PUT by a client
        self._hub = self._make_server("hub")
        self._cdn = self._make_server("cdn")
        self.endpoint = f"http://127.0.0.1:{self._hub.server_address[1]}"
        # Another host name (as a real CDN), so clients treat it as a foreign origin.
        self.cdn_endpoint = f"http://localhost:{self._cdn.server_address[1]}"

    # -- lifecycle ---------------------------------------------------------
    def _make_server(self, role: str) -> ThreadingHTTPServer:
        hub = self

        class Handler(_Handler):
            server_role = role
            hub_server = hub

        srv = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        srv.daemon_threads = True
        return srv

    def start(self) -> "HubServer":
        for srv in (self._hub, self._cdn):
            threading.Thread(target=srv.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()
        return self

    def stop(self) -> None:
        for srv in (self._hub, self._cdn):
            srv.shutdown()
            srv.server_close()

    def __enter__(self) -> "HubServer":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    # -- content -----------------------------------------------------------
    def add_repo(self, repo_id: str, files: dict[str, bytes] | str | Path, *, tags=(), branches=("main",),
                 lfs_threshold: int = 1 << 20, token: str | None = None) -> str:
        """Create `repo_id` (or add a commit to it); returns the commit sha.

        `files` is {path: bytes} or a directory read recursively. Files of at
        least `lfs_threshold` bytes and *.safetensors are stored as LFS.
        """
        if isinstance(files, (str, Path)):
            root = Path(files)
            files = {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}
        repo = self.repos.get(repo_id)
        if repo is None:
            repo = self.repos[repo_id] = _Repo(repo_id, token)
        elif token is not None:
            repo.token = token
        tree: dict[str, _File] = {}
        for path, data in files.items():
            sha256 = hashlib.sha256(data).hexdigest()
            if len(data) >= lfs_threshold or path.endswith(".safetensors"):
                pointer = f"version https://git-lfs.github.com/spec/v1\noid sha256:{sha256}\nsize {len(data)}\n".encode()
                tree[path] = _File(data, True, sha256, git_blob_oid(pointer), len(pointer))
            else:
                tree[path] = _File(data, False, sha256, git_blob_oid(data))
        # Deterministic "commit" sha: repo, parent commit count and content.
        h = hashlib.sha1(f"{repo_id}\0{len(repo.commits)}\0".encode())
        for path in sorted(tree):
            h.update(f"{path}\0{tree[path].oid}\0".encode())
        sha = h.hexdigest()
        repo.commits[sha] = tree
        for ref in (*branches, *tags):
            repo.refs[ref] = sha
        return sha

    def corrupt(self, repo_id: str, path: str, offset: int = 0, times: int | None = None) -> None:
        """Flip the byte at `offset` in what is served for `path` (the tree keeps
        the true digest). `times`: number of bodies to corrupt (None: always)."""
        with self._lock:
            self._corruptions[(repo_id, path)] = [offset, times]

    def drop(self, repo_id: str, path: str, after: int, times: int = 1) -> None:
        """Close the connection after `after` body bytes of the next `times`
        GETs of `path` (a dropped download the client should resume)."""
        with self._lock:
            self._drops[(repo_id, path)] = [after, times]

    def reset_counters(self) -> None:
        with self._lock:
            self.bytes_served.clear()
            self.requests.clear()

    def file_requests(self, path: str) -> list[LoggedRequest]:
        """GETs of `path`: the Hub's resolve route and the CDN."""
        return [r for r in self.requests if r.method == "GET" and r.file == path]

    # -- helpers used by the handler ----------------------------------------
    def _resolve(self, repo: _Repo, rev: str) -> str | None:
        if rev in repo.commits:
            return rev
        return repo.refs.get(rev)

    def _take_corruption(self, repo_id: str, path: str, start: int, end: int) -> int | None:
        with self._lock:
            c = self._corruptions.get((repo_id, path))
            if c is None or not (start <= c[0] < end) or c[1] == 0:
                return None
            if c[1] is not None:
                c[1] -= 1
            return c[0]


    def _take_drop(self, repo_id: str, path: str) -> int | None:
        with self._lock:
            d = self._drops.get((repo_id, path))
            if d is None or d[1] <= 0:
                return None
            d[1] -= 1
            return d[0]


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server_role = "hub"
    hub_server: HubServer

    def log_message(self, *args) -> None:  # keep pytest output quiet
        pass

    # -- plumbing ------------------------------------------------------------
    def _log(self, status: int, file: str | None = None) -> None:
        hub = self.hub_server
        with hub._lock:
            hub.requests.append(LoggedRequest(self.command, self.path, status, self.headers.get("Range"),
                                              "Authorization" in self.headers, self.server_role, file))

    def _send(self, status: int, body: bytes = b"", headers: dict | None = None, ctype="application/json",
              file: str | None = None) -> None:
        self._log(status, file)
        self.send_response(status)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(body)))
        for k, v in (headers or {}).items():
            self.send_header(k, v)
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def _json(self, obj, headers: dict | None = None) -> None:
        self._send(200, json.dumps(obj).encode(), headers)

    def _error(self, status: int, code: str | None, message: str) -> None:
        headers = {"X-Error-Message": message}
        if code:
            headers["X-Error-Code"] = code
        self._send(status, json.dumps({"error": message}).encode(), headers)

    def _authorize(self, repo: _Repo) -> bool:
        """Mirror the Hub: a private repo answers 401 with RepoNotFound when no
        token is sent, and 'Invalid credentials' when a wrong one is."""
        if repo.token is None:
            return True
        auth = self.headers.get("Authorization")
        if auth == f"Bearer {repo.token}":
            return True
        if auth is None:
            self._error(401, "RepoNotFound", "Repository not found")
        else:
            self._error(401, None, "Invalid credentials in Authorization header")
        return False

    def _split_repo(self, parts: list[str]) -> tuple[_Repo | None, list[str]]:
        hub = self.hub_server
        for n in (2, 1):
            if len(parts) >= n and "/".join(parts[:n]) in hub.repos:
                return hub.repos["/".join(parts[:n])], parts[n:]
        return None, parts

    # -- routes ---------------------------------------------------------------
    def do_HEAD(self) -> None:
        self._route()

    def do_GET(self) -> None:
        self._route()

    # -- uploads -------------------------------------------------------------
    def _request_body(self) -> bytes:
        return self.rfile.read(int(self.headers.get("Content-Length") or 0))

    def do_PUT(self) -> None:
        parts = [unquote(p) for p in urlsplit(self.path).path.split("/")[1:]]
        if parts[:1] == ["lfs-upload"] and len(parts) == 2:
            data = self._request_body()
            if hashlib.sha256(data).hexdigest() != parts[1]:
                return self._error(400, None, "uploaded bytes do not match their oid")
            self.hub_server.uploaded_blobs[parts[1]] = data
            return self._send(200)
        self._error(404, None, f"No route for PUT {self.path}")

    def do_POST(self) -> None:
        hub = self.hub_server
        parts = [unquote(p) for p in urlsplit(self.path).path.split("/")[1:]]
        body = self._request_body()
        if parts == ["api", "repos", "create"]:
            req = json.loads(body)
            repo_id = f"{req['organization']}/{req['name']}" if req.get("organization") else req["name"]
            if repo_id not in hub.repos:
                hub.repos[repo_id] = _Repo(repo_id, None)
            return self._json({"url": f"{hub.endpoint}/{repo_id}", "name": repo_id})
        if parts[-4:] == ["info", "lfs", "objects", "batch"] or (len(parts) >= 5 and parts[-5].endswith(".git")):
            objects = json.loads(body)["objects"]
            return self._json({"transfer": "basic", "objects": [
                {"oid": o["oid"], "size": o["size"], "authenticated": True,
                 "actions": {"upload": {"href": f"{hub.endpoint}/lfs-upload/{o['oid']}"}}} for o in objects]})
        repo, rest = self._split_repo(parts[2:]) if parts[:2] == ["api", "models"] else (None, [])
        if repo is None:
            return self._error(404, "RepoNotFound", "Repository not found")
        if not self._authorize(repo):
            return None
        if rest[:1] == ["preupload"]:
            files = json.loads(body)["files"]
            return self._json({"files": [{"path": f["path"], "shouldIgnore": False, "uploadMode":
                                          "lfs" if f["path"].endswith(".safetensors") else "regular"}
                                         for f in files]})
        if rest[:1] == ["commit"]:
            base = hub._resolve(repo, rest[1] if len(rest) > 1 else "main")
            files = {p: f.data for p, f in (repo.commits[base].items() if base else ())}
            for line in body.decode().splitlines():
                entry = json.loads(line)
                value = entry["value"]
                if entry["key"] == "file":
                    files[value["path"]] = base64.b64decode(value["content"])
                elif entry["key"] == "lfsFile":
                    files[value["path"]] = hub.uploaded_blobs[value["oid"]]
                elif entry["key"] == "deletedFile":
                    files.pop(value["path"], None)
            sha = hub.add_repo(repo.repo_id, files)
            return self._json({"commitUrl": f"{hub.endpoint}/{repo.repo_id}/commit/{sha}", "commitOid": sha,
                               "pullRequestUrl": None})
        self._error(404, None, f"No route for POST {self.path}")

    def _route(self) -> None:
        try:
            url = urlsplit(self.path)
            parts = [unquote(p) for p in url.path.split("/")[1:]]
            if self.server_role == "cdn":
                return self._cdn_get(parts, parse_qs(url.query))
            if parts[:2] == ["api", "models"]:
                return self._api(parts[2:], parse_qs(url.query))
            repo, rest = self._split_repo(parts)
            if rest[:1] == ["resolve"] and len(rest) >= 3:
                return self._resolve(repo, rest[1], "/".join(rest[2:]))
            self._error(404, None, f"No route for {url.path}")
        except (BrokenPipeError, ConnectionResetError):
            self.close_connection = True  # the client went away (killed); fine

    def _lookup(self, repo: _Repo | None, rev: str) -> tuple[str, dict[str, _File]] | None:
        if repo is None:
            self._error(404, "RepoNotFound", "Repository not found")
            return None
        if not self._authorize(repo):
            return None
        sha = self.hub_server._resolve(repo, rev)
        if sha is None:
            self._error(404, "RevisionNotFound", f"Invalid rev id: {rev}")
            return None
        return sha, repo.commits[sha]

    def _api(self, parts: list[str], query: dict) -> None:
        repo, rest = self._split_repo(parts)
        if rest == [] or (len(rest) == 2 and rest[0] == "revision"):
            found = self._lookup(repo, rest[1] if rest else "main")
            if found is None:
                return
            sha, tree = found
            blobs = query.get("blobs", ["false"])[0].lower() == "true"
            siblings = []
            for path in sorted(tree):
                s = {"rfilename": path}
                if blobs:
                    f = tree[path]
                    s.update(size=len(f.data), blobId=f.oid)
                    if f.lfs:
                        s["lfs"] = {"sha256": f.sha256, "size": len(f.data), "pointerSize": f.pointer_size}
                siblings.append(s)
            return self._json({"id": repo.repo_id, "modelId": repo.repo_id, "sha": sha, "private": repo.token is not None,
                               "tags": [], "siblings": siblings, "lastModified": "2025-01-01T00:00:00.000Z"})
        if len(rest) >= 2 and rest[0] == "tree":
            found = self._lookup(repo, rest[1])
            if found is None:
                return
            return self._tree(repo, found[1], "/".join(rest[2:]), query)
        self._error(404, None, "No such API route")

    def _tree(self, repo: _Repo, tree: dict[str, _File], sub: str, query: dict) -> None:
        recursive = query.get("recursive", ["false"])[0].lower() == "true"
        prefix = sub.rstrip("/") + "/" if sub else ""
        entries: dict[str, dict] = {}
        for path in sorted(tree):
            if not path.startswith(prefix):
                continue
            rel = path[len(prefix):].split("/")
            # Folders along the way (all of them when recursive, else the first).
            for depth in range(1, len(rel) if recursive else min(2, len(rel))):
                d = prefix + "/".join(rel[:depth])
                oid = hashlib.sha1(f"tree {d}".encode()).hexdigest()
                entries.setdefault(d, {"type": "directory", "oid": oid, "size": 0, "path": d})
            if recursive or len(rel) == 1:
                f = tree[path]
                e = {"type": "file", "oid": f.oid, "size": len(f.data), "path": path}
                if f.lfs:
                    e["lfs"] = {"oid": f.sha256, "size": len(f.data), "pointerSize": f.pointer_size}
                entries[path] = e
        if sub and not entries:
            return self._error(404, "EntryNotFound", f"{sub} does not exist")
        items = list(entries.values())
        start = int(query.get("cursor", ["0"])[0])
        page = items[start:start + self.hub_server.tree_page_size]
        headers = {}
        if start + len(page) < len(items):
            q = f"recursive={str(recursive).lower()}&cursor={start + len(page)}"
            headers["Link"] = f'<{self.hub_server.endpoint}{urlsplit(self.path).path}?{q}>; rel="next"'
        self._json(page, headers)

    def _resolve(self, repo: _Repo | None, rev: str, path: str) -> None:
        found = self._lookup(repo, rev)
        if found is None:
            return
        sha, tree = found
        f = tree.get(path)
        if f is None:
            return self._error(404, "EntryNotFound", f"{path} does not exist at {rev}")
        headers = {"X-Repo-Commit": sha, "ETag": f'"{f.oid}"', "Accept-Ranges": "bytes"}
        if f.lfs:
            headers.update({"X-Linked-Etag": f'"{f.sha256}"', "X-Linked-Size": str(len(f.data)), "ETag": f'"{f.sha256}"'})
            if self.hub_server.lfs_redirect:
                loc = f"{self.hub_server.cdn_endpoint}/lfs/{quote(repo.repo_id)}/{f.sha256}?path={quote(path)}"
                headers["Location"] = loc
                return self._send(302, b"", headers, file=path)
        self._body(repo.repo_id, path, f.data, headers)

    def _cdn_get(self, parts: list[str], query: dict) -> None:
        # /lfs/{repo...}/{sha256}?path=...: content addressed, no auth (as a signed CDN URL)
        if len(parts) < 3 or parts[0] != "lfs":
            return self._error(404, None, "not found")
        repo = self.hub_server.repos.get("/".join(parts[1:-1]))
        path = query.get("path", [""])[0]
        for tree in (repo.commits.values() if repo else ()):
            f = tree.get(path)
            if f is not None and f.sha256 == parts[-1]:
                return self._body(repo.repo_id, path, f.data, {"ETag": f'"{f.sha256}"', "Accept-Ranges": "bytes"})
        self._error(404, None, "no such object")

    def _body(self, repo_id: str, path: str, data: bytes, headers: dict) -> None:
        hub = self.hub_server
        size, start, end, status = len(data), 0, len(data), 200
        rng = self.headers.get("Range")
        if rng and rng.startswith("bytes=") and not hub.ignore_range:
            a, _, b = rng[6:].partition("-")
            start = int(a) if a else 0
            end = min(int(b) + 1, size) if b else size
            if start >= size:
                headers["Content-Range"] = f"bytes */{size}"
                return self._send(416, b"", headers, file=path)
            status = 206
            headers["Content-Range"] = f"bytes {start}-{end - 1}/{size}"
        body = data[start:end]
        cut = None
        if self.command == "GET":
            cut = hub._take_drop(repo_id, path)
            bad = hub._take_corruption(repo_id, path, start, end)
            if bad is not None:
                body = bytearray(body)
                body[bad - start] ^= 0xFF
                body = bytes(body)
        self._log(status, path)
        self.send_response(status)
        self.send_header("Content-Type", "application/octet-stream")
        self.send_header("Content-Length", str(len(body)))
        for k, v in headers.items():
            self.send_header(k, v)
        self.end_headers()
        if self.command == "HEAD":
            return
        if cut is not None:
            body = body[:cut]  # Content-Length promised more: the client sees a cut body
            self.close_connection = True
        for i in range(0, len(body), _CHUNK):
            piece = body[i:i + _CHUNK]
            self.wfile.write(piece)
            with hub._lock:
                hub.bytes_served[path] += len(piece)
            if hub.throttle:
                time.sleep(len(piece) / hub.throttle)
