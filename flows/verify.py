"""Flow: check a checkpoint (megatron, train or HF export) against its original; commit a `verify-report`.

flows/verify.py -> tasks/verify.py -> gptoss_model/verify/

Deployable on a CPU work pool on its own, or called by the pipeline flow.
Run locally:  python -m flows.verify KIND/NAME[@VERSION] [auto|whole-model|layer-wise]
"""
# No `from __future__ import annotations`: Prefect reads the parameter type from the signature,
# also where `serve()` ships the function to another process.
from tasks.verify import VERIFY, VerifyParams


@VERIFY.flow
def verify_flow(params: VerifyParams):
    """Compare logits (whole model) or each layer's outputs (layer-wise) with transformers'; fail on a gap."""
    return VERIFY.task(params)


if __name__ == "__main__":
    from flows.stage_cli import run_flow_from_command_line

    run_flow_from_command_line(VERIFY, verify_flow)
