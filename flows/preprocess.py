"""Flow: tokenise JSONL corpora into a `dataset` artifact with an hf-checkpoint's tokenizer.

flows/preprocess.py -> tasks/preprocess.py -> gptoss_model/data/

Deployable on a CPU work pool on its own, or called by the pipeline flow.
Run locally:  python -m flows.preprocess hf-checkpoint/NAME[@VERSION] DATASET_NAME INPUT [INPUT ...]
(or `gptoss preprocess ...`, the same options with a documents/tokens progress bar).
"""
# No `from __future__ import annotations`: Prefect reads the parameter type from the signature,
# also where `serve()` ships the function to another process.
from tasks.preprocess import PREPROCESS, PreprocessParams


@PREPROCESS.flow
def preprocess_flow(params: PreprocessParams):
    """Tokenise the corpus with the checkpoint's tokenizer and commit the dataset (skipped when committed)."""
    return PREPROCESS.task(params)


if __name__ == "__main__":  # also required: tokenising workers are spawned and re-import __main__
    from flows.stage_cli import run_flow_from_command_line

    run_flow_from_command_line(PREPROCESS, preprocess_flow)
