"""Many sessions on a long-lived gang of 2 worker actors: the same tokens as the single-process host,
alone or batched, instant and lagged; cancellation; the gang is started once."""

from __future__ import annotations

import pytest
import ray
import torch

from cache_service.kv_store import PoolConfig
from cluster.events import Finished, Tick
from cluster.gang import GangHost
from cluster.host import SessionCancelled, SessionHost
from cluster.ray_session import RayConfig
from tests.test_host import GREEDY, PROBLEMS, TINY, _others, program, texts
from workers.actor import EngineSpec, ModelSpec
from workers.engine import HogwildEngine
from workers.model import load_model
from workers.sampling import SamplingParams

pytestmark = pytest.mark.ray

POOL = PoolConfig(tokens=1 << 15)


@pytest.fixture(scope="module")
def tiny():
    return load_model(TINY, dtype=torch.float32, device="cpu")


@pytest.fixture(scope="module")
def gang():
    ray.init(address="local", num_cpus=4, include_dashboard=False, log_to_driver=False, logging_level="ERROR")
    host = GangHost(RayConfig((1, 1)), EngineSpec(ModelSpec(TINY, dtype="float32", seed=0), pool=POOL))
    yield host
    host.close()
    ray.shutdown()


def local(tiny, prog, sampling=GREEDY, mode="instant") -> list:
    return texts(SessionHost(HogwildEngine(tiny, pool=POOL)).submit(prog, sampling, mode).events())


@pytest.mark.parametrize("mode", ["instant", "lagged"])
def test_a_session_on_the_gang_equals_the_single_process_host(tiny, gang, mode):
    target = program(tiny, PROBLEMS[0], workers=3)
    assert texts(gang.submit(target, GREEDY, mode).events()) == local(tiny, target, mode=mode)


@pytest.mark.parametrize("mode", ["instant", "lagged"])
def test_batched_on_the_gang_equals_alone(tiny, gang, mode):
    """The target among 3 other sessions (1-4 workers, every layout, mixed modes) admitted before
    and after it; a seeded sampled session too."""
    target = program(tiny, PROBLEMS[0], workers=3)
    sampled, params = program(tiny, PROBLEMS[5], max_steps=30), SamplingParams(temperature=0.9, seed=4)
    others = _others(tiny, 3)
    early = gang.submit(others[0], GREEDY, "lagged")
    gang.step()
    handle = gang.submit(target, GREEDY, mode)
    seeded = gang.submit(sampled, params, "instant")
    late = [gang.submit(p, GREEDY, "instant") for p in others[1:]]
    assert texts(handle.events()) == local(tiny, target, mode=mode)
    assert texts(seeded.events()) == local(tiny, sampled, params)
    for other in [early, *late]:
        assert isinstance(list(other.events())[-1], Finished)


def test_cancel_on_the_gang_and_the_gang_lives_on(tiny, gang):
    identities = gang.session.call("identity")
    victim = gang.submit(program(tiny, PROBLEMS[2], max_steps=400), GREEDY)
    keep = gang.submit(program(tiny, PROBLEMS[3]), GREEDY)
    events = victim.events()
    for event in events:
        if isinstance(event, Tick):
            victim.cancel()
            break
    with pytest.raises(SessionCancelled):
        list(events)
    assert isinstance(list(keep.events())[-1], Finished)
    assert gang.session.call("identity") == identities  # the same actors (weights loaded once)
    assert {p for p, _ in gang.session.call("pool_pages")} == {gang.pool_pages}
