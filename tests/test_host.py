"""The session host: many sessions on one engine, batched in one forward per decode step."""

from __future__ import annotations

import asyncio
import threading

import pytest
import torch

from cache_service.errors import ConfigError
from cache_service.kv_store import PoolConfig
from cache_service.layout import View
from cluster.events import Finished, Started, Tick
from cluster.host import HostBusyError, SessionCancelled, SessionHost
from cluster.protocol import ProtocolConfig
from cluster.session import Session, SessionConfig
from tests.test_session import NO_ANSWERS
from workers.engine import HogwildEngine
from workers.model import load_model, tiny_config
from workers.sampling import SamplingParams

TINY = tiny_config("llama", initializer_range=0.15)
GREEDY = SamplingParams()
PROBLEMS = ["What is 2 + 3?", "Name three primes.", "How many legs do 4 cats have?", "Is 91 prime?",
            "Spell 'cat' backwards.", "What is 12 / 4?", "Sum 1..10.", "Which is larger, 2^10 or 10^3?"]


@pytest.fixture(scope="module")
def tiny():
    return load_model(TINY, dtype=torch.float32, device="cpu")


def program(tiny, problem: str, workers: int = 2, layout: str = "combined", max_steps: int = 24,
            max_step_tokens: int = 6):
    protocol = ProtocolConfig(workers=workers, layout=layout, max_steps=max_steps,
                              max_step_tokens=max_step_tokens, check_every=5, templates=NO_ANSWERS)
    return Session(problem, SessionConfig(protocol=protocol), lm=tiny).program


def host(tiny, tokens: int = 1 << 16, **options) -> SessionHost:
    return SessionHost(HogwildEngine(tiny, pool=PoolConfig(tokens=tokens)), **options)


def texts(events) -> list:
    """What a session reports (its ticks counted)."""
    events = list(events)
    return [e for e in events if not isinstance(e, Tick)] + [sum(isinstance(e, Tick) for e in events)]


def run_alone(tiny, prog, sampling=GREEDY, mode="instant") -> list:
    return list(host(tiny).submit(prog, sampling, mode).events())


# ---- batch invariance ----------------------------------------------------------------------------
def _others(tiny, k: int) -> list:
    """``k`` different sessions: 1-4 workers, every layout, different problems and lengths."""
    layouts = ["combined", "contiguous", "interleaved"]
    return [program(tiny, PROBLEMS[1 + i], workers=1 + i % 4, layout=layouts[i % 3], max_steps=10 + 7 * i,
                    max_step_tokens=4 + i) for i in range(k)]


@pytest.mark.parametrize("others", [1, 3, 7])
@pytest.mark.parametrize("mode", ["instant", "lagged"])
def test_greedy_session_is_the_same_alone_and_batched(tiny, others, mode):
    target = program(tiny, PROBLEMS[0], workers=3)
    want = run_alone(tiny, target, mode=mode)
    h = host(tiny)
    early = [h.submit(p, GREEDY, "lagged" if i % 2 else "instant") for i, p in enumerate(_others(tiny, others)[:1])]
    for _ in range(5):  # the target is admitted while another session runs ...
        h.step()
    handle = h.submit(target, GREEDY, mode)
    late = [h.submit(p, GREEDY, "instant") for p in _others(tiny, others)[1:]]  # ... and others after it
    assert texts(handle.events()) == texts(want)
    for other in early + late:
        assert isinstance(list(other.events())[-1], Finished)


def test_seeded_sampled_session_is_the_same_alone_and_batched(tiny):
    target, params = program(tiny, PROBLEMS[0], max_steps=40), SamplingParams(temperature=0.8, top_p=0.9, seed=7)
    want = run_alone(tiny, target, params)
    h = host(tiny)
    others = [h.submit(p, SamplingParams(temperature=1.0, seed=i), "instant") for i, p in enumerate(_others(tiny, 3))]
    got = list(h.submit(target, params, "instant").events())
    assert texts(got) == texts(want)
    assert all(isinstance(list(o.events())[-1], Finished) for o in others)


def test_teacher_forced_logits_batched_within_tolerance(tiny):
    """The same rows alone and with another session's rows in the same forward: logits within 1e-4."""

    def rows_of(engine, seed):
        generator = torch.Generator().manual_seed(seed)
        common, a, b = (engine.new_block() for _ in range(3))
        engine.prefill(common, torch.randint(0, 128, (40,), generator=generator).tolist())
        return [(View.of(common, b, a), [5, 6]), (View.of(common, a, b), [7])]

    alone = HogwildEngine(tiny, pool=PoolConfig(tokens=4096))
    want = alone.forward(rows_of(alone, 0), all_logits=True)
    batched = HogwildEngine(tiny, pool=PoolConfig(tokens=4096))
    mine, other = rows_of(batched, 0), rows_of(batched, 1)
    got = batched.forward(other[:1] + mine + other[1:], all_logits=True, modes=["lagged", "instant", "instant",
                                                                                 "lagged"])
    for g, w in zip(got[1:3], want):
        torch.testing.assert_close(g, w, atol=1e-4, rtol=0)


def test_one_forward_per_decode_step_for_all_sessions(tiny, monkeypatch):
    h = host(tiny)
    handles = [h.submit(p, GREEDY) for p in _others(tiny, 4)]
    calls = []
    real = h.engine.forward

    def counting(steps, **options):
        calls.append(len(steps))
        return real(steps, **options)

    monkeypatch.setattr(h.engine, "forward", counting)
    while any(not handle.done.is_set() for handle in handles):
        h.step()
    assert max(calls) == sum(p.program.config.workers for p in handles)  # every session's rows at once


