"""Run training on Kubernetes: render infra/kubernetes/train.yaml (a headless Service and an Indexed
Job, one pod per node), create both with the official client, follow the Job and its pods, stream
every pod's log into the run, and delete both when the run is stopped.

A plain Indexed Job needs nothing installed in the cluster (Kubeflow's PyTorchJob needs its
operator and CRDs): see infra/kubernetes/README.md. Every pod's log is streamed, not only pod 0's:
rank 0 (`[default0]:`) runs on whichever pod the rendezvous made node 0, and a failed rank's
torchrun report (its exit code, which decides permanent vs retryable) is in its own pod's log.
"""
from __future__ import annotations

import json
import logging
import shlex
import string
import threading
import time
import uuid
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

import yaml

from gptoss_model.errors import PermanentError
from gptoss_model.training.launchers import TORCHRUN_ENV, KubernetesLaunch

if TYPE_CHECKING:
    from kubernetes.client import ApiClient

log = logging.getLogger(__name__)

TEMPLATE = Path(__file__).resolve().parents[2] / "infra" / "kubernetes" / "train.yaml"
JOB_FILE_PREFIX = "kubernetes:"  # a pid-file line `kubernetes:NAMESPACE/JOB`, so a cancel hook can delete it
INSTANCE_LABEL = "app.kubernetes.io/instance"
INDEX_ANNOTATION = "batch.kubernetes.io/job-completion-index"
# Waiting reasons that will not clear by themselves: the pod cannot start as asked.
CANNOT_START = {"ImagePullBackOff", "ErrImagePull", "InvalidImageName", "ErrImageNeverPull",
                "CreateContainerConfigError", "CreateContainerError"}
# Fixed, non-secret variables of every pod (rank-prefixed lines, one thread per rank by default).
BASE_ENV = [*({"name": k, "value": v} for k, v in TORCHRUN_ENV.items()),
            {"name": "OMP_NUM_THREADS", "value": "1"}, {"name": "PYTHONUNBUFFERED", "value": "1"}]


class KubernetesError(RuntimeError):
    """The API server or the cluster failed in a way a retry may fix (unreachable, a pod evicted)."""


class KubernetesJobRefused(PermanentError, RuntimeError):
    """The job cannot run as asked (an image that cannot be pulled, a pod no node can take, a
    refused manifest) or was deleted outside this run."""


def unique_name(base: str) -> str:
    """A unique DNS-label name: a retry's Job must not collide with one still being deleted, and
    pod hostnames (`<name>-<index>`) stay within 63 characters."""
    cleaned = "".join(c if c.isalnum() else "-" for c in base.lower()).strip("-")[:40].strip("-")
    return f"{cleaned or 'gptoss'}-{uuid.uuid4().hex[:6]}"


def render(launch: KubernetesLaunch, *, config_yaml: Path, name: str) -> list[dict]:
    """The Service and the Job, as the API server will receive them (None-valued fields dropped)."""
    run_dir = Path(config_yaml).parent
    labels = {"app.kubernetes.io/name": "gptoss-train", INSTANCE_LABEL: name,
              "app.kubernetes.io/managed-by": "gptoss-pipeline"}
    env = BASE_ENV + [{"name": n, "valueFrom": {"secretKeyRef": {"name": launch.env_from_secret, "key": n}}}
                      for n in launch.env]
    env_from = ([{"secretRef": {"name": launch.env_from_secret}}] if launch.env_from_secret else []) + (
        [{"configMapRef": {"name": launch.env_from_config_map}}] if launch.env_from_config_map else [])
    values: dict[str, Any] = {
        "name": name, "namespace": launch.namespace, "labels": labels, "selector": {INSTANCE_LABEL: name},
        "rdzv_port": launch.rdzv_port, "nodes": launch.nodes, "service_account": launch.service_account,
        "node_selector": launch.node_selector or None, "tolerations": launch.tolerations or None,
        "image": launch.image, "run_dir": str(run_dir), "env": env, "env_from": env_from or None,
        "resources": {"limits": {"nvidia.com/gpu": launch.gpus_per_node}} if launch.gpus_per_node else None,
        "run_root": str(run_dir.parent), "checkpoint_volume_claim": launch.checkpoint_volume_claim}
    script = {"procs_per_node": launch.procs_per_node, "rdzv_endpoint": f"{name}-0.{name}:{launch.rdzv_port}",
              "rdzv_id": name, "rdzv_timeout_s": launch.rdzv_timeout_s, "max_restarts": launch.max_restarts,
              "config_yaml": shlex.quote(str(config_yaml))}
    text = string.Template(TEMPLATE.read_text()).substitute(
        {k: json.dumps(v) for k, v in values.items()}, **{k: str(v) for k, v in script.items()})
    return [_pruned(doc) for doc in yaml.safe_load_all(text)]


