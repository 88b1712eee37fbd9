"""The engine on its fixed KV pool: blocks that outgrow their pages inside a forward, commits after
that, exhaustion (typed, nothing written, engine usable), sessions whose blocks outgrow their first
reservations (one process and 2 actors, instant and lagged), and long runs of the default model."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import ray
import torch

from cache_service.errors import PoolExhaustedError
from cache_service.kv_store import PoolConfig
from cache_service.layout import View
from cluster.events import StepDone
from cluster.protocol import ProtocolConfig
from cluster.ray_session import RayConfig, run_program
from cluster.session import Session, SessionConfig
from tests.oracle import NaiveOracle
from tests.test_session import NO_ANSWERS
from workers.actor import EngineSpec, ModelSpec
from workers.backend import LocalBackend
from workers.engine import HogwildEngine
from workers.model import load_model, tiny_config
from workers.sampling import SamplingParams

TINY = tiny_config("llama", initializer_range=0.15)
ATOL = 1e-4


@pytest.fixture(scope="module")
def tiny():
    return load_model(TINY, dtype=torch.float32, device="cpu")


def _grow_and_commit(engine: HogwildEngine, oracle: NaiveOracle, steps: int) -> None:
    """Prompt, then two workers' steps of 1-3 tokens with no reserved pages (every block takes new
    pages inside the forward), committing each step into the prompt block every 5 steps."""
    common, alice, bob = (engine.new_block() for _ in range(3))
    for block in (common, alice, bob):
        oracle.add_block(block)

    def check(rows):
        for got, want in zip(engine.forward(rows, all_logits=True), oracle.forward(rows)):
            torch.testing.assert_close(got, want, atol=ATOL, rtol=0)

    check([(View.of(common), list(range(3, 43)))])
    for step in range(steps):
        check([(View.of(common, bob, alice), [50 + step, 51][: 1 + step % 2]),
               (View.of(common, alice, bob), [60 + step, 61, 62][: 1 + step % 3])])
        if step % 5 == 4:
            for own in (alice, bob):
                engine.commit(own, common)
                oracle.commit(own, common)


@pytest.mark.parametrize("mode", ["instant", "lagged"])
def test_blocks_outgrow_their_pages_inside_a_forward_then_commit(tiny, mode):
    """The reported crash: a forward that outgrew the cache's first allocation (then reallocated
    inside inference mode), followed by a commit. Now pages are taken inside the forward, from a
    pool allocated once, and everything stays equal to the naive oracle."""
    engine = HogwildEngine(tiny, mode=mode, pool=PoolConfig(tokens=256, page_size=16))
    pool, address = engine.store.pool, engine.store.pool.data_ptr()
    _grow_and_commit(engine, NaiveOracle(tiny, mode), steps=30)
    assert engine.store.pool is pool and engine.store.pool.data_ptr() == address
    assert engine.store.used_pages == sum(engine.store.pages_for(b.length) for b in engine.store.blocks.values())


def _small_engine(tiny) -> tuple[HogwildEngine, tuple[int, int, int]]:
    """A 4-page pool, full: a 48-token prompt (3 pages) and Alice's first token (the 4th)."""
    engine = HogwildEngine(tiny, pool=PoolConfig(tokens=64, page_size=16))
    common, alice, bob = (engine.new_block() for _ in range(3))
    engine.prefill(common, list(range(3, 51)))
    engine.forward([(View.of(common, alice), [7])])
    return engine, (common, alice, bob)


def test_exhaustion_writes_nothing_and_the_engine_goes_on(tiny):
    engine, (common, alice, bob) = _small_engine(tiny)
    used, lengths = engine.store.used_pages, [engine.length(b) for b in (common, alice, bob)]
    before = engine.store.pool.clone()
    with pytest.raises(PoolExhaustedError, match="KV pool is full"):
        engine.forward([(View.of(common, alice), [8]), (View.of(common, bob), [9])])  # bob needs a page
    with pytest.raises(PoolExhaustedError):
        engine.commit(alice, common)  # common's pages are full
    assert engine.store.used_pages == used and [engine.length(b) for b in (common, alice, bob)] == lengths
    assert torch.equal(engine.store.pool, before)
    step = [(View.of(common, alice), [8]), (View.of(common, bob), [9])]
    engine.store.truncate(common, 32)  # hands back a page: the same step now fits
    got = engine.forward(step)
    fresh, _ = _small_engine(tiny)  # the same history without the refused attempts
    fresh.store.truncate(common, 32)
    torch.testing.assert_close(got, fresh.forward(step), atol=0, rtol=0)


