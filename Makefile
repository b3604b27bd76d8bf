# Two commands on a fresh machine (both create .venv with the pinned CPU env):
#   make demo   the demo pipeline end to end (local file store, ephemeral Prefect, CPU)
#   make test   the whole test suite
.PHONY: demo test venv
PY := .venv/bin/python

venv:
	@bash scripts/bootstrap.sh

demo: venv
	$(PY) -m flows.cli demo

test: venv
	$(PY) -m pytest -q -rs $(PYTEST_ARGS)
