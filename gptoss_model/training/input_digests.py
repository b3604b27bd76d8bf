"""Every node checks the input files it reads against their manifests' sha256, once per node.

The submitting host materialises the base checkpoint and the dataset (the local store itself,
or the store's verified cache) and writes `inputs.sha256.json` beside the run config: each
file's path, size and sha256 as the artifact manifests give them. The other nodes read those
files through a shared filesystem or a volume, and what the submitting host verified need not
be what another node sees (a stale NFS client cache, a half-synced copy, a different mount).
So before the model is built, the first rank of every node (LOCAL_RANK 0) hashes every listed
file while the node's other ranks wait, and all ranks then agree whether every node saw the
right bytes: one hashing per node, not one per rank.

A mismatch is permanent (a retry would read the same bytes): rank 0 reports every node's
first bad file, read from a fixed-size byte buffer each rank fills (text, never a pickle).
"""
from __future__ import annotations

import hashlib
import json
import socket
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Iterable

from gptoss_model.errors import PermanentError

DIGESTS_FILE = "inputs.sha256.json"
_REPORT_BYTES = 1024  # each node's first problem, UTF-8, as a collective's payload
_CHUNK = 8 << 20


class InputMismatch(PermanentError, RuntimeError):
    """An input file a node reads is missing or differs from its artifact's manifest."""


@dataclass(frozen=True)
class InputFile:
    path: str      # absolute, as every node sees it (a shared filesystem or a volume at the same path)
    size: int
    sha256: str
    artifact: str  # kind/name@version, for the message


def write_digests(path: Path, files: Iterable[InputFile]) -> int:
    """Write the list the nodes check against (JSON); returns the number of files."""
    listed = [asdict(f) for f in files]
    path.write_text(json.dumps({"files": listed}, indent=1))
    return len(listed)


def read_digests(path: Path) -> list[InputFile]:
    try:
        listed = json.loads(Path(path).read_text())["files"]
        return [InputFile(**entry) for entry in listed]
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise InputMismatch(f"{path}: not a readable input digest list ({e})") from None


def _problem(f: InputFile) -> str | None:
    where = Path(f.path)
    try:
        size = where.stat().st_size
    except OSError as e:
        return f"{f.path} ({f.artifact}): cannot be read here ({e.strerror or e})"
    if size != f.size:
        return f"{f.path} ({f.artifact}): {size} bytes, its manifest says {f.size}"
    digest = hashlib.sha256()
    with where.open("rb") as fh:
        while block := fh.read(_CHUNK):
            digest.update(block)
    if digest.hexdigest() != f.sha256:
        return f"{f.path} ({f.artifact}): sha256 {digest.hexdigest()[:16]}..., its manifest says {f.sha256[:16]}..."
    return None


def problems(files: list[InputFile], workers: int = 4) -> list[str]:
    """Every file that is missing or differs, in list order (hashed on a few threads: hashlib
    releases the GIL, so a node's disks, not one core, set the pace)."""
    with ThreadPoolExecutor(max_workers=max(1, min(workers, len(files)))) as pool:
        return [p for p in pool.map(_problem, files) if p is not None]


def verify_once_per_node(digest_file: Path, *, local_rank: int, node: int, device=None) -> str:
    """Check the node's view of the inputs (LOCAL_RANK 0 hashes, the rest wait) and agree over the
    world; returns rank 0's summary line, raises InputMismatch on every rank if any node failed."""
    import torch
    import torch.distributed as dist

    checker = local_rank == 0
    found: list[str] = []
    files: list[InputFile] = []
    took = 0.0
    if checker:
        started = time.monotonic()
        try:
            files = read_digests(digest_file)
            found = problems(files)
        except InputMismatch as e:
            found = [str(e)]
        took = time.monotonic() - started
    counts = torch.tensor([float(checker), float(bool(found))], dtype=torch.float64, device=device)
    slowest = torch.tensor([took], dtype=torch.float64, device=device)
    dist.all_reduce(counts)
    dist.all_reduce(slowest, op=dist.ReduceOp.MAX)
    nodes, failed = int(counts[0]), int(counts[1])
    if failed:
        mine = f"node {node} ({socket.gethostname()}): {found[0]}" + (
            f" (and {len(found) - 1} more)" if len(found) > 1 else "") if found else ""
        payload = torch.zeros(_REPORT_BYTES, dtype=torch.uint8, device=device)
        encoded = mine.encode()[:_REPORT_BYTES]
        payload[:len(encoded)] = torch.tensor(list(encoded), dtype=torch.uint8, device=device)
        gathered = [torch.empty_like(payload) for _ in range(dist.get_world_size())]
        dist.all_gather(gathered, payload)
        reports = [bytes(t.cpu().tolist()).rstrip(b"\0").decode(errors="replace") for t in gathered]
        raise InputMismatch(f"inputs differ from their manifests on {failed} of {nodes} node(s): "
                            + "; ".join(r for r in reports if r))
    size = sum(f.size for f in files)
    return (f"inputs verified once per node: {nodes} node(s) x {len(files)} files ({size / 1e6:.1f} MB), "
            f"sha256 in {float(slowest[0]):.2f} s on the slowest node")
