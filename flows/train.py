"""Flow: train a recipe on a megatron-checkpoint + dataset; every checkpoint becomes a train-checkpoint.

flows/train.py -> tasks/train.py -> gptoss_model/training/ (torchrun on this host)

Cancelled, failed or crashed, the flow's hooks kill torchrun and every rank (tasks.train.stop_torchrun).
Run locally:  python -m flows.train RECIPE_OR_YAML NAME [megatron-checkpoint/...] [dataset/...]
"""
# No `from __future__ import annotations`: Prefect reads the parameter type from the signature,
# also where `serve()` ships the function to another process.
from tasks.train import TRAIN, TrainParams


@TRAIN.flow
def train_flow(params: TrainParams):
    """Launch torchrun, stream rank 0's log, commit each checkpoint; a retry resumes from the newest."""
    return TRAIN.task(params)


if __name__ == "__main__":
    from flows.stage_cli import run_flow_from_command_line

    run_flow_from_command_line(TRAIN, train_flow)
