"""Artifact store vs boto3's transfer manager on the same data, same S3 server.

Starts a moto S3 server in its own process on 127.0.0.1 (so the server's CPU
does not share our interpreter's GIL), writes a directory of `--total-mb` MB
(a few large shards plus small files, like a checkpoint), then times:
  store commit (upload) / store download (with sha256 verification)
  boto3 upload_file / download_file, file by file (default TransferConfig)
usage: python benchmarks/store_transfer.py [--total-mb 500] [--repeat 2]
"""
from __future__ import annotations

import argparse
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import boto3

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from tasks.store import ArtifactStore, Producer  # noqa: E402


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def make_dir(root: Path, total_mb: int) -> list[Path]:
    big = max(1, total_mb // 100)
    sizes = [(total_mb * 1_000_000 - 8 * 200_000) // big] * big + [200_000] * 8
    files = []
    for i, size in enumerate(sizes):
        p = root / ("shards" if size > 1_000_000 else "meta") / f"part-{i:03d}.bin"
        p.parent.mkdir(parents=True, exist_ok=True)
        with open(p, "wb") as f:
            f.write(os.urandom(size))
        files.append(p)
    return files


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--total-mb", type=int, default=500)
    ap.add_argument("--repeat", type=int, default=2)
    args = ap.parse_args()
    os.environ.setdefault("AWS_ACCESS_KEY_ID", "bench")
    os.environ.setdefault("AWS_SECRET_ACCESS_KEY", "bench")
    os.environ.setdefault("AWS_DEFAULT_REGION", "us-east-1")
    port = free_port()
    server = subprocess.Popen([Path(sys.executable).with_name("moto_server"), "-H", "127.0.0.1", "-p", str(port)],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    endpoint = f"http://127.0.0.1:{port}"
    work = Path(tempfile.mkdtemp(prefix="store-bench-"))
    try:
        for _ in range(100):
            try:
                socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
                break
            except OSError:
                time.sleep(0.1)
        s3 = boto3.client("s3", endpoint_url=endpoint)
        s3.create_bucket(Bucket="bench")
        src = work / "src"
        files = make_dir(src, args.total_mb)
        total = sum(p.stat().st_size for p in files)
        store = ArtifactStore("s3://bench/store", s3_endpoint_url=endpoint)
        rows: dict[str, list[float]] = {k: [] for k in
                                         ("store upload", "store download", "boto3 upload_file", "boto3 download_file")}
        for r in range(args.repeat):
            version = f"{r:020x}"
            t = time.perf_counter()
            m, _ = store.commit(src, kind="bench", name="dir", version=version,
                                producer=Producer(stage="bench", code_version="1"))
            rows["store upload"].append(time.perf_counter() - t)
            dest = work / f"store-out-{r}"
            t = time.perf_counter()
            store.download(m, dest)
            rows["store download"].append(time.perf_counter() - t)
            shutil.rmtree(dest)
            t = time.perf_counter()
            for p in files:
                s3.upload_file(str(p), "bench", f"boto3/{r}/{p.relative_to(src).as_posix()}")
            rows["boto3 upload_file"].append(time.perf_counter() - t)
            dest = work / f"boto3-out-{r}"
            t = time.perf_counter()
            for p in files:
                out = dest / p.relative_to(src)
                out.parent.mkdir(parents=True, exist_ok=True)
                s3.download_file("bench", f"boto3/{r}/{p.relative_to(src).as_posix()}", str(out))
            rows["boto3 download_file"].append(time.perf_counter() - t)
            shutil.rmtree(dest)
        print(f"\n{total / 1e6:.0f} MB in {len(files)} files, moto S3 at {endpoint}, best of {args.repeat}")
        print("| operation | seconds | MB/s |")
        print("|---|---:|---:|")
        for name, times in rows.items():
            best = min(times)
            print(f"| {name} | {best:.2f} | {total / 1e6 / best:.0f} |")
        up = min(rows["boto3 upload_file"]) / min(rows["store upload"])
        down = min(rows["boto3 download_file"]) / min(rows["store download"])
        print(f"\nstore/boto3 speed ratio: upload {up:.2f}x, download {down:.2f}x (>= 1 means no slower)")
        print("(store download includes sha256 verification of every byte; boto3 verifies nothing)")
    finally:
        server.terminate()
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
