"""Flow: verify a megatron / train checkpoint or an HF export against its original `hf-checkpoint`.

flows/verify.py -> tasks/verify.py -> gptoss_model/verify/parity.py, gptoss_model/verify/layers.py
Run locally:  python -m flows.verify megatron-checkpoint/NAME[@VERSION] [auto|whole-model|layer-wise]
"""
from __future__ import annotations

import sys

from prefect import flow

from tasks.verify import VerifyParams, verify_checkpoint


@flow(name="verify")
def verify_flow(params: VerifyParams):
    """Compare logits (whole model) or each layer's outputs (layer-wise) with transformers'; fail on a gap."""
    return verify_checkpoint(params)


if __name__ == "__main__":
    args = sys.argv[1:]
    if not args:
        sys.exit("usage: python -m flows.verify KIND/NAME[@VERSION] [auto|whole-model|layer-wise]")
    manifest = verify_flow(VerifyParams(candidate=args[0], mode=args[1] if len(args) > 1 else "auto"))
    print(manifest.spec)
