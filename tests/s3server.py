"""A real S3 API for tests: moto in server mode on a free 127.0.0.1 port, and helpers to look into its bucket."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request


@contextlib.contextmanager
def moto_server():
    """A moto S3 server on a free 127.0.0.1 port with an empty bucket ``sweeps``; yields its endpoint (the ``s3`` fixture)."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    server = subprocess.Popen(
        [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
    )
    endpoint = f"http://127.0.0.1:{port}"
    deadline = time.time() + 60
    while True:
        try:
            urllib.request.urlopen(f"{endpoint}/moto-api/", timeout=2)
            break
        except OSError:
            assert server.poll() is None and time.time() < deadline, "moto server did not start"
            time.sleep(0.3)
    import boto3

    boto3.client("s3", endpoint_url=endpoint, aws_access_key_id="test", aws_secret_access_key="test", region_name="us-east-1").create_bucket(Bucket="sweeps")
    try:
        yield endpoint
    finally:
        os.killpg(server.pid, signal.SIGTERM)
        server.wait(timeout=30)


def bucket_uri(endpoint: str) -> str:
    # Credentials in the URI (pyarrow reads them there): the session's Ray workers started without AWS_* variables.
    return f"s3://test:test@sweeps/runs?endpoint_override={endpoint.removeprefix('http://')}&scheme=http"


def objects(endpoint: str, prefix: str) -> list[str]:
    import boto3

    client = boto3.client("s3", endpoint_url=endpoint, aws_access_key_id="test", aws_secret_access_key="test", region_name="us-east-1")
    pages = client.get_paginator("list_objects_v2").paginate(Bucket="sweeps", Prefix=prefix)
    return [item["Key"] for page in pages for item in page.get("Contents", [])]


def read_object(endpoint: str, key: str) -> bytes:
    import boto3

    client = boto3.client("s3", endpoint_url=endpoint, aws_access_key_id="test", aws_secret_access_key="test", region_name="us-east-1")
    return client.get_object(Bucket="sweeps", Key=key)["Body"].read()


def delete_object(endpoint: str, key: str) -> None:
    import boto3

    client = boto3.client("s3", endpoint_url=endpoint, aws_access_key_id="test", aws_secret_access_key="test", region_name="us-east-1")
    client.delete_object(Bucket="sweeps", Key=key)