# ---- sessions whose blocks outgrow their first reservations --------------------------------------
def _program(tiny, mode: str):
    """A 2-worker session of 160 decode steps with 10-token steps: the committed history (about
    2 x 160 tokens) outgrows the prompt block's reservation (prompt + max_steps)."""
    protocol = ProtocolConfig(workers=2, max_steps=160, max_step_tokens=10, check_every=0, templates=NO_ANSWERS)
    config = SessionConfig(protocol=protocol, sampling=SamplingParams(temperature=1.0, seed=5), mode=mode,
                           pool=PoolConfig(tokens=2048, page_size=16))
    return Session("What is 2 + 3?", config, lm=tiny).program, config


def _local_events(tiny, mode: str) -> tuple[list, HogwildEngine]:
    program, config = _program(tiny, mode)
    engine = HogwildEngine(tiny, mode=mode, pool=config.pool)
    return list(program.run(LocalBackend(engine, config.sampling, 2))), engine


@pytest.mark.parametrize("mode", ["instant", "lagged"])
def test_session_outgrows_its_reservations_in_process(tiny, mode):
    events, engine = _local_events(tiny, mode)
    program, _ = _program(tiny, mode)
    common = engine.store.block(0)
    assert common.length > common.reserved == len(program.prompt_ids) + 160  # it outgrew its reservation
    assert sum(isinstance(e, StepDone) for e in events) >= 20


@pytest.fixture(scope="module")
def ray_cluster():
    ray.init(address="local", num_cpus=4, include_dashboard=False, log_to_driver=False, logging_level="ERROR")
    yield
    ray.shutdown()


@pytest.mark.ray
@pytest.mark.parametrize("mode", ["instant", "lagged"])
def test_session_outgrows_its_reservations_on_two_actors(tiny, ray_cluster, mode):
    want, _ = _local_events(tiny, mode)
    program, config = _program(tiny, mode)
    spec = EngineSpec(ModelSpec(TINY, dtype="float32", seed=0), mode=mode, sampling=config.sampling,
                      pool=config.pool)
    got = list(run_program(program, spec, RayConfig((1, 1))))
    assert got == want


# ---- long runs of the default model --------------------------------------------------------------
LONG_STEPS = 3000


@pytest.mark.slow
def test_long_session_in_process(default_lm):
    """3,000 decode steps of 2 workers (answers switched off, so the whole budget runs, or the
    context ends it): the history far outgrows its first pages, commits keep coming."""
    protocol = ProtocolConfig(workers=2, max_steps=LONG_STEPS, templates=NO_ANSWERS)
    config = SessionConfig(protocol=protocol, sampling=SamplingParams(temperature=0.6, top_p=0.95, seed=0))
    result = Session("What is 6 times 7?", config, lm=default_lm).result()
    assert result.reason in ("budget", "context")
    assert result.steps == LONG_STEPS or result.reason == "context"
    assert result.steps > 2000 and sum(w.steps for w in result.workers) > 20


@pytest.mark.slow
@pytest.mark.ray
def test_long_session_on_two_actors_through_the_cli():
    """The command of the bug report, as a user runs it: it completes and prints its result."""
    command = [sys.executable, "-m", "cluster.cli", "run", "What is 6 times 7?", "--workers", "2",
               "--actors", "2", "--max-steps", str(LONG_STEPS), "--json"]
    done = subprocess.run(command, capture_output=True, text=True, timeout=1200)
    assert done.returncode == 0, done.stderr[-2000:]
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert result["steps"] > 0 and [w["name"] for w in result["workers"]] == ["Alice", "Bob"]