def _pruned(value):
    if isinstance(value, dict):
        return {k: _pruned(v) for k, v in value.items() if v is not None}
    if isinstance(value, list):
        return [_pruned(v) for v in value]
    return value


class _Dumper(yaml.SafeDumper):
    pass


# The pod's shell script stays readable as a block, as in the template.
_Dumper.add_representer(str, lambda d, s: d.represent_scalar("tag:yaml.org,2002:str", s, style="|" if "\n" in s else None))


def manifest_text(docs: list[dict]) -> str:
    """What `kubectl apply -f` would need to create the same objects (written beside the run)."""
    return yaml.dump_all(docs, Dumper=_Dumper, sort_keys=False, width=110)


def input_problems(config_yaml: Path) -> list[str]:
    """The run's inputs the pods cannot see: everything they read must be on the mounted volume."""
    from gptoss_model.training.config import load_yaml

    run = load_yaml(config_yaml)
    root = Path(config_yaml).parent.parent
    paths = [("data.data_paths", p) for p in run.data.data_paths]
    if run.checkpoint.pretrained_checkpoint:
        paths.append(("checkpoint.pretrained_checkpoint", run.checkpoint.pretrained_checkpoint))
    return [f"{field}: {p} is outside {root}, the only directory the pods mount (put the store's cache "
            "on the same volume: GPTOSS_CACHE, or a local store under the workdir)"
            for field, p in paths if not Path(p).resolve().is_relative_to(root.resolve())]


def api_client() -> "ApiClient":
    """In a pod, its service account; elsewhere the kubeconfig (KUBECONFIG or ~/.kube/config)."""
    from kubernetes import client, config

    from gptoss_model.settings import settings

    cfg = client.Configuration()
    try:
        config.load_incluster_config(client_configuration=cfg)
    except config.ConfigException:
        try:
            # KUBECONFIG read now: the client's own default is read once, at its import.
            config.load_kube_config(config_file=settings().kubeconfig, client_configuration=cfg)
        except (config.ConfigException, FileNotFoundError) as e:
            raise KubernetesJobRefused(f"launcher.kind: kubernetes needs a cluster to talk to: no in-cluster "
                                       f"service account and no usable kubeconfig ({e})") from None
    return client.ApiClient(cfg)


def _api_error(e: Exception, what: str) -> Exception:
    """A refusal the same request would meet again (forbidden, invalid, missing namespace) is permanent."""
    status = getattr(e, "status", None)
    body = getattr(e, "body", None) or ""
    try:
        message = json.loads(body).get("message", body)
    except (ValueError, AttributeError):
        message = body or str(e)
    if status in (400, 401, 403, 404, 409, 422):
        return KubernetesJobRefused(f"{what}: the API server refused it ({status}): {message}")
    return KubernetesError(f"{what}: {status or type(e).__name__}: {message}")


def _apis(api: "ApiClient | None"):
    from kubernetes import client

    api = api or api_client()
    return client.BatchV1Api(api), client.CoreV1Api(api)


def _condition(job, *types: str):
    for c in (job.status.conditions if job.status else None) or []:
        if c.type in types and c.status == "True":
            return c
    return None


