"""Joining a Ray cluster fast and clearly, before ``ray.init`` can hang or spill logs.

``ray.init(address=...)`` on an unreachable address retries for minutes while Ray's C++ core prints
retry lines, and on a cluster with token authentication that refuses the client's token it prints
log lines for ~20 s before a traceback. ``check_address`` answers both within seconds:

1. a TCP connect to ``host:port`` with a short timeout (an unreachable address: ``ClusterError``);
2. for a GCS address (not ``ray://``), one cluster-id request from a child process (Ray's client
   may abort the process, and prints its own log lines on stderr, which the child keeps to itself);
   a refused token (``AuthenticationError``) becomes a ``ClusterError`` saying what to set.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from dataclasses import dataclass

from cache_service.errors import HogwildError

PROBE_TIMEOUT_S = 5.0  # TCP connect, and the child's answer beyond its start-up
CHILD_TIMEOUT_S = 20.0  # the whole child process (importing Ray's core takes ~1 s)
NO_PROBE = ("auto", "local")

# Runs in a child process: one cluster-id request to the GCS, the outcome as one JSON line.
_GCS_PROBE = """
import json, os, sys
os.environ.setdefault("RAY_gcs_rpc_server_reconnect_timeout_s", "3")
from ray._raylet import GcsClient
from ray.exceptions import AuthenticationError
try:
    GcsClient(address=sys.argv[1]).cluster_id
    print(json.dumps({"ok": True}))
except AuthenticationError as err:
    print(json.dumps({"ok": False, "auth": True, "reason": str(err).split(". ")[0]}))
except Exception as err:
    print(json.dumps({"ok": False, "auth": False, "reason": f"{type(err).__name__}: {err}"[:300]}))
"""


class ClusterError(HogwildError):
    """A Ray session could not start or stopped because an actor failed."""


@dataclass(frozen=True)
class Address:
    """A cluster address as given: ``host:port`` (the GCS) or ``ray://host:port`` (Ray Client)."""

    text: str
    host: str
    port: int
    client: bool

    @classmethod
    def parse(cls, text: str, source: str) -> "Address | None":
        """None for addresses Ray resolves itself (``auto``, ``local``)."""
        if text in NO_PROBE:
            return None
        client = text.startswith("ray://")
        rest = text.removeprefix("ray://").rstrip("/")
        host, sep, port = rest.rpartition(":")
        if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
            raise ClusterError(f"the Ray address {text!r} (from {source}) is not host:port or ray://host:port; "
                               "give the head node's address, e.g. 10.0.0.1:6379")
        return cls(text, host.strip("[]"), int(port), client)


def check_address(text: str, source: str, timeout_s: float = PROBE_TIMEOUT_S) -> None:
    """Raise ``ClusterError`` (one line: what is wrong, what to set) unless ``text`` is a reachable
    Ray cluster that accepts this client; ``source`` names where the address came from."""
    address = Address.parse(text, source)
    if address is None:
        return
    reach(address, source, timeout_s)
    if not address.client:
        answer = probe_gcs(address, timeout_s)
        if answer.get("auth"):
            raise ClusterError(
                f"the Ray cluster at {text} (from {source}) refused this client: {answer['reason']}; it uses token "
                f"authentication: set RAY_AUTH_MODE=token and RAY_AUTH_TOKEN (or RAY_AUTH_TOKEN_PATH) to the "
                f"cluster's token (`ray get-auth-token` on the head node; RAY_AUTH_MODE is now "
                f"{os.environ.get('RAY_AUTH_MODE', 'unset')})")
        if not answer.get("ok"):
            raise ClusterError(f"the address {text} (from {source}) accepts connections but did not answer as a "
                               f"Ray cluster ({answer.get('reason', 'no answer')}); give the head node's GCS "
                               "address (port 6379 by default)")


def reach(address: Address, source: str, timeout_s: float) -> None:
    """A TCP connect to the address, bounded by ``timeout_s``."""
    try:
        with socket.create_connection((address.host, address.port), timeout=timeout_s):
            return
    except socket.timeout:
        why = f"no answer within {timeout_s:g}s"
    except OSError as err:
        why = err.strerror or type(err).__name__
    raise ClusterError(f"cannot reach the Ray cluster at {address.text} (from {source}): {why}; check the "
                       "address and that the head node is up (`ray status` there), or unset it to run on a "
                       "local Ray")


def probe_gcs(address: Address, timeout_s: float) -> dict:
    """The child's answer to one cluster-id request (``ok``, ``auth``, ``reason``)."""
    command = [sys.executable, "-c", _GCS_PROBE, f"{address.host}:{address.port}"]
    try:
        done = subprocess.run(command, capture_output=True, text=True, timeout=CHILD_TIMEOUT_S + timeout_s)
    except subprocess.TimeoutExpired:
        return {"ok": False, "auth": False, "reason": f"no answer within {CHILD_TIMEOUT_S + timeout_s:g}s"}
    for line in reversed(done.stdout.splitlines()):
        try:
            return json.loads(line)
        except json.JSONDecodeError:
            continue
    tail = [line for line in done.stderr.splitlines() if line.strip()][-1:] or [f"exit status {done.returncode}"]
    return {"ok": False, "auth": False, "reason": tail[0][-300:]}
