"""Export (megatron -> HF, bf16 and MXFP4) and layer-wise verify at the full width of gpt-oss-20b.

The source is the convert benchmark's synthetic MXFP4 checkpoint (openai/gpt-oss-20b's
exact config with N layers; benchmarks/synthetic_gptoss.py), converted once to a bf16
torch_dist megatron checkpoint. Each job then runs in a FRESH subprocess while the RSS
of its process tree is sampled every 20 ms (benchmarks/convert_20b_width.py's sampler):
  export bf16    export_megatron_to_hf(..., weight_format="bfloat16")
  export mxfp4   export_megatron_to_hf(..., weight_format="mxfp4") (experts re-quantized)
  plain + evict  the same number of bytes as the export, one file, 8 MiB blocks, fsync and
                 page-cache eviction every 1.6 GB (what the export's writer does per shard)
  verify         layer-wise verify of the megatron checkpoint against the HF source
                 (transformers' decoder layer vs ours, one layer at a time), batch 1 x 264
Targets (the issue's): verify peak RSS < 6 GiB; export peak RSS independent of layer count.

run:    .venv/bin/python benchmarks/export_20b_width.py --layers 2 [--json out.json]
smoke:  .venv/bin/python benchmarks/export_20b_width.py --layers 1 --vocab 4096 --experts 4
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import psutil

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks import synthetic_gptoss as sg  # noqa: E402
from benchmarks.convert_20b_width import SAMPLE_S, check_disk, dir_bytes, tree_memory  # noqa: E402

GiB = 2**30
EVICT_EVERY = 1600 * 10**6
# sha256 over every file of the export (tree_sha256) as the single-process exporter of 2026-12-04 wrote
# it, for (layers, vocab, experts, format): an export that differs from it exits non-zero.
REFERENCE_SHA256 = {
    (4, sg.VOCAB_20B, 32, "bfloat16"): "036f265209c005068a3561379cdd875e98a9beba185d7cd5a10f8e8ca2edb094",
    (4, sg.VOCAB_20B, 32, "mxfp4"): "5a03352a0b3c30387a61655f29d2c67b2ce15814c64d19f6d3b1b56ad6c5e2cb",
}
TARGETS = {"bfloat16": 1.5, "mxfp4": 2.0}  # export wall / plain write + evict of the same bytes


def tree_sha256(root: Path) -> str:
    """One digest over every file's relative path and bytes: two exports are byte-identical iff equal."""
    import hashlib

    digest = hashlib.sha256()
    for path in sorted(p for p in root.rglob("*") if p.is_file()):
        digest.update(str(path.relative_to(root)).encode() + b"\0")
        with open(path, "rb") as f:
            while chunk := f.read(16 << 20):
                digest.update(chunk)
    return digest.hexdigest()


def run_job(spec: dict, workdir: Path) -> dict:
    result = workdir / f"{spec['name']}.result.json"
    result.unlink(missing_ok=True)
    cmd = [sys.executable, str(Path(__file__).resolve()), "--_job", json.dumps({**spec, "result": str(result)})]
    peak = 0
    with open(workdir / f"{spec['name']}.log", "w") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT)
        root = psutil.Process(proc.pid)
        while proc.poll() is None:
            peak = max(peak, tree_memory(root)[0])
            time.sleep(SAMPLE_S)
    if proc.returncode != 0 or not result.is_file():
        raise RuntimeError(f"job {spec['name']} failed; see {workdir / (spec['name'] + '.log')}")
    return {**json.loads(result.read_text()), "peak_rss": peak}


def _plain_write(path: Path, nbytes: int) -> None:
    block = os.urandom(8 << 20)
    written = since_evict = 0
    with open(path, "wb") as f:
        while written < nbytes:
            n = min(len(block), nbytes - written)
            f.write(block[:n])
            written += n
            since_evict += n
            if since_evict >= EVICT_EVERY or written == nbytes:
                f.flush()
                os.fsync(f.fileno())
                os.posix_fadvise(f.fileno(), 0, 0, os.POSIX_FADV_DONTNEED)
                since_evict = 0


