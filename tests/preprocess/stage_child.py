"""One preprocess run as its own process (the crash test kill -9s it).

    python tests/preprocess/stage_child.py STORE_URL TOKENIZER_SPEC CORPUS WORKDIR [WORKERS]

Prints the committed manifest's metrics as one JSON line.
"""
from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))


def main(store_url: str, tokenizer: str, corpus: str, workdir: str, workers: str = "1") -> None:
    import gptoss_model.data.pretrain as pretrain
    from tasks.common import StoreSettings
    from tasks.preprocess import PreprocessParams, run_preprocess

    delay = float(os.environ.get("GPTOSS_PREPROCESS_SLOW_UNITS", "0"))
    if delay:  # test hook: each unit takes at least `delay` seconds, so a kill lands mid-stage
        original = pretrain.tokenize_unit

        def slow(job, progress=None):
            result = original(job, progress)
            if not result["resumed"]:
                time.sleep(delay)
            return result

        pretrain.tokenize_unit = slow
    params = PreprocessParams(tokenizer=tokenizer, name="big", inputs=[corpus], unit_mb=1, shard_tokens=300_000,
                              workdir=workdir, workers=int(workers), store=StoreSettings(url=store_url))
    print(json.dumps(run_preprocess(params).manifest.metrics))


if __name__ == "__main__":
    main(*sys.argv[1:])
