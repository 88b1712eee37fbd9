"""Chaos: worker actors of a gang are killed (``ray.kill``) at random moments of a session; the gang
is replaced, the sessions replay and complete with exactly the events of an uninterrupted run
(greedy and seeded, instant and lagged, three kills in one session, other sessions on the host).
Nothing is left behind after a recovery or after giving up."""

from __future__ import annotations

import random
import threading
import time

import pytest
import ray
import torch

from cache_service.kv_store import PoolConfig
from cluster.events import Recovered, Tick
from cluster.gang import GangHost
from cluster.host import SessionHost
from cluster.ray_session import ActorFailedError, RayConfig
from tests.test_host import GREEDY, PROBLEMS, TINY, program
from workers.actor import EngineSpec, ModelSpec
from workers.engine import HogwildEngine
from workers.model import load_model
from workers.sampling import SamplingParams

pytestmark = pytest.mark.ray

POOL = PoolConfig(tokens=1 << 14)
SPEC = EngineSpec(ModelSpec(TINY, dtype="float32", seed=0), pool=POOL)
SEEDED = SamplingParams(temperature=0.9, seed=7)


@pytest.fixture(scope="module")
def tiny():
    return load_model(TINY, dtype=torch.float32, device="cpu")



def local(tiny, prog, sampling=GREEDY, mode="instant") -> list:
    return [e for e in SessionHost(HogwildEngine(tiny, pool=POOL)).submit(prog, sampling, mode).events()]


def run_with_kills(host: GangHost, handle, kills: list[int], rng: random.Random) -> tuple[list, list]:
    """The session's events, killing a random actor after the Ticks of ``kills`` (a short random
    delay later, so a kill may land in the middle of a call); returns (events, Recovered events)."""
    events, recovered, pending, killed, waiting, victims = [], [], sorted(kills), [], False, []
    for event in handle.events():
        if isinstance(event, Recovered):
            recovered.append(event)
            waiting = True
            continue
        if waiting:  # the first new event after a recovery: kill -> next token
            print(f"kill -> next event {time.monotonic() - killed[-1]:.2f} s ({recovered[-1].message})")
            waiting = False
        events.append(event)
        if isinstance(event, Tick) and pending and event.step == pending[0]:
            pending.pop(0)
            rank = rng.randrange(len(host.session.actors))
            victims.append(rank)
            threading.Timer(rng.uniform(0.0, 0.1), _kill, [host.session.actors[rank], killed]).start()
    assert [r.lost for r in recovered] == [(rank,) for rank in victims]  # the events name the lost actor
    return events, recovered


def _kill(actor, killed: list[float]) -> None:
    killed.append(time.monotonic())
    try:
        ray.kill(actor, no_restart=True)
    except (ValueError, ray.exceptions.RayError):
        pass  # already gone


@pytest.mark.parametrize("mode, sampling, every",
                         [("instant", GREEDY, 1), ("lagged", SEEDED, 1), ("instant", SEEDED, 0)],
                         ids=["greedy-instant", "seeded-lagged", "seeded-instant-no-checkpoints"])
def test_a_killed_actor_is_replaced_and_the_session_is_unchanged(tiny, no_leaks, mode, sampling, every):
    """Restored from the CacheService's checkpoint (or, with no checkpoints, replayed)."""
    seed = random.randrange(1 << 16)
    rng = random.Random(seed)
    target = program(tiny, PROBLEMS[0], workers=2, max_steps=60)
    want = local(tiny, target, sampling, mode)
    with GangHost(RayConfig((1, 1)), SPEC, checkpoint_every=every) as host:
        got, recovered = run_with_kills(host, host.submit(target, sampling, mode), [rng.randrange(12, 30)], rng)
        assert host.recoveries == 1
    assert got == want, f"seed {seed}"
    assert len(recovered) == 1 and recovered[0].message.startswith("worker actor ")
    assert " lost; recovered in " in recovered[0].message, recovered[0].message
    how = "1 restored from the cache service's checkpoint" if every else "1 replayed from the start"
    assert how in recovered[0].message, recovered[0].message


def test_three_kills_in_one_session_with_another_session_on_the_host(tiny, no_leaks):
    seed = random.randrange(1 << 16)
    rng = random.Random(seed)
    target = program(tiny, PROBLEMS[3], workers=3, max_steps=80)
    other = program(tiny, PROBLEMS[5], workers=2, max_steps=45)
    want, want_other = local(tiny, target, SEEDED), local(tiny, other)
    with GangHost(RayConfig((1, 1)), SPEC, checkpoint_every=1) as host:
        second = host.submit(other, GREEDY, "instant")
        got, recovered = run_with_kills(host, host.submit(target, SEEDED, "instant"), [4, 20, 40], rng)
        got_other = [e for e in second.events() if not isinstance(e, Recovered)]
        assert host.recoveries == 3 and len(recovered) == 3
    assert got == want, f"seed {seed}"
    assert got_other == want_other, f"seed {seed}"


def test_giving_up_after_the_retries_is_a_clear_error(tiny, no_leaks):
    target = program(tiny, PROBLEMS[2], workers=2, max_steps=200)
    with GangHost(RayConfig((1, 1)), SPEC, max_recoveries=0) as host:
        events = host.submit(target, GREEDY, "instant").events()
        for event in events:
            if isinstance(event, Tick):
                ray.kill(host.session.actors[1])
                break
        with pytest.raises(ActorFailedError, match=r"worker actor rank 1 .*died") as caught:
            list(events)
    assert "gave up after 0 recoveries" in "".join(getattr(caught.value, "__notes__", []))


@pytest.mark.parametrize("mode, sampling", [("instant", GREEDY), ("lagged", SEEDED)], ids=["greedy-instant",
                                                                                          "seeded-lagged"])
def test_a_killed_cache_service_is_restored_from_its_snapshot(tiny, no_leaks, tmp_path, mode, sampling):
    """The CacheService is killed mid-session: a new one is restored from the last snapshot file,
    the actors roll back to it, and the steps after it are generated again, identically."""
    target = program(tiny, PROBLEMS[1], workers=2, max_steps=60)
    want = local(tiny, target, sampling, mode)
    with GangHost(RayConfig((1, 1)), SPEC, checkpoint_every=1, snapshot_dir=tmp_path, snapshot_every_s=0) as host:
        got, recovered = [], []
        for event in host.submit(target, sampling, mode).events():
            if isinstance(event, Recovered):
                recovered.append(event)
                continue
            got.append(event)
            if isinstance(event, Tick) and event.step == 20 and not recovered:
                ray.kill(host.session.service, no_restart=True)
        assert host.recoveries == 1
    assert got == want
    assert len(recovered) == 1 and recovered[0].lost == ()
    message = recovered[0].message
    assert message.startswith("the cache service was lost; recovered in "), message
    assert "1 restored from the cache service's checkpoint" in message, message
    assert [p.name for p in tmp_path.iterdir()] == [host.snapshot_file.name]
