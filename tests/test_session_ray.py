"""The session API and the CLI on Ray worker actors give what the in-process engine gives."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import ray

from cluster.protocol import ProtocolConfig
from cluster.gang import RayRunner
from cluster.session import Session, SessionConfig
from workers.sampling import SamplingParams

pytestmark = [pytest.mark.slow, pytest.mark.ray]

PROBLEM = "Tom has 7 marbles and buys 5 more. How many marbles does he have?"


@pytest.fixture(scope="module")
def ray_cluster():
    ray.init(num_cpus=4, include_dashboard=False, log_to_driver=False)
    yield
    ray.shutdown()


def test_session_on_two_actors_matches_the_local_engine(default_lm, ray_cluster):
    config = SessionConfig(
        protocol=ProtocolConfig(workers=2, max_steps=24, check_every=8),
        sampling=SamplingParams(temperature=0.6, top_p=0.95, seed=3),
    )
    local = Session(PROBLEM, config, lm=default_lm).result()
    remote = Session(PROBLEM, config, lm=default_lm, runner=RayRunner(2)).result()
    assert all(w.tokens > 0 for w in local.workers)
    assert [(w.name, w.text, w.tokens, w.checks) for w in remote.workers] == [
        (w.name, w.text, w.tokens, w.checks) for w in local.workers
    ]
    assert (remote.answer, remote.steps) == (local.answer, local.steps)


def test_cli_runs_on_actors():
    command = [sys.executable, "-m", "cluster.cli", "run", PROBLEM, "--workers", "2", "--actors", "2",
               "--model", "default", "--max-steps", "12", "--json"]
    done = subprocess.run(command, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert [w["name"] for w in result["workers"]] == ["Alice", "Bob"]
    assert all(w["tokens"] > 0 for w in result["workers"])
    assert result["steps"] == 12
