"""A stage writer run as a separate process by the crash and race tests.

usage: python writer.py STORE_URL MODE START_AT
  MODE=hang-before-manifest  upload the data, print READY, then hang where the
                             manifest would be written (the test kill -9s us)
  MODE=race                  wait until START_AT (unix time), then run the stage
                             with a slow build; print the resulting manifest
  MODE=hang-mid-upload       (S3) upload in 1 MiB parts, print READY after the
                             first part of the big file, then hang mid-upload
  MODE=hang-mid-commit       deterministic files (RESUME_FILES), one at a time;
                             print READY and hang when the 4th file's upload starts
  MODE=resume                the same stage again; the RESULT line adds the data
                             bytes this process sent
"""
import json
import os
import sys
import time
from pathlib import Path

from tasks.store import ArtifactStore, run_stage
from tasks.store.manifest import MANIFEST_FILE

PARAMS = {"size": 3_000_000, "label": "crash-and-race"}
# a multipart file (tagged with its sha256) first, then single-put files (sha256 in metadata)
RESUME_FILES = {"a-big.bin": 20 << 20, "b.bin": 2 << 20, "c.bin": 2 << 20, "d.bin": 2 << 20, "e.bin": 2 << 20}


def build(out: Path) -> dict:
    (out / "weights").mkdir()
    # Content depends on the writer so that a mix of two writers' files would
    # not verify against either manifest.
    payload = (f"pid={os.getpid()};" * 200_000).encode()[: PARAMS["size"]]
    (out / "weights" / "shard-0.bin").write_bytes(payload)
    (out / "config.json").write_text(json.dumps({"writer": os.getpid()}))
    if MODE == "race":
        time.sleep(1.5)
    return {"writer_pid": os.getpid()}


def build_deterministic(out: Path) -> dict:
    import random

    for i, (name, size) in enumerate(RESUME_FILES.items()):
        (out / name).write_bytes(random.Random(i).randbytes(size))
    return {}


def count_data_bytes(client) -> list[int]:
    sent = [0]
    for method in ("put_object", "upload_part"):
        original_method = getattr(client, method)

        def counted(_original=original_method, **kw):
            if not kw["Key"].endswith((MANIFEST_FILE, ".claim.json")) and "/refs/" not in kw["Key"]:
                sent[0] += len(kw["Body"])
            return _original(**kw)

        setattr(client, method, counted)
    return sent


if __name__ == "__main__":
    url, MODE, start_at = sys.argv[1], sys.argv[2], float(sys.argv[3])
    store = ArtifactStore(url)
    if MODE == "hang-before-manifest":
        original = store.backend.put_bytes

        def put_bytes(key, data, **kw):
            if key.endswith("/" + MANIFEST_FILE):
                print("READY", flush=True)
                time.sleep(3600)
            return original(key, data, **kw)

        store.backend.put_bytes = put_bytes
    if MODE == "hang-mid-upload":
        from tasks.store.s3 import S3Backend

        S3Backend.MULTIPART_THRESHOLD = S3Backend.MIN_PART = 1 << 20
        client = store.backend.client
        original_part = client.upload_part

        def upload_part(**kw):
            if kw["PartNumber"] > 1:
                print("READY", flush=True)
                time.sleep(3600)
            return original_part(**kw)

        client.upload_part = upload_part
    sent, params, stage_build = [0], PARAMS, build
    if MODE in ("hang-mid-commit", "resume"):
        params, stage_build = {"label": "resume"}, build_deterministic
        store.max_workers = 1  # files in order: the crash point is deterministic
        sent = count_data_bytes(store.backend.client)
    if MODE == "hang-mid-commit":
        original_upload, started = store.backend.upload_file, []

        def upload_file(src, key, progress):
            started.append(key)
            if len(started) == 4:
                print("READY", flush=True)
                time.sleep(3600)
            return original_upload(src, key, progress)

        store.backend.upload_file = upload_file
    while time.time() < start_at:
        time.sleep(0.005)
    result = run_stage(store, stage="writer-test", code_version="1", kind="blob", name="demo/crash",
                       params=params, build=stage_build, poll_interval=0.2)
    print("RESULT " + json.dumps({"cache_hit": result.cache_hit, "manifest": result.manifest.model_dump(),
                                  "data_bytes_sent": sent[0]}), flush=True)
