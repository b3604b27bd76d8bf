"""Gradient/logit parity under TP/PP/EP(+SP) with 2 CPU processes (torchrun, gloo), in ONE launch.

See dist_worker.py for what each layout runs. The `*_unfixed` controls are
megatron-core 0.16.1's two wrong-gradient layouts with our repair disabled:
they must be far off, which shows the comparison catches them and that
`build.fix_expert_grad_tags` is what makes the fixed runs exact.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.torchrun import run_torchrun

from .conftest import GRAD_TOL, LOGIT_TOL

WORKER = Path(__file__).with_name("dist_worker.py")
FIXED = ["ep2", "ep2_allgather", "pp2", "tp2_sp_ep2", "tp2_sp_ep1"]
CONTROLS = ["tp2_sp_ep2_unfixed", "tp2_sp_ep1_unfixed"]


@pytest.fixture(scope="module")
def results(tiny_ckpt, tmp_path_factory):
    out = tmp_path_factory.mktemp("dist") / "results.json"
    data = run_torchrun(WORKER, tiny_ckpt, result=out)
    for name, r in data.items():
        print(f"\n{name}: {r}")
    return data


@pytest.mark.distributed
@pytest.mark.parametrize("layout", FIXED)
def test_layout_matches_reference(results, layout):
    r = results[layout]
    assert r["max_abs_logit_diff"] < LOGIT_TOL, r
    assert r["max_grad_rel_diff"] < GRAD_TOL, r


@pytest.mark.distributed
@pytest.mark.parametrize("layout", CONTROLS)
def test_unrepaired_megatron_layouts_give_wrong_gradients(results, layout):
    r = results[layout]
    assert r["max_abs_logit_diff"] < LOGIT_TOL, r  # forward is fine: only training is wrong
    assert r["max_grad_rel_diff"] > 1e-2, r


@pytest.mark.distributed
def test_seed_snippet_load_hf_to_megatron(results):
    r = results["seed_snippet"]
    assert r["chunks"] == 1 and r["max_abs_logit_diff"] < LOGIT_TOL, r
