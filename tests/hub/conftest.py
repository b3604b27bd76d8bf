"""Fixtures for the Hub download tests: a fresh local Hub per test."""

import pytest

from tests.hub_server import HubServer


@pytest.fixture(autouse=True)
def _clean_hf_env(monkeypatch):
    # A token or endpoint from the developer's shell must not leak into tests.
    for var in ("HF_TOKEN", "HF_ENDPOINT", "HF_HUB_OFFLINE", "HF_HUB_DISABLE_IMPLICIT_TOKEN"):
        monkeypatch.delenv(var, raising=False)


@pytest.fixture
def hub():
    with HubServer() as server:
        yield server


@pytest.fixture
def payload():
    """Deterministic pseudo-random bytes (fast: no os.urandom for MBs)."""
    def make(n: int, seed: int = 0) -> bytes:
        import random
        return random.Random(seed).randbytes(n)
    return make