# ---- cancel, admission, queue --------------------------------------------------------------------
def test_cancel_frees_every_block_and_others_go_on(tiny):
    h = host(tiny)
    keep = h.submit(program(tiny, PROBLEMS[1], max_steps=30), GREEDY)
    h.step()
    before = h.engine.store.used_pages
    victim = h.submit(program(tiny, PROBLEMS[2], workers=3, max_steps=200), GREEDY)
    events = victim.events()
    for event in events:
        if isinstance(event, Tick) and event.step == 5:
            break
    assert h.engine.store.used_pages > before
    victim.cancel()
    with pytest.raises(SessionCancelled):
        list(events)
    assert isinstance(list(keep.events())[-1], Finished)
    assert h.engine.store.used_pages == 0 and h.claimed == 0


def test_admission_queues_what_does_not_fit_and_runs_it_later(tiny):
    prog = program(tiny, PROBLEMS[0], max_steps=30)
    pages = prog.worst_case_pages(16)
    h = host(tiny, tokens=16 * (2 * pages + pages // 2), max_waiting=1)  # room for two sessions, not three
    first = h.submit(prog, GREEDY)
    h.step()
    second = h.submit(prog, GREEDY)
    h.step()
    third = h.submit(prog, GREEDY)
    h.step()
    assert h.stats()["live"] == 2 and h.stats()["waiting"] == 1
    with pytest.raises(HostBusyError, match="retry later"):
        h.submit(prog, GREEDY)
    for _ in first.events():
        pass
    assert not any(s.handle is third for s in h.live)
    h.step()  # the next round admits it
    assert any(s.handle is third for s in h.live)
    results = [x.result() for x in (second, third)]
    assert results[0].workers[0].text == results[1].workers[0].text  # the same greedy session
    too_big = program(tiny, PROBLEMS[0], max_steps=100000)
    with pytest.raises(ConfigError, match="KV pages"):
        h.submit(too_big, GREEDY)


def test_a_waiting_session_runs_when_every_live_one_ends_in_the_same_round(tiny):
    """Regression: the host thread slept while sessions waited for room, once every live session
    had ended in one round (nothing new arrived to wake it)."""
    prog = program(tiny, PROBLEMS[0], max_steps=30)
    pages = prog.worst_case_pages(16)
    # room for two sessions, not three; both prompts in one chunk and no prefix cache, so the two
    # start in the same round and end in the same round
    with host(tiny, tokens=16 * (2 * pages + pages // 2), prefix_cache=False, prefill_chunk=4096).start() as h:
        handles = [h.submit(prog, GREEDY) for _ in range(3)]
        assert handles[2].done.wait(timeout=60), "the waiting session was never admitted"
        assert h.stats()["waiting"] == 0
    results = [x.result() for x in handles]
    assert results[0].workers[0].text == results[2].workers[0].text  # the same greedy session


# ---- threads and asyncio -------------------------------------------------------------------------
def test_threads_and_asyncio(tiny):
    want = texts(run_alone(tiny, program(tiny, PROBLEMS[3])))
    with host(tiny).start() as h:
        results = {}

        def consume(name):
            results[name] = texts(h.submit(program(tiny, PROBLEMS[3]), GREEDY).events())

        threads = [threading.Thread(target=consume, args=(i,)) for i in range(3)]
        for t in threads:
            t.start()

        async def consume_async():
            handle = h.submit(program(tiny, PROBLEMS[3]), GREEDY)
            return texts([event async for event in handle.aevents()])

        async_result = asyncio.run(consume_async())
        for t in threads:
            t.join()
    assert async_result == want and all(r == want for r in results.values())


def test_session_api_is_a_host_with_one_session(tiny):
    config = SessionConfig(protocol=ProtocolConfig(workers=2, max_steps=12, templates=NO_ANSWERS))
    events = list(Session(PROBLEMS[0], config, lm=tiny).events())
    assert isinstance(events[0], Started) and isinstance(events[-1], Finished)
    assert texts(events) == texts(run_alone(tiny, Session(PROBLEMS[0], config, lm=tiny).program,
                                            config.sampling))


# ---- the worst case a session is admitted by --------------------------------------------------
@pytest.mark.parametrize("layout", ["combined", "contiguous", "interleaved"])
@pytest.mark.parametrize("max_steps", [40, 2000])  # 2000: the context (2048 tokens) ends the run
def test_a_session_never_holds_more_pages_than_its_worst_case(layout, max_steps):
    lm = load_model(tiny_config("llama", initializer_range=0.15, max_position_embeddings=2048),
                    dtype=torch.float32, device="cpu")
    prog = program(lm, PROBLEMS[4], workers=3, layout=layout, max_steps=max_steps, max_step_tokens=12)
    h = SessionHost(HogwildEngine(lm, pool=PoolConfig(tokens=1 << 16)))
    events, peak = run_to_the_end(h, prog, SamplingParams(temperature=1.0, seed=2))
    assert 0 < peak <= prog.worst_case_pages(16)
    if max_steps == 2000:
        assert events[-1].reason == "context"


def run_to_the_end(host: SessionHost, prog, sampling: SamplingParams) -> tuple[list, int]:
    """Run one session inline on ``host``: its events and the most pool pages in use at once."""
    handle, peak = host.submit(prog, sampling), 0
    while not handle.done.is_set():
        host.step()
        peak = max(peak, host.engine.store.used_pages)
    return list(handle.events()), peak
