"""Flow: train a recipe on a megatron-checkpoint + dataset; every checkpoint becomes a train-checkpoint.

flows/train.py -> tasks/train.py -> gptoss_model/training/ (torchrun on this host)
Run locally:  python -m flows.train RECIPE_OR_YAML NAME [megatron-checkpoint/...] [dataset/...]
"""
import sys

# No `from __future__ import annotations` here: `train_flow.serve()` ships the flow to its run
# process by value (cloudpickle), and a string annotation "TrainParams" cannot be resolved
# there ("Train_FlowModel is not fully defined"); the class object travels with the function.

from prefect import flow

from gptoss_model.training.launch import kill_from_pid_file
from tasks.train import TrainParams, pid_file, train_model


def stop_torchrun(flow, flow_run, state):  # noqa: ARG001 - Prefect hook signature
    """Cancelled or failed: no torchrun or rank may outlive the run (killed by process group)."""
    kill_from_pid_file(pid_file(TrainParams.model_validate(flow_run.parameters["params"])))


@flow(name="train", on_cancellation=[stop_torchrun], on_failure=[stop_torchrun], on_crashed=[stop_torchrun])
def train_flow(params: TrainParams):
    """Launch torchrun, stream rank 0's log, commit each checkpoint; a retry resumes from the newest."""
    return train_model(params)


if __name__ == "__main__":
    a = sys.argv[1:] + [None, None]
    print(train_flow(TrainParams(recipe=a[0], name=a[1], base_checkpoint=a[2], dataset=a[3])).spec)