def job_main(spec: dict) -> None:
    import torch

    import gptoss_model.convert.hf_to_megatron  # noqa: F401  (imports of megatron-core & co. are not the job)
    import gptoss_model.export.megatron_to_hf  # noqa: F401
    import gptoss_model.verify.layers  # noqa: F401

    t0 = time.perf_counter()
    out: dict = {}
    if spec["kind"] == "convert":
        from gptoss_model.convert.hf_to_megatron import convert_hf_to_megatron

        convert_hf_to_megatron(spec["src"], spec["out"], dtype="bfloat16")
    elif spec["kind"] == "export":
        from gptoss_model.export.megatron_to_hf import export_megatron_to_hf

        out = export_megatron_to_hf(spec["megatron"], spec["out"], config=spec["src"],
                                    weight_format=spec["format"], workers=spec["workers"])
    elif spec["kind"] == "plain":
        _plain_write(Path(spec["out"]), spec["bytes"])
    elif spec["kind"] == "verify":
        from gptoss_model.verify.parity import fixed_batch
        from gptoss_model.verify.layers import HFSide, MegatronSide, default_tolerance, verify_layerwise

        reference = HFSide(spec["src"])
        ids = fixed_batch(reference.cfg.vocab_size, 1, 2 * reference.cfg.sliding_window + 8)
        torch.set_num_threads(os.cpu_count() or 1)
        with MegatronSide(spec["megatron"], reference.cfg) as candidate:
            reference.round_to = candidate.storage_dtype
            report = verify_layerwise(reference, candidate, ids, tolerance=default_tolerance("float32"))
        layer_s = [r for r in report.rows if r["block"].startswith("layer")]
        out = {"passed": report.passed, "first_failure": report.first_failure, "table": report.table(),
               "layers": len({r["block"] for r in layer_s}), "block_seconds": report.block_seconds,
               "peak_rss_mb": report.peak_rss_mb}
    out["wall_s"] = round(time.perf_counter() - t0, 2)
    Path(spec["result"]).write_text(json.dumps(out, default=str))