def cannot_start(pods: list) -> str | None:
    """Why a pod cannot start (an image it cannot pull, no node that can take it), if one cannot."""
    for pod in pods:
        status = pod.status
        for c in (status.conditions if status else None) or []:
            if c.type == "PodScheduled" and c.status == "False" and c.reason == "Unschedulable":
                return f"pod {pod.metadata.name} is Unschedulable: {c.message}"
        for cs in (status.container_statuses if status else None) or []:
            waiting = cs.state.waiting if cs.state else None
            if waiting is not None and waiting.reason in CANNOT_START:
                return f"pod {pod.metadata.name}: {waiting.reason}: {waiting.message}"
    return None


def failed_exit_code(pods: list) -> int | None:
    """The exit code of the container that failed first: the others were stopped because of it."""
    failed = []
    for pod in pods:
        for cs in (pod.status.container_statuses if pod.status else None) or []:
            done = cs.state.terminated if cs.state else None
            if done is not None and done.exit_code:
                failed.append((done.finished_at.timestamp() if done.finished_at else float("inf"), done.exit_code))
    return min(failed)[1] if failed else None


class PodLog(threading.Thread):
    """Hands each line of one pod's log to `on_line` as it comes (`follow`). A dropped stream is
    read again from the start with timestamps and the lines already handed over are skipped: the
    client cannot ask for "since this instant", only for whole seconds."""

    def __init__(self, core, namespace: str, pod: str, on_line: Callable[[str], None]):
        super().__init__(name=f"log-{pod}", daemon=True)
        self.core, self.namespace, self.pod, self.on_line = core, namespace, pod, on_line
        self.last: tuple[str, str] = ("", "")  # timestamp of the newest line handed over
        self.at_last = 0  # lines handed over with that very timestamp (one write may give several)
        self.pod_done = threading.Event()  # the pod ended: a stream that ends now has said everything
        self.stop = threading.Event()

    def run(self) -> None:
        while not self.stop.is_set():
            try:
                self._read_once()
            except Exception as e:  # noqa: BLE001 - a dropped stream, a pod gone: read again or end
                if getattr(e, "status", None) == 404:
                    return
                log.debug("log of pod %s: %s; reading it again", self.pod, e)
            if self.pod_done.is_set():
                return
            self.stop.wait(1.0)

    def _read_once(self) -> None:
        response = self.core.read_namespaced_pod_log(self.pod, self.namespace, follow=True, timestamps=True,
                                                     _preload_content=False, _request_timeout=(30, 600))
        seen: dict[tuple[str, str], int] = {}
        partial = ""
        try:
            for chunk in response.stream(4096, decode_content=True):
                lines = (partial + chunk.decode("utf-8", errors="replace")).split("\n")
                partial = lines.pop()
                for line in lines:
                    self._line(line, seen)
                if self.stop.is_set():
                    return
            if partial:
                self._line(partial, seen)
        finally:
            response.release_conn()

    def _line(self, line: str, seen: dict) -> None:
        stamp, _, text = line.partition(" ")
        day, _, fraction = stamp.rstrip("Z").partition(".")
        key = (day, fraction.ljust(9, "0"))
        seen[key] = seen.get(key, 0) + 1
        if key < self.last or (key == self.last and seen[key] <= self.at_last):
            return  # handed over before the stream was read again
        self.at_last = seen[key] if key == self.last else 1
        self.last = key
        self.on_line(text.rstrip("\r"))


