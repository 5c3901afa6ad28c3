"""A real S3-compatible server for the tests: moto's standalone server in its own process on 127.0.0.1, reached
through the real client stack (fsspec -> s3fs -> aiobotocore) configured the way users configure a custom
endpoint (AWS_ENDPOINT_URL and the usual AWS_* variables). Nothing else is contacted: the instance metadata
service is disabled and the shared credential files point nowhere."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time

BUCKET = "my-bucket"  # the bucket name the README's examples use


def free_port() -> int:
    """A free TCP port on 127.0.0.1."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class MotoServer:
    """`python -m moto.server` on 127.0.0.1; `env` configures a client for it; `kill()` drops it at once.

    auth=True makes the server check signatures against known keys (moto's INITIAL_NO_AUTH_ACTION_COUNT=0),
    so any key it never issued is refused with 403: the access-denied case.
    """

    def __init__(self, auth: bool = False):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        env = dict(os.environ, INITIAL_NO_AUTH_ACTION_COUNT="0") if auth else dict(os.environ)
        self.process = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(self.port)],
                                        env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 60
        while True:
            try:
                socket.create_connection(("127.0.0.1", self.port), 0.2).close()
                break
            except OSError:
                if time.monotonic() > deadline or self.process.poll() is not None:
                    self.kill()
                    raise RuntimeError("moto server did not start") from None
                time.sleep(0.05)

    @property
    def env(self) -> dict[str, str]:
        """Environment variables of a client that uses this server (and nothing else)."""
        return {"AWS_ENDPOINT_URL": self.url, "AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
                "AWS_DEFAULT_REGION": "us-east-1", "AWS_EC2_METADATA_DISABLED": "true",
                "AWS_SHARED_CREDENTIALS_FILE": os.devnull, "AWS_CONFIG_FILE": os.devnull,
                "AWS_MAX_ATTEMPTS": "2"}

    def client(self):
        """A boto3 client of this server (for the tests' own setup and checks)."""
        import boto3

        return boto3.client("s3", endpoint_url=self.url, aws_access_key_id="testing", aws_secret_access_key="testing",
                            region_name="us-east-1")

    def keys(self, bucket: str, prefix: str = "") -> list[str]:
        """Every key under a prefix, sorted."""
        pages = self.client().get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix)
        return sorted(o["Key"] for page in pages for o in page.get("Contents", []))

    def get(self, bucket: str, key: str) -> bytes:
        """One object's bytes."""
        return self.client().get_object(Bucket=bucket, Key=key)["Body"].read()

    def kill(self) -> None:
        """Stop the server at once (SIGKILL): open connections drop."""
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGKILL)
            self.process.wait(timeout=30)

    def __enter__(self) -> MotoServer:
        return self

    def __exit__(self, *exc) -> None:
        self.kill()


def one_error_line(done: subprocess.CompletedProcess) -> str:
    """The single red line of a failed command (and no traceback)."""
    assert done.returncode == 1, (done.stdout, done.stderr)
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and "Traceback" not in done.stderr, done.stderr
    return lines[0]
