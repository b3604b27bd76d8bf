"""What verifying a stage's file:// input against its manifest costs, at gpt-oss-20b width.

A stage reads its input version in place from a file:// store and checks every file's
sha256 against the manifest (tasks/store/local_verify.py). The commit stamps what it
hashed, so the usual read costs a stat per file; a read without a stamp (another
user's cache, a store copied by rsync) hashes everything once. This prints both beside
the conversion of the same checkpoint, in one run:

  commit        store.commit of the synthetic checkpoint (hard-linked, every byte hashed)
  read stamped  store.local_path right after the commit
  read cold     store.local_path with no stamp: full sha256 of every file (4 threads)
  tampered      one byte flipped in place: the read fails naming the file
  convert 1w    convert_hf_to_megatron(..., workers=1) of the same input

run:    .venv/bin/python benchmarks/verify_input.py [--layers 4] [--workdir DIR]
smoke:  .venv/bin/python benchmarks/verify_input.py --layers 1 --vocab 4096 --experts 4
"""
from __future__ import annotations

import argparse
import os
import shutil
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))


def timed(fn):
    t0 = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - t0


def main() -> None:
    from gptoss_model.settings import settings

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--vocab", type=int, default=201_088)
    ap.add_argument("--experts", type=int, default=32)
    ap.add_argument("--workdir", type=Path, default=settings().workdir / "gptoss-bench")
    ap.add_argument("--no-convert", action="store_true", help="skip the conversion row")
    args = ap.parse_args()

    import synthetic_gptoss as sg
    from tasks.store import ArtifactStore, IntegrityError, Producer

    work = args.workdir / f"verify-L{args.layers}-v{args.vocab}-e{args.experts}"
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    os.environ["GPTOSS_CACHE"] = str(work / "cache")
    src = sg.write_synthetic_checkpoint(work / "src", args.layers, vocab_size=args.vocab, num_experts=args.experts)
    (src / sg.COMPLETE_MARKER).unlink(missing_ok=True)
    store = ArtifactStore((work / "store").as_uri())
    (manifest, _), commit_s = timed(lambda: store.commit(src, kind="hf-checkpoint", name="bench/verify",
                                                         version="0123456789abcdef0123",
                                                         producer=Producer(stage="bench", code_version="1")))
    mb = manifest.total_bytes / 1e6
    rows = [("commit (hashes every byte)", commit_s, mb)]
    root, stamped_s = timed(lambda: store.local_path(manifest))
    rows.append(("read stamped (stat per file)", stamped_s, 0.0))
    shutil.rmtree(work / "cache")
    os.sync()
    _, cold_s = timed(lambda: store.local_path(manifest))
    rows.append(("read cold (sha256 of every file)", cold_s, mb))
    convert_s = None
    if not args.no_convert:
        from gptoss_model.convert.hf_to_megatron import convert_hf_to_megatron

        _, convert_s = timed(lambda: convert_hf_to_megatron(root, work / "megatron", dtype="bfloat16", workers=1))
        rows.append(("convert 1 worker (same input)", convert_s, mb))
    victim = max(manifest.files, key=lambda f: f.size)
    path = root / victim.path
    with open(path, "r+b") as f:
        f.seek(victim.size // 2)
        byte = f.read(1)
        f.seek(victim.size // 2)
        f.write(bytes([byte[0] ^ 0xFF]))
    try:
        store.local_path(manifest)
        caught = "NOT CAUGHT"
    except IntegrityError as exc:
        caught = str(exc)[:110]

    print(f"\n{args.layers} layers, {len(manifest.files)} files, {mb:.0f} MB, {os.cpu_count()} cores\n")
    print("| step | seconds | MB | MB/s |\n|---|---:|---:|---:|")
    for name, s, size in rows:
        print(f"| {name} | {s:.2f} | {size:.0f} | {size / s if size and s else 0:.0f} |")
    if convert_s:
        print(f"\ncold verify / conversion: {cold_s / convert_s:.2f}x; stamped read: {stamped_s * 1000:.1f} ms")
    print(f"tampered byte in {victim.path}: {caught}")
    shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":  # conversion workers re-import __main__
    main()
