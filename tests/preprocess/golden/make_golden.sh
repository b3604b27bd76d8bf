#!/usr/bin/env bash
# Regenerates the golden .bin/.idx fixtures with Megatron-LM's own tool.
# Usage: MEGATRON_LM=/path/to/Megatron-LM@core_v0.16.1 PYTHON=python-with-megatron-deps \
#        bash tests/preprocess/golden/make_golden.sh
# (Megatron-LM's megatron.training needs `triton` and `six` besides megatron-core's deps.)
# The fixtures committed here were made at tag core_v0.16.1 with this exact script.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
repo=$(cd "$here/../../.." && pwd)
: "${MEGATRON_LM:?set MEGATRON_LM to a Megatron-LM checkout at tag core_v0.16.1}"
PY=${PYTHON:-python}
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
(cd "$repo" && "$PY" -c "from pathlib import Path; from tests.preprocess.fixtures import make_int32_tokenizer; make_int32_tokenizer(Path('$tmp/tokenizer_i32'))")
for tok in u16 i32; do
  dir="$here/tokenizer_u16"; [ "$tok" = i32 ] && dir="$tmp/tokenizer_i32"
  for eod in eod noeod; do
    flag=(); [ "$eod" = eod ] && flag=(--append-eod)
    (cd "$MEGATRON_LM" && "$PY" tools/preprocess_data.py --input "$here/corpus.jsonl" \
      --output-prefix "$here/${tok}_${eod}" --tokenizer-type HuggingFaceTokenizer \
      --tokenizer-model "$dir" --workers 2 "${flag[@]}")
  done
done
