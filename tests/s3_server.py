"""A real S3-compatible server on loopback (moto's standalone server) for storage tests and
`benchmarks/bench_storage.py`."""

from __future__ import annotations

import contextlib
import os
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator

import pytest


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def moto_server(bucket: str) -> Iterator[dict]:
    """Run `moto.server` on 127.0.0.1 with `bucket` created; yield fsspec storage options."""
    port = _free_port()
    endpoint = f"http://127.0.0.1:{port}"
    env = {**os.environ, "AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing"}
    proc = subprocess.Popen(
        [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env,
    )
    deadline = time.time() + 30
    while True:
        try:
            urllib.request.urlopen(endpoint, timeout=1)
            break
        except OSError:
            if time.time() > deadline or proc.poll() is not None:
                proc.kill()
                raise RuntimeError(f"moto server did not start on {endpoint}") from None
            time.sleep(0.2)
    options = {
        "key": "testing-key-id", "secret": "testing-secret-value",
        "client_kwargs": {"endpoint_url": endpoint, "region_name": "us-east-1"},
    }
    try:  # the server stops even when the bucket cannot be created
        import boto3

        boto3.client(
            "s3", endpoint_url=endpoint, region_name="us-east-1",
            aws_access_key_id=options["key"], aws_secret_access_key=options["secret"],
        ).create_bucket(Bucket=bucket)
        yield options
    finally:
        proc.terminate()
        proc.wait(timeout=10)


@pytest.fixture(scope="session")
def s3_server() -> Iterator[dict]:
    """The test bucket `scope-test` on a loopback moto server; yields storage options."""
    pytest.importorskip("moto", reason="moto[server] is in the dev extra")
    pytest.importorskip("s3fs", reason="s3fs is in the dev extra")
    with moto_server("scope-test") as options:
        yield options


@pytest.fixture
def s3_bucket(s3_server: dict, request: pytest.FixtureRequest) -> tuple[str, dict]:
    """A fresh prefix in the test bucket and the storage options to reach it."""
    return f"s3://scope-test/{request.node.name}", s3_server
