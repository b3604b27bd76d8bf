"""Fixtures the whole suite shares: a moto S3 server, a private PREFECT_HOME and
one Prefect test harness per session. Environment is set before anything
imports Prefect, so no test touches ~/.prefect or the network."""
from __future__ import annotations

import atexit
import os
import shutil
import tempfile
import uuid

_PREFECT_HOME = tempfile.mkdtemp(prefix="gptoss-prefect-home-")
atexit.register(shutil.rmtree, _PREFECT_HOME, ignore_errors=True)
os.environ["PREFECT_HOME"] = _PREFECT_HOME
os.environ["PREFECT_SERVER_ANALYTICS_ENABLED"] = "false"
os.environ.setdefault("PREFECT_LOGGING_LEVEL", "INFO")
os.environ.setdefault("DO_NOT_TRACK", "1")
# Fake credentials for moto: boto3 must never find real ones in a test.
for _k, _v in {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing-secret",
               "AWS_DEFAULT_REGION": "us-east-1"}.items():
    os.environ[_k] = _v
os.environ.pop("AWS_PROFILE", None)

import pytest  # noqa: E402


@pytest.fixture(scope="session")
def s3_endpoint():
    """A real S3 HTTP endpoint (moto) on 127.0.0.1, port chosen by the OS."""
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    endpoint = f"http://{host}:{port}"
    os.environ["GPTOSS_S3_ENDPOINT_URL"] = endpoint
    yield endpoint
    server.stop()


@pytest.fixture
def s3_bucket(s3_endpoint):
    import boto3

    name = f"test-{uuid.uuid4().hex[:12]}"
    boto3.client("s3", endpoint_url=s3_endpoint).create_bucket(Bucket=name)
    return name


@pytest.fixture(params=["file", "s3"])
def store_url(request, tmp_path):
    """The same store tests run against a local directory and moto S3 over HTTP."""
    if request.param == "file":
        return (tmp_path / "store").as_uri()
    bucket = request.getfixturevalue("s3_bucket")
    return f"s3://{bucket}/artifacts"


@pytest.fixture
def store(store_url):
    from tasks.store import ArtifactStore

    return ArtifactStore(store_url)


@pytest.fixture(scope="session")
def prefect_harness():
    """One Prefect test server for the whole session (it takes 12-15 s to start)."""
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=120):
        yield
