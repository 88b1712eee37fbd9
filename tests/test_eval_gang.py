"""Evaluation hosts as gangs on Ray: one gang host of 2 worker actors runs the problems (a
session's workers spread over the gang) and gives the same answers as the host in this process."""

from __future__ import annotations

import json

import pytest

from cache_service.errors import ConfigError
from cluster.evaluation.hosts import make_executor
from cluster.evaluation.methods import EvalSettings
from cluster.evaluation.run import evaluate, plan
from tests.test_eval import save_tiny_model

ray = pytest.importorskip("ray")
pytestmark = pytest.mark.ray


@pytest.fixture(scope="module")
def local_ray():
    ray.init(address="local", num_cpus=4, include_dashboard=False, log_to_driver=False, logging_level="ERROR")
    yield
    ray.shutdown()


def answers(out) -> dict:
    records = [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]
    assert all(r["error"] is None for r in records), records
    return {(r["id"], r["method"]): {b: v["answer"] for b, v in r["budgets"].items()} for r in records}


def test_a_gang_host_gives_the_answers_of_the_local_host(local_ray, tmp_path, capsys):
    settings = EvalSettings(budgets=(4, 8), model=str(save_tiny_model(tmp_path / "model")), max_step_tokens=6,
                            check_every=5, kv_tokens=16384)
    runs = {}
    for name, gang in (("local", 0), ("gang", 2)):
        checked = plan("builtin:2", ["hogwild", "single", "independent"], [2], settings, tmp_path / name)
        evaluate(checked, concurrency=3, gang=gang)
        runs[name] = answers(tmp_path / name)
    assert "1 Ray gang host(s) of 2 worker actor(s)" in capsys.readouterr().err
    assert len(runs["gang"]) == 6 and runs["gang"] == runs["local"]


def test_a_negative_gang_is_refused():
    with pytest.raises(ConfigError, match="--gang must be >= 0"):
        make_executor(EvalSettings(), 4, gang=-1)
