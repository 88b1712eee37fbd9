"""Joining a cluster fails fast and clearly: an unreachable address and a refused token each end in
one ``hogwild: error:`` line within 15 s (through the real CLI), not minutes of Ray's retry logs."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import time
import uuid

import pytest

from cluster.ray_connect import ClusterError, check_address
from tests.test_cli import assert_one_line_error

LIMIT_S = 15.0
RUN = ["run", "2+2?", "--actors", "2", "--max-steps", "2", "--json"]


def closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def timed(*args: str, env: dict) -> tuple[subprocess.CompletedProcess, float]:
    """The ``hogwild`` command with ``env``; its outcome and wall time."""
    command = [shutil.which("hogwild")] if shutil.which("hogwild") else [sys.executable, "-m", "deploy.cli"]
    start = time.monotonic()
    done = subprocess.run(command + list(args), capture_output=True, text=True, timeout=120, env=env)
    return done, time.monotonic() - start


def clean_env(**extra: str) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
    return {**env, **extra}


# ---- unreachable -----------------------------------------------------------------------------
def test_an_unreachable_ray_address_is_one_line_within_seconds():
    done, took = timed(*RUN, "--ray-address", f"127.0.0.1:{closed_port()}", env=clean_env())
    assert_one_line_error(done.returncode, done.stderr, "cannot reach the Ray cluster")
    assert "--ray-address" in done.stderr and took < LIMIT_S, (took, done.stderr)


def test_an_unreachable_RAY_ADDRESS_is_one_line_within_seconds():
    done, took = timed(*RUN, env=clean_env(RAY_ADDRESS=f"127.0.0.1:{closed_port()}"))
    assert_one_line_error(done.returncode, done.stderr, "cannot reach the Ray cluster")
    assert "RAY_ADDRESS" in done.stderr and took < LIMIT_S, (took, done.stderr)


@pytest.mark.parametrize("address", ["no-port", "host:http", "ray://:10001", "10.0.0.1:70000"])
def test_a_malformed_address_says_what_form_is_wanted(address):
    with pytest.raises(ClusterError, match="is not host:port"):
        check_address(address, "--ray-address")


def test_a_port_that_is_no_ray_cluster_is_refused_within_seconds():
    with socket.socket() as server:  # accepts connections, speaks no gRPC
        server.bind(("127.0.0.1", 0))
        server.listen()
        start = time.monotonic()
        with pytest.raises(ClusterError, match="did not answer as a Ray cluster"):
            check_address(f"127.0.0.1:{server.getsockname()[1]}", "--ray-address")
        assert time.monotonic() - start < LIMIT_S + 10


# ---- token authentication --------------------------------------------------------------------
HEAD = """
import sys, ray
context = ray.init(num_cpus=1, include_dashboard=False, log_to_driver=False)
print(context.address_info["gcs_address"], flush=True)
sys.stdin.read()
ray.shutdown()
"""


@pytest.fixture(scope="module")
def token_cluster():
    """A local Ray that requires token ``RAY_AUTH_TOKEN`` (in a child process: token settings are
    read once per process); yields (gcs address, token)."""
    token = uuid.uuid4().hex * 2
    env = clean_env(RAY_AUTH_MODE="token", RAY_AUTH_TOKEN=token)
    head = subprocess.Popen([sys.executable, "-c", HEAD], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                            stderr=subprocess.DEVNULL, text=True, env=env)
    try:
        address = head.stdout.readline().strip()
        if not address:
            pytest.fail("the token-authenticated Ray head did not start")
        yield address, token
    finally:
        head.stdin.close()
        try:
            head.wait(timeout=60)
        except subprocess.TimeoutExpired:
            head.kill()
            head.wait()


@pytest.mark.ray
@pytest.mark.parametrize("client", [{"RAY_AUTH_MODE": "disabled"}, {"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": "0" * 64}],
                         ids=["no-token", "wrong-token"])
def test_a_refused_token_is_one_line_within_seconds(token_cluster, client):
    address, _ = token_cluster
    done, took = timed(*RUN, "--ray-address", address, env=clean_env(**client))
    assert_one_line_error(done.returncode, done.stderr, "refused this client")
    assert "RAY_AUTH_TOKEN" in done.stderr and took < LIMIT_S, (took, done.stderr)


@pytest.mark.ray
def test_the_right_token_passes_the_check(token_cluster, monkeypatch):
    """The probe runs in a child process that inherits the environment: with the token it passes."""
    address, token = token_cluster
    monkeypatch.setenv("RAY_AUTH_MODE", "token")
    monkeypatch.setenv("RAY_AUTH_TOKEN", token)
    check_address(address, "--ray-address")
    monkeypatch.setenv("RAY_AUTH_TOKEN", "1" * 64)
    with pytest.raises(ClusterError, match="RAY_AUTH_MODE=token and RAY_AUTH_TOKEN"):
        check_address(address, "--ray-address")
