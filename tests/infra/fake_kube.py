"""A Kubernetes API server that speaks, over real HTTP, the few REST routes the Kubernetes launcher's
client calls: create/get/delete a Job and a Service, list pods by label, read (and follow) a pod's
log. No cluster can run on the test machines; this stands in for the API server only, so the
launcher's requests, the official client's (de)serialization and the follow/cancel logic are the
real ones.

Its Job controller plays a `Scenario`: pods appear when the Job is created, emit their log lines
over `run_s` seconds, then end with their exit codes; or wait forever on a reason (an image that
cannot be pulled).
"""
from __future__ import annotations

import json
import re
import threading
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, urlparse

INDEX = "batch.kubernetes.io/job-completion-index"


@dataclass
class Scenario:
    lines: dict[int, list[str]] = field(default_factory=dict)  # each pod's log, by completion index
    run_s: float | None = 1.0  # how long the pods run; None: until deleted
    exit_codes: dict[int, int] = field(default_factory=dict)  # by index; 0 where not named
    waiting: str | None = None  # a container waiting reason the pods never leave (ImagePullBackOff)
    unschedulable: str | None = None  # the scheduler's message for pods no node can take
    drop_log_once_after: int | None = None  # close the first follow of pod 0's log after this many lines


def _stamp(t: float) -> str:
    return datetime.fromtimestamp(t, timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.") + f"{int(t % 1 * 1e9):09d}Z"


class FakeKube:
    def __init__(self, scenario: Scenario | None = None):
        self.scenario = scenario or Scenario()
        self.jobs: dict[tuple[str, str], dict] = {}
        self.services: dict[tuple[str, str], dict] = {}
        self.created_at: dict[tuple[str, str], float] = {}
        self.requests: list[tuple[str, str, dict]] = []  # (method, path, query) of every call
        self.lock = threading.Lock()
        self.dropped = False
        self.server = ThreadingHTTPServer(("127.0.0.1", 0), _handler(self))
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()

    def kubeconfig(self, path) -> str:
        path.write_text(json.dumps({
            "apiVersion": "v1", "kind": "Config", "current-context": "fake",
            "clusters": [{"name": "fake", "cluster": {"server": self.url}}],
            "users": [{"name": "fake", "user": {"token": "fake-token"}}],
            "contexts": [{"name": "fake", "context": {"cluster": "fake", "user": "fake"}}]}))
        return str(path)

    # ---------------------------------------------------------------- the Job controller's view
    def _times(self, key) -> tuple[float, float | None]:
        start = self.created_at[key] + 0.1
        return start, None if self.scenario.run_s is None else start + self.scenario.run_s

    def line_times(self, key, index: int) -> list[tuple[float, str]]:
        start, end = self._times(key)
        lines = self.scenario.lines.get(index, [])
        span = 0.8 * (end - start) if end is not None else 0.5
        return [(start + span * i / max(len(lines), 1), line) for i, line in enumerate(lines)]

    def pods(self, key) -> list[dict]:
        job = self.jobs[key]
        now = time.time()
        start, end = self._times(key)
        s = self.scenario
        pods = []
        for i in range(job["spec"]["completions"]):
            code = s.exit_codes.get(i, 0)
            container = {"name": "trainer", "image": job["spec"]["template"]["spec"]["containers"][0]["image"],
                         "imageID": "", "ready": False, "restartCount": 0, "state": {}}
            conditions = []
            if s.unschedulable:
                phase, container = "Pending", None
                conditions = [{"type": "PodScheduled", "status": "False", "reason": "Unschedulable",
                               "message": s.unschedulable}]
            elif s.waiting or now < start:
                phase = "Pending"
                container["state"] = {"waiting": {"reason": s.waiting or "ContainerCreating",
                                                  "message": f"Back-off pulling image {container['image']!r}"}}
            elif end is None or now < end:
                phase = "Running"
                container.update(ready=True, state={"running": {"startedAt": _stamp(start)[:19] + "Z"}})
            else:
                phase = "Failed" if code else "Succeeded"
                container["state"] = {"terminated": {"exitCode": code, "reason": "Error" if code else "Completed",
                                                     "finishedAt": _stamp(end + 0.01 * i)[:19] + "Z"}}
            pods.append({
                "apiVersion": "v1", "kind": "Pod",
                "metadata": {"name": f"{key[1]}-{i}-x{i}", "namespace": key[0],
                             "labels": job["spec"]["template"]["metadata"]["labels"],
                             "annotations": {INDEX: str(i)}},
                "spec": job["spec"]["template"]["spec"],
                "status": {"phase": phase, "conditions": conditions,
                           "containerStatuses": [container] if container else []}})
        return pods

    def job_status(self, key) -> dict:
        _, end = self._times(key)
        if end is None or time.time() < end or self.scenario.waiting or self.scenario.unschedulable:
            return {"active": self.jobs[key]["spec"]["completions"]}
        if any(self.scenario.exit_codes.values()):
            return {"failed": 1, "conditions": [{"type": "Failed", "status": "True", "reason": "BackoffLimitExceeded",
                                                 "message": "Job has reached the specified backoff limit"}]}
        return {"succeeded": self.jobs[key]["spec"]["completions"],
                "conditions": [{"type": "Complete", "status": "True"}]}


def _handler(kube: FakeKube):
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, *args):
            pass

        def _send(self, code: int, body: dict) -> None:
            data = json.dumps(body).encode()
            self.send_response(code)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def _missing(self, what: str) -> None:
            self._send(404, {"kind": "Status", "apiVersion": "v1", "status": "Failure", "reason": "NotFound",
                             "code": 404, "message": f"{what} not found"})

        def _route(self, method: str):
            url = urlparse(self.path)
            query = {k: v[0] for k, v in parse_qs(url.query).items()}
            with kube.lock:
                kube.requests.append((method, url.path, query))
            m = re.fullmatch(r"/api(?:s/batch)?/v1/namespaces/([^/]+)/(jobs|services|pods)(?:/([^/]+))?(/log)?",
                             url.path)
            if not m:
                return self._send(404, {"kind": "Status", "code": 404, "message": f"no route {url.path}"})
            ns, kind, name, is_log = m.groups()
            store = kube.jobs if kind == "jobs" else kube.services
            if method == "POST":
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                key = (ns, body["metadata"]["name"])
                with kube.lock:
                    if key in store:
                        return self._send(409, {"kind": "Status", "code": 409, "reason": "AlreadyExists",
                                                "message": f"{kind} {key[1]!r} already exists"})
                    store[key] = body
                    kube.created_at[key] = time.time()
                return self._send(201, body)
            if kind == "pods" and is_log:
                try:
                    return self._log(ns, name, query)
                except (BrokenPipeError, ConnectionResetError):
                    return None  # the client stopped following
            if kind == "pods":
                selector = dict(p.split("=", 1) for p in query.get("labelSelector", "").split(",") if p)
                items = [pod for key in list(kube.jobs) if key[0] == ns for pod in kube.pods(key)
                         if all(pod["metadata"]["labels"].get(k) == v for k, v in selector.items())]
                return self._send(200, {"apiVersion": "v1", "kind": "PodList", "metadata": {}, "items": items})
            key = (ns, name)
            if key not in store:
                return self._missing(f"{kind} {name!r}")
            if method == "DELETE":
                with kube.lock:
                    store.pop(key)
                return self._send(200, {"kind": "Status", "apiVersion": "v1", "status": "Success"})
            body = dict(store[key], status=kube.job_status(key)) if kind == "jobs" else store[key]
            return self._send(200, body)

        def _log(self, ns: str, pod: str, query: dict) -> None:
            key = next((k for k in kube.jobs if k[0] == ns and pod.startswith(k[1] + "-")), None)
            if key is None:
                return self._missing(f"pod {pod!r}")
            index = int(pod.rsplit("-x", 1)[1])
            lines = kube.line_times(key, index)
            follow = query.get("follow", "").lower() == "true"  # the client sends Python's True
            stamps = query.get("timestamps", "").lower() == "true"
            self.send_response(200)
            self.send_header("Content-Type", "text/plain")
            self.send_header("Transfer-Encoding", "chunked")
            self.end_headers()
            sent = 0
            drop = kube.scenario.drop_log_once_after if index == 0 and not kube.dropped else None
            while True:
                now = time.time()
                while sent < len(lines) and lines[sent][0] <= now:
                    t, text = lines[sent]
                    data = ((_stamp(t) + " ") if stamps else "") + text + "\n"
                    self.wfile.write(f"{len(data.encode()):x}\r\n".encode() + data.encode() + b"\r\n")
                    self.wfile.flush()
                    sent += 1
                    if drop is not None and sent >= drop:
                        kube.dropped = True
                        self.close_connection = True
                        return  # cut mid-stream, no final chunk: a connection the API server dropped
                _, end = kube._times(key)
                gone = key not in kube.jobs
                if not follow or gone or (end is not None and now >= end and sent == len(lines)):
                    break
                time.sleep(0.02)
            self.wfile.write(b"0\r\n\r\n")

        def do_GET(self):
            self._route("GET")

        def do_POST(self):
            self._route("POST")

        def do_DELETE(self):
            self._route("DELETE")

    return Handler