def main() -> None:
    from gptoss_model.settings import settings

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--vocab", type=int, default=sg.VOCAB_20B)
    ap.add_argument("--experts", type=int, default=32)
    ap.add_argument("--workdir", type=Path, default=settings().workdir / "export-bench")
    ap.add_argument("--workers", type=int, default=2, help="export processes")
    ap.add_argument("--skip-verify", action="store_true")
    ap.add_argument("--skip-export", action="store_true")
    ap.add_argument("--json", type=Path)
    ap.add_argument("--_job", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args._job:
        return job_main(json.loads(args._job))
    n, wd = args.layers, args.workdir
    wd.mkdir(parents=True, exist_ok=True)
    tag = f"{n}L-v{args.vocab}-e{args.experts}"
    src = wd / f"hf-{tag}"
    cfg = sg.gptoss_20b_config(n, vocab_size=args.vocab, num_experts=args.experts)
    check_disk(wd, 4 * sg.checkpoint_bytes(cfg) * 3, "source, megatron checkpoint and exports")
    sg.write_synthetic_checkpoint(src, n, vocab_size=args.vocab, num_experts=args.experts)
    meg = wd / f"megatron-{tag}"
    if not (meg / "latest_checkpointed_iteration.txt").is_file():
        subprocess.run(["rm", "-rf", str(meg)], check=True)
        run_job({"name": "convert", "kind": "convert", "src": str(src), "out": str(meg)}, wd)
    rows, checks = [], []  # (what, held, fatal)
    for fmt in () if args.skip_export else ("bfloat16", "mxfp4"):
        out = wd / f"export-{tag}-{fmt}"
        subprocess.run(["rm", "-rf", str(out)], check=True)
        r = run_job({"name": f"export-{fmt}", "kind": "export", "src": str(src), "megatron": str(meg),
                     "out": str(out), "format": fmt, "workers": args.workers}, wd)
        nbytes = dir_bytes(out)
        rows.append({"job": f"export {fmt}", "wall_s": r["wall_s"], "mb": nbytes / 1e6,
                     "peak_rss_gib": r["peak_rss"] / GiB, "sha256": tree_sha256(out)})
        print(f"export {fmt}: {r['wall_s']:.1f} s, {args.workers} workers, sha256 {rows[-1]['sha256']}",
              flush=True)
        plain = wd / f"plain-{fmt}.bin"
        p = run_job({"name": f"plain-{fmt}", "kind": "plain", "out": str(plain), "bytes": nbytes}, wd)
        plain.unlink()
        rows.append({"job": f"plain write + evict ({fmt} bytes)", "wall_s": p["wall_s"], "mb": nbytes / 1e6,
                     "peak_rss_gib": p["peak_rss"] / GiB})
        ratio = r["wall_s"] / p["wall_s"]
        expected = REFERENCE_SHA256.get((n, args.vocab, args.experts, fmt))
        checks.append((f"export {fmt}: {ratio:.2f}x the plain write (target <= {TARGETS[fmt]}x)",
                       ratio <= TARGETS[fmt], False))
        checks.append((f"export {fmt} bytes: sha256 {rows[-2]['sha256'][:16]}... "
                       + ("(no reference for this shape)" if expected is None else
                          f"{'equal to' if rows[-2]['sha256'] == expected else 'DIFFERENT from'} the reference"),
                       expected is None or rows[-2]["sha256"] == expected, True))
        subprocess.run(["rm", "-rf", str(out)], check=True)
    verify = None
    if not args.skip_verify:
        verify = run_job({"name": "verify", "kind": "verify", "src": str(src), "megatron": str(meg)}, wd)
        rows.append({"job": f"layer-wise verify ({n} layers)", "wall_s": verify["wall_s"], "mb": 0.0,
                     "peak_rss_gib": verify["peak_rss"] / GiB, "s_per_layer": verify["wall_s"] / max(n, 1)})
    print(f"\n{n} layers at gpt-oss-20b width (vocab {args.vocab}, {args.experts} experts); "
          f"{psutil.cpu_count()} CPUs, load average {os.getloadavg()[0]:.1f} (shared machine)\n")
    print("| job | wall s | MB | MB/s | peak RSS GiB |\n|---|---:|---:|---:|---:|")
    for r in rows:
        mbs = f"{r['mb'] / r['wall_s']:.0f}" if r["mb"] else "-"
        extra = f" ({r['s_per_layer']:.1f} s/layer incl. embedding and head)" if "s_per_layer" in r else ""
        print(f"| {r['job']}{extra} | {r['wall_s']:.1f} | {r['mb']:.0f} | {mbs} | {r['peak_rss_gib']:.2f} |")
    if verify is not None:
        print(f"\nverify passed: {verify['passed']} (first failure: {verify['first_failure']})\n{verify['table']}")
        layer_s = [s for b, s in verify["block_seconds"].items() if b.startswith("layer")]
        print(f"verify seconds per block: {verify['block_seconds']}")
        checks.append((f"verify: {max(layer_s):.1f} s for the slowest layer (target <= 20 s)", max(layer_s) <= 20,
                       False))
        checks.append((f"verify: peak RSS {verify['peak_rss'] / GiB:.2f} GiB (target < 6 GiB)",
                       verify["peak_rss"] < 6 * GiB, False))
    if args.json:
        args.json.write_text(json.dumps({"rows": rows, "verify": verify, "checks": checks}, indent=1, default=str))
    print()
    for what, held, _ in checks:
        print(f"{'ok  ' if held else 'MISS'} {what}")
    if any(fatal and not held for _, held, fatal in checks):
        sys.exit("FAILED: an export's bytes differ from the reference")


if __name__ == "__main__":
    main()
