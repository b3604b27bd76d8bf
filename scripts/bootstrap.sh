#!/usr/bin/env bash
# Creates .venv with the pinned CPU environment. Idempotent: reinstalls only
# when pyproject.toml or the constraints change.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3.11}
command -v "$PY" >/dev/null || PY=python3
constraints=constraints/${GPTOSS_ENV:-cpu}.txt
stamp=.venv/.installed-$(cat pyproject.toml "$constraints" | sha256sum | cut -c1-16)
[ -f "$stamp" ] && exit 0
[ -x .venv/bin/python ] || "$PY" -m venv .venv
# The CPU torch wheel lies in /opt/wheels on our machines; elsewhere pip takes it from the index.
links=(); [ -d /opt/wheels ] && links=(--find-links /opt/wheels)
.venv/bin/python -m pip install -q --upgrade pip
.venv/bin/python -m pip install "${links[@]}" -c "$constraints" "$(grep '^torch==' "$constraints")"
.venv/bin/python -m pip install "${links[@]}" -c "$constraints" -e ".[dev]"
rm -f .venv/.installed-*
touch "$stamp"
