"""Fixtures of the integration tests that share a server: the S3 tests' SeaweedFS."""

from __future__ import annotations

import uuid

import pytest
from harness.s3 import seaweed_server


@pytest.fixture(scope="session")
def s3_server():
    """One SeaweedFS per pytest process (each xdist worker has its own), started by the first
    test that asks for it (it takes seconds) and stopped, by the pid of the process group it
    started, when the session ends. Tests share it through buckets of their own (s3_bucket);
    a test that kills its server or needs TLS starts a SeaweedS3 of its own."""
    yield from seaweed_server()


@pytest.fixture
def s3_bucket(s3_server):
    """A bucket of this test's own on the shared server; afterwards its objects and multipart
    uploads are removed with it, so the next test finds the server as the first one did."""
    assert s3_server.running(), f"the shared SeaweedFS is gone:\n{s3_server.log_tail()}"
    name = s3_server.create_bucket(f"pgops-{uuid.uuid4().hex[:16]}")
    yield name
    s3_server.remove_bucket(name)
