"""End to end: ``hogwild eval`` submitted as a Ray job to a local Ray (job submission API), waited
for, its results, log and report checked; a tiny random model saved to disk, loaded by path in the
job's session-host actor."""

from __future__ import annotations

import json
import time

import pytest

from tests.test_eval import ROOT, save_tiny_model

ray = pytest.importorskip("ray")
pytestmark = pytest.mark.ray
JOB_TIMEOUT_S = 75


@pytest.fixture(scope="module")
def local_ray():
    context = ray.init(num_cpus=2, include_dashboard=True, dashboard_port=None, log_to_driver=False)
    try:
        yield f"http://{context.dashboard_url}"
    finally:
        ray.shutdown()


def test_eval_as_a_ray_job(local_ray, tmp_path):
    from ray.job_submission import JobStatus, JobSubmissionClient

    model = save_tiny_model(tmp_path / "model")
    out = tmp_path / "out"
    client = JobSubmissionClient(local_ray)
    entrypoint = (f"python -m deploy.cli eval builtin:3 --methods hogwild single independent --workers 2 "
                  f"--budgets 4 8 --model {model} --max-step-tokens 6 --check-every 5 --kv-tokens 16384 "
                  f"--concurrency 4 --out {out}")
    job = client.submit_job(entrypoint=entrypoint,
                            runtime_env={"working_dir": str(ROOT), "excludes": [".git", "*.egg-info"]})
    deadline = time.monotonic() + JOB_TIMEOUT_S
    while (status := client.get_job_status(job)) not in {JobStatus.SUCCEEDED, JobStatus.FAILED, JobStatus.STOPPED}:
        if time.monotonic() > deadline:
            client.stop_job(job)
            pytest.fail(f"the job did not finish in {JOB_TIMEOUT_S} s; log:\n{client.get_job_logs(job)}")
        time.sleep(0.5)
    logs = client.get_job_logs(job)
    assert status == JobStatus.SUCCEEDED, logs
    records = [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]
    assert sorted((r["id"], r["method"]) for r in records) == sorted(
        (f"builtin-0-{i:04d}", m) for i in range(3) for m in ("hogwild-2", "single", "independent-2"))
    assert all(r["error"] is None and set(r["budgets"]) == {"4", "8"} for r in records)
    assert "on 1 Ray session host actor(s)" in logs  # the job spread its problems over host actors
    assert logs.count("ETA") == 9  # a progress line per result in the job's log
    assert "# Evaluation report" in logs  # the job prints its report
    report = (out / "report.md").read_text()
    assert "| hogwild-2 | 8 |" in report and "| independent-2 | 4 |" in report
    assert (out / "accuracy.png").read_bytes()[:4] == b"\x89PNG"
