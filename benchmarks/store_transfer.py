"""Artifact store vs boto3's transfer manager on the same data, same S3 server.

Starts a moto S3 server in its own process on 127.0.0.1 (so the server's CPU
does not share our interpreter's GIL), writes a directory of `--total-mb` MB
(a few large shards plus small files, like a checkpoint), then times:
  store commit (upload) / store download (with sha256 verification)
  boto3 upload_file / download_file, file by file (default TransferConfig)
Besides wall time it prints the CPU seconds each operation cost this process
(all its threads) and the S3 server: on a shared, loaded machine wall times
swing, CPU seconds much less, and they show where the time goes.
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
import psutil

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from tasks.store import ArtifactStore, Producer  # noqa: E402
from tasks.store.base import hash_file  # noqa: E402


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
        server_proc = psutil.Process(server.pid)
        rows: dict[str, list[tuple[float, float, float]]] = {
            k: [] for k in ("store upload", "store download", "boto3 upload_file", "boto3 download_file")}

        def timed(name: str, fn) -> None:
            cpu, srv = time.process_time(), sum(server_proc.cpu_times()[:2])
            wall = time.perf_counter()
            fn()
            rows[name].append((time.perf_counter() - wall, time.process_time() - cpu,
                               sum(server_proc.cpu_times()[:2]) - srv))

        def boto3_download(r: int, dest: Path) -> None:
            for p in files:
                out = dest / p.relative_to(src)
                out.parent.mkdir(parents=True, exist_ok=True)
                s3.download_file("bench", f"boto3/{r}/{p.relative_to(src).as_posix()}", str(out))

        for r in range(args.repeat):
            version = f"{r:020x}"
            committed = []
            timed("store upload", lambda: committed.append(store.commit(
                src, kind="bench", name="dir", version=version, producer=Producer(stage="bench", code_version="1"))[0]))
            dest = work / f"store-out-{r}"
            timed("store download", lambda: store.download(committed[0], dest))
            shutil.rmtree(dest)
            timed("boto3 upload_file", lambda: [s3.upload_file(str(p), "bench", f"boto3/{r}/{p.relative_to(src).as_posix()}")
                                                for p in files])
            dest = work / f"boto3-out-{r}"
            timed("boto3 download_file", lambda: boto3_download(r, dest))
            shutil.rmtree(dest)
        started = time.process_time()
        for p in files:
            hash_file(p)
        sha_cpu = time.process_time() - started
        print(f"\n{total / 1e6:.0f} MB in {len(files)} files, moto S3 at {endpoint}, best of {args.repeat} "
              f"(load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores)")
        print("| operation | seconds | MB/s | client CPU s | server CPU s |")
        print("|---|---:|---:|---:|---:|")
        for name, runs in rows.items():
            wall, cpu, srv = min(runs)
            print(f"| {name} | {wall:.2f} | {total / 1e6 / wall:.0f} | {cpu:.2f} | {srv:.2f} |")
        best = {name: min(runs)[0] for name, runs in rows.items()}
        up = best["boto3 upload_file"] / best["store upload"]
        down = best["boto3 download_file"] / best["store download"]
        print(f"\nstore/boto3 speed ratio: upload {up:.2f}x, download {down:.2f}x (>= 1 means no slower)")
        print(f"sha256 of the same files alone: {sha_cpu:.2f} CPU s")
        print("(store download includes sha256 verification of every byte; boto3 verifies nothing)")
    finally:
        server.terminate()
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