def run_job(launch: KubernetesLaunch, config_yaml: Path, *, run_dir: Path, job_name: str, pid_file: Path,
            on_line: Callable[[str], None], poll: Callable[[], None] | None = None, interval: float = 2.0,
            api: "ApiClient | None" = None) -> int:
    """Create the Service and the Job, follow the Job to its end while streaming every pod's log,
    return its exit code (0, or the first failed container's: the ranks' reports in the log say what
    kind of failure); raise what an end without one means. Any exception on the way (a cancelled
    flow, a failed commit, a pod that cannot start) deletes both first."""
    if "\n" in str(config_yaml) or (problems := input_problems(config_yaml)):
        raise KubernetesJobRefused("the pods cannot read this run's inputs: " + "; ".join(
            problems or [f"{config_yaml!r}: a path with a line break"]))
    batch, core = _apis(api)
    name = unique_name(job_name)
    service, job = render(launch, config_yaml=config_yaml, name=name)
    (run_dir / "kubernetes.yaml").write_text(manifest_text([service, job]))
    ns = launch.namespace
    pid_file.parent.mkdir(parents=True, exist_ok=True)
    pid_file.write_text(f"{JOB_FILE_PREFIX}{ns}/{name}")  # before anything exists: a cancel always finds it
    followers: dict[str, PodLog] = {}
    done = False
    try:
        try:
            core.create_namespaced_service(ns, service)
            batch.create_namespaced_job(ns, job)
        except Exception as e:
            raise _api_error(e, f"creating Job {ns}/{name}") from None
        log.info("created Kubernetes Job %s/%s (%d pod(s) x %d process(es)); its manifest: %s", ns, name,
                 launch.nodes, launch.procs_per_node, run_dir / "kubernetes.yaml")
        while True:
            state, pods = _observe(batch, core, ns, name)
            for pod in pods:
                phase = pod.status.phase if pod.status else None
                if phase in ("Running", "Succeeded", "Failed") and pod.metadata.name not in followers:
                    followers[pod.metadata.name] = follower = PodLog(core, ns, pod.metadata.name, on_line)
                    follower.start()
                if phase in ("Succeeded", "Failed") and pod.metadata.name in followers:
                    followers[pod.metadata.name].pod_done.set()
            if why := cannot_start(pods):
                raise KubernetesJobRefused(f"Kubernetes Job {ns}/{name} cannot start: {why}")
            if poll is not None:
                poll()
            if state is not None:
                break
            time.sleep(interval)
        for follower in followers.values():
            follower.pod_done.set()
            follower.join(timeout=30)
        if poll is not None:
            poll()
        done = True
    finally:
        for follower in followers.values():
            follower.stop.set()
        if done:  # the finished Job keeps its pods' logs until its TTL; the Service has no more use
            _delete_quietly(lambda: core.delete_namespaced_service(name, ns))
        else:
            delete(ns, name, api=batch.api_client)
        pid_file.unlink(missing_ok=True)
    if state.type == "Complete":
        return 0
    code = failed_exit_code(pods)
    if code is not None:
        return code
    raise KubernetesError(f"Kubernetes Job {ns}/{name} failed ({state.reason}: {state.message}) with no "
                          "container exit code (a pod evicted, preempted or lost with its node); a retry resumes "
                          "from the newest checkpoint")


def _observe(batch, core, ns: str, name: str):
    """(the Job's end condition or None, its pods)."""
    try:
        job = batch.read_namespaced_job(name, ns)
        pods = core.list_namespaced_pod(ns, label_selector=f"{INSTANCE_LABEL}={name}").items
    except Exception as e:
        if getattr(e, "status", None) == 404:
            raise KubernetesJobRefused(f"Kubernetes Job {ns}/{name} was deleted outside this run") from None
        raise _api_error(e, f"reading Job {ns}/{name}") from None
    pods.sort(key=lambda p: int((p.metadata.annotations or {}).get(INDEX_ANNOTATION, 0)))
    return _condition(job, "Complete", "Failed"), pods


def _delete_quietly(call: Callable[[], Any]) -> bool:
    """Run a delete; False when the object was already gone."""
    try:
        call()
        return True
    except Exception as e:
        if getattr(e, "status", None) == 404:
            return False
        raise


def delete(namespace: str, name: str, *, api: "ApiClient | None" = None, wait_s: float = 60.0) -> bool:
    """Delete the Job (Foreground: the Job stays until its pods are gone, so waiting for it to
    disappear means no rank is left running) and the Service; False when neither existed."""
    batch, core = _apis(api)
    found = _delete_quietly(lambda: batch.delete_namespaced_job(name, namespace, propagation_policy="Foreground"))
    found = _delete_quietly(lambda: core.delete_namespaced_service(name, namespace)) or found
    deadline = time.monotonic() + wait_s
    while found and time.monotonic() < deadline:
        try:
            batch.read_namespaced_job(name, namespace)
        except Exception as e:
            if getattr(e, "status", None) == 404:
                return True
            raise
        time.sleep(0.5)
    if found:
        log.warning("Kubernetes Job %s/%s still present %s s after its deletion", namespace, name, wait_s)
    return found
