"""The repetition penalty: per row, on each worker's recent sampled tokens, greedy included; 1 is a
no-op; a session's tokens are the same alone and batched with the penalty on; a saved session
resumes with its recent tokens."""

from __future__ import annotations

import pytest
import torch

from cache_service.errors import ConfigError
from cache_service.kv_store import PoolConfig
from cluster.events import Delta, Finished
from cluster.host import SessionHost
from cluster.protocol import RECENT_TOKENS, Decode
from cluster.resume import SavedSession
from cluster.session import Session
from tests.conftest import tiny_model
from tests.test_host import _others, host, program, run_alone, texts, tiny  # noqa: F401 (fixture)
from tests.test_reliability_resume import PROBLEM, config, stopped_at
from workers.distributed import DistributedBackend, Placement
from workers.engine import HogwildEngine
from workers.exchange import Collective
from workers.sampling import SamplingParams, penalize, sample, worker_generator

PENALISED = SamplingParams(temperature=0.8, top_p=0.9, seed=7, repetition_penalty=1.5)


def test_positive_logits_are_divided_negative_multiplied_per_row():
    logits = torch.tensor([[2.0, -1.0, 0.5, 3.0], [2.0, -1.0, 0.5, 3.0], [1.0, 1.0, 1.0, 1.0]])
    got = penalize(logits, [(0, 1, 0), (3,), ()], 2.0)
    want = torch.tensor([[1.0, -2.0, 0.5, 3.0], [2.0, -1.0, 0.5, 1.5], [1.0, 1.0, 1.0, 1.0]])
    assert torch.equal(got, want)
    assert torch.equal(logits[0], torch.tensor([2.0, -1.0, 0.5, 3.0]))  # the input is not changed


def test_greedy_takes_the_argmax_after_the_penalty():
    logits = torch.tensor([[3.0, 2.0, 0.0]])
    assert sample(logits, SamplingParams(), [worker_generator(SamplingParams(), 0)], [(0,)]) == [0]
    penalised = SamplingParams(repetition_penalty=2.0)
    assert sample(logits, penalised, [worker_generator(penalised, 0)], [(0,)]) == [1]


def test_penalty_one_is_bit_identical_and_needs_no_recent_ids():
    logits = torch.randn(3, 50, generator=torch.Generator().manual_seed(0))
    assert penalize(logits, (), 1.0) is logits
    params = SamplingParams(temperature=0.9, top_p=0.8, seed=3)
    draw = [sample(logits, params, [worker_generator(params, w) for w in range(3)], recent)
            for recent in ((), [(1, 2, 3), (4,), (5, 5)])]
    assert draw[0] == draw[1]


def test_a_penalty_without_each_rows_recent_ids_is_refused():
    with pytest.raises(ConfigError, match="each row's recent tokens"):
        penalize(torch.zeros(2, 5), [(1,)], 1.2)
    with pytest.raises(ConfigError, match="repetition_penalty must be"):
        SamplingParams(repetition_penalty=0)


def test_the_protocol_hands_each_worker_its_last_sampled_tokens(tiny):
    prog = program(tiny, "What is 2 + 3?", max_steps=RECENT_TOKENS + 10, max_step_tokens=RECENT_TOKENS + 50)
    cache = host(tiny)
    steps, reply, seen = prog.start(cache.engine), None, []
    while True:
        try:
            item = steps.send(reply)
        except StopIteration:
            break
        reply = None
        if hasattr(item, "block"):
            cache.engine.prefill(item.block, item.tokens, item.context)
        elif isinstance(item, Decode):
            seen.append(item.recent)
            reply = [100 + len(seen) + 1000 * w for w in item.workers] if not item.greedy else [5]
    assert seen[0] == ((), ())
    assert seen[3] == ((101, 102, 103), (1101, 1102, 1103))
    last = RECENT_TOKENS + 6
    window = seen[last]
    assert [len(r) for r in window] == [RECENT_TOKENS, RECENT_TOKENS]
    assert window[0][-1] == 100 + last and window[1][0] == 1000 + 101 + last - RECENT_TOKENS


def test_a_penalised_session_is_the_same_alone_and_batched(tiny):
    target = program(tiny, "What is 2 + 3?", max_steps=40)
    want = run_alone(tiny, target, PENALISED)
    plain = run_alone(tiny, target, SamplingParams(temperature=0.8, top_p=0.9, seed=7))
    assert _sampled(want) != _sampled(plain)  # the penalty changed what was sampled
    h = host(tiny)
    others = [h.submit(p, SamplingParams(temperature=1.0, seed=i, repetition_penalty=1.1 + i), "instant")
              for i, p in enumerate(_others(tiny, 3))]
    got = list(h.submit(target, PENALISED, "instant").events())
    assert texts(got) == texts(want)
    assert all(isinstance(list(o.events())[-1], Finished) for o in others)


def test_a_greedy_penalised_session_is_the_same_alone_and_batched(tiny):
    params = SamplingParams(repetition_penalty=1.3)
    target = program(tiny, "Is 91 prime?", workers=3, max_steps=30)
    want = run_alone(tiny, target, params)
    assert _sampled(want) != _sampled(run_alone(tiny, target))
    h = host(tiny)
    others = [h.submit(p, SamplingParams(), "lagged") for p in _others(tiny, 2)]
    assert texts(h.submit(target, params, "instant").events()) == texts(want)
    assert all(isinstance(list(o.events())[-1], Finished) for o in others)


def test_a_resumed_penalised_session_equals_an_uninterrupted_one(tmp_path):
    lm = tiny_model("llama")
    sampling = SamplingParams(temperature=0.9, top_p=0.95, seed=5, repetition_penalty=1.4)
    want = list(Session(PROBLEM, config(sampling, "instant"), lm=lm).events())
    path = tmp_path / "session.hwkv"
    stopped_at(SavedSession.new(PROBLEM, config(sampling, "instant"), save_to=path, every=4, lm=lm), 14)
    resumed = SavedSession.resume(path, lm=lm)
    assert resumed.resumed_at == 12
    assert list(resumed.events()) == want


def _sampled(events) -> list[str]:
    return [e.text for e in events if isinstance(e, Delta) and not e.forced]


def _world_one(tiny, params: SamplingParams) -> DistributedBackend:
    engine = HogwildEngine(tiny, pool=PoolConfig(tokens=1 << 15))
    return DistributedBackend(engine, params, Placement((2,), 0), Collective(0, 1, torch.device("cpu")), None)


def test_the_distributed_backend_penalises_like_the_local_one(tiny):
    """A one-actor gang's step (a session driven on actors) and decode (a gang's session host)."""
    target = program(tiny, "What is 2 + 3?", max_steps=40)
    want = run_alone(tiny, target, PENALISED)
    assert texts(target.run(_world_one(tiny, PENALISED))) == texts(want)
    assert texts(SessionHost(_world_one(tiny, PENALISED)).submit(target, PENALISED).events()) == texts(want)
