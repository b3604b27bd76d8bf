"""Flow: tokenise JSONL corpora into a `dataset` artifact (megatron indexed shards, or packed SFT).

flows/preprocess.py -> tasks/preprocess.py -> gptoss_model/data/

Run locally:  python -m flows.preprocess TOKENIZER_SPEC NAME INPUT [INPUT ...]
(or `gptoss preprocess ...`, which has every option and a progress bar).
"""
from __future__ import annotations

import sys

from prefect import flow

from tasks.preprocess import PreprocessParams, preprocess_dataset


@flow(name="preprocess")
def preprocess_flow(params: PreprocessParams):
    """Tokenise the corpus with the checkpoint's tokenizer and commit the dataset (skipped when committed)."""
    return preprocess_dataset(params)


if __name__ == "__main__":  # also required: tokenising workers are spawned and re-import __main__
    if len(sys.argv) < 4:
        sys.exit("usage: python -m flows.preprocess hf-checkpoint/NAME[@VERSION] DATASET_NAME INPUT [INPUT ...]")
    manifest = preprocess_flow(PreprocessParams(tokenizer=sys.argv[1], name=sys.argv[2], inputs=sys.argv[3:]))
    print(manifest.spec)
