#!/usr/bin/env bash
# The CUDA checks (tests/gpu) on a GPU machine whose python3 already has torch with CUDA
# and transformers. What it lacks of ours (megatron-core, orjson) comes from wheels in
# .whl/ when that folder holds any (a machine without a package index; fetch them
# elsewhere with `pip download --no-deps --only-binary=:all: --python-version 3.12
# megatron-core==0.16.1 orjson -d .whl`), else from the index.
# usage: bash scripts/gpu_check.sh [pytest args]; prints what each check measured.
set -euo pipefail
cd "$(dirname "$0")/.."
site=$(mktemp -d /tmp/gptoss-site-XXXX)
if compgen -G ".whl/*.whl" > /dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --target "$site" .whl/*.whl
else
  python3 -m pip install -q --target "$site" megatron-core==0.16.1 orjson
fi
export PYTHONPATH="$site:$PWD" PYTHONUNBUFFERED=1
python3 -c "import torch, megatron.core; assert torch.cuda.is_available(), 'no CUDA device'; \
print('torch', torch.__version__, torch.cuda.get_device_name(0), '| megatron-core', megatron.core.__version__)"
python3 -m pytest -q -s -p no:cacheprovider -o addopts="" tests/gpu "$@"
