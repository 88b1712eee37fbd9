"""DESIGN.md §3 oracle 4 (placement invariance) and §4 (Ray sessions): the distributed backend gives
the single-process engine's logits for any placement of workers on actors, in both modes; the real
model gives the same greedy tokens; failures end a session with a clear error and leave nothing."""

from __future__ import annotations

import hashlib
import socket
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import pytest
import ray
import torch
from ray.util.placement_group import placement_group_table
from ray.util.state import list_actors

from cache_service.errors import ConfigError, LayoutError
from cache_service.layout import View
from cluster.ray_session import (ActorFailedError, RayConfig, RaySession, ResourcesError, check_one_rank_per_gpu,
                                 run_program)
from workers.actor import EngineSpec, ModelSpec, WorkerActor
from workers.backend import LocalBackend
from workers.distributed import Placement, StepOrder
from workers.engine import HogwildEngine
from workers.exchange import RendezvousError, rendezvous
from workers.model import load_model, tiny_config
from workers.sampling import SamplingParams

# fp32 teacher-forced logits (|x| ~ 5) of a sharp tiny model: placements differ by <= ~4e-6 (batch
# shapes change the matmul blocking); a wrong exchange, order or visibility moves them by > 0.1.
ATOL = 1e-5
TINY = tiny_config("llama", initializer_range=0.15)  # sharp attention: position errors show


def tiny_spec(mode: str = "instant", overlap_min: int | None = 0) -> EngineSpec:
    """``direct_min`` 16: the Script's shared history (24+ tokens) is read in place and written by
    nobody during a step, so with ``overlap_min`` 0 instant steps overlap their exchange with it (the
    reference reads it through the tail path: the two must agree)."""
    return EngineSpec(ModelSpec(TINY, dtype="float32", seed=0), mode=mode, direct_min=16, overlap_min=overlap_min)


@pytest.fixture(scope="module")
def ray_cluster():
    """One local Ray per module (with the dashboard: the state API lists actors). Six logical CPUs:
    a module-scoped session (up to 3 actors) may still be up while another test starts one."""
    ray.init(address="local", num_cpus=6, include_dashboard=True, log_to_driver=False,
             logging_level="ERROR")
    yield
    ray.shutdown()


def alive() -> set[str]:
    """Ids of actors not dead and placement groups not removed, in this Ray."""
    actors = {a.actor_id for a in list_actors(filters=[("state", "!=", "DEAD")])}
    return actors | {g for g, info in placement_group_table().items() if info["state"] != "REMOVED"}


def assert_none_left(before: set[str], timeout_s: float = 20.0) -> None:
    """Nothing started since ``before`` is alive (polls: Ray reports deaths asynchronously)."""
    deadline = time.monotonic() + timeout_s
    while (left := alive() - before) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not left, f"left behind (actors / placement groups): {left}"


@pytest.fixture
def no_leaks(ray_cluster) -> Iterator[None]:
    """The test leaves no actor or placement group behind."""
    before = alive()
    yield
    assert_none_left(before)


# ---- a teacher-forced schedule, run on the single-process engine or on a Ray session ---------------
class LocalCache:
    """The reference: every worker on one ``HogwildEngine`` in this process."""

    def __init__(self, mode: str, lm=None) -> None:
        self.engine = HogwildEngine(lm or load_model(TINY, dtype=torch.float32, device="cpu"), mode=mode)

    def new_block(self, reserve: int) -> int:
        return self.engine.new_block(reserve)

    def prefill(self, block: int, tokens: list[int], context: Sequence[int] = ()) -> None:
        self.engine.prefill(block, tokens, context)

    def commit(self, step: int, into: int) -> None:
        self.engine.commit(step, into)

    def forward(self, rows, workers) -> dict[int, torch.Tensor]:
        logits = self.engine.forward(rows, all_logits=True)
        return {w: logits[i] for i, w in enumerate(workers)}


class RayCache:
    """The same calls on every actor of a session (lockstep)."""

    def __init__(self, session: RaySession) -> None:
        self.session = session

    def new_block(self, reserve: int) -> int:
        return self.session.agree("new_block", reserve)

    def prefill(self, block: int, tokens: list[int], context: Sequence[int] = ()) -> None:
        self.session.call("prefill", block, tokens, context)

    def commit(self, step: int, into: int) -> None:
        self.session.call("commit", step, into)

    def forward(self, rows, workers) -> dict[int, torch.Tensor]:
        return self.session.forward(rows, workers, all_logits=True)


@dataclass
class Script:
    """Three workers, combined-style views ``[common, header, peers' steps, own step]``; steps with
    multi-token rows of unequal length, rows out of worker order, a subset of workers (idle actors),
    and a commit. ``part`` 0 builds and runs the first half, 1 the second (snapshot tests)."""

    views: list[View] | None = None
    common: int = -1
    steps: tuple[int, ...] = ()

    def setup(self, cache) -> None:
        self.common = cache.new_block(64)
        cache.prefill(self.common, list(range(5, 29)))
        header = cache.new_block(8)
        cache.prefill(header, [90, 91, 92], (self.common,))
        self.steps = tuple(cache.new_block(32) for _ in range(3))
        self.views = [View.of(self.common, header, *[s for s in self.steps if s != own], own) for own in self.steps]

    def first(self, cache) -> list[dict[int, torch.Tensor]]:
        v = self.views
        return [
            cache.forward([(v[0], [30, 31, 32]), (v[1], [40]), (v[2], [50, 51])], [0, 1, 2]),
            cache.forward([(v[2], [52]), (v[0], [33, 34]), (v[1], [41])], [2, 0, 1]),
        ]

    def second(self, cache) -> list[dict[int, torch.Tensor]]:
        v = self.views
        out = [cache.forward([(v[1], [42, 43])], [1])]  # actors not hosting worker 1 only exchange
        cache.commit(self.steps[1], self.common)
        out.append(cache.forward([(v[0], [35]), (v[1], [60, 61, 62]), (v[2], [53])], [0, 1, 2]))
        out.append(cache.forward([(v[0], [36]), (v[2], [54, 55])], [0, 2]))
        return out

    def run(self, cache) -> list[dict[int, torch.Tensor]]:
        self.setup(cache)
        return self.first(cache) + self.second(cache)


def assert_same_logits(got: list[dict], want: list[dict], atol: float = ATOL) -> None:
    assert len(got) == len(want)
    for step, (g, w) in enumerate(zip(got, want)):
        assert sorted(g) == sorted(w), f"step {step}: workers {sorted(g)} != {sorted(w)}"
        for worker in w:
            torch.testing.assert_close(g[worker], w[worker], atol=atol, rtol=0,
                                       msg=lambda m: f"step {step} worker {worker}: {m}")


# ---- pure helpers (no Ray) -----------------------------------------------------------------------
def test_step_order_puts_rows_in_rank_order():
    placement = Placement((2, 1, 2), rank=2)
    assert list(placement.workers) == [3, 4]
    order = StepOrder.of([4, 0, 2, 3], placement)
    assert order.counts == (1, 1, 2)
    assert order.arrange(["w4", "w0", "w2", "w3"]) == ["w0", "w2", "w4", "w3"]
    assert order.local == range(2, 4)
    assert order.restore(order.arrange([4, 0, 2, 3])) == [4, 0, 2, 3]


def test_placement_and_config_errors_say_what_to_do():
    with pytest.raises(ConfigError, match="at least one worker"):
        Placement((2, 0), rank=0)
    with pytest.raises(ConfigError, match="actors must be between 1"):
        RayConfig.split(workers=2, actors=3)
    assert RayConfig.split(workers=5, actors=2).workers_per_actor == (3, 2)
    with pytest.raises(ConfigError, match="strategy"):
        RayConfig((1,), strategy="NEAR")


def weights_digest(lm) -> str:
    digest = hashlib.sha256()
    for _, tensor in sorted(lm.model.state_dict().items()):
        digest.update(tensor.numpy().tobytes())
    return digest.hexdigest()


def test_random_weights_are_identical_in_another_process():
    """What every actor relies on: a config and a seed give the same weights in any process."""
    code = ("import torch; from tests.test_distributed import TINY, weights_digest; "
            "from workers.model import load_model; "
            "print(weights_digest(load_model(TINY, dtype=torch.float32, device='cpu')))")
    other = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert other.strip() == weights_digest(load_model(TINY, dtype=torch.float32, device="cpu"))


def test_ranks_that_cannot_meet_raise_a_clear_error():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # nobody listens here: rank 0 never comes
    start = time.monotonic()
    with pytest.raises(RendezvousError, match="could not meet"):
        rendezvous(f"127.0.0.1:{port}", rank=1, world=2, device=torch.device("cpu"), timeout_s=2)
    assert time.monotonic() - start < 30


def test_nccl_placement_never_shares_a_gpu():
    check_one_rank_per_gpu([{"rank": 0, "node": "a", "gpus": ["0"]}, {"rank": 1, "node": "b", "gpus": ["0"]}])
    with pytest.raises(Exception, match="share GPU 0"):
        check_one_rank_per_gpu([{"rank": 0, "node": "a", "gpus": ["0"]}, {"rank": 1, "node": "a", "gpus": ["0"]}])


# ---- oracle 4: placement invariance on a tiny model ---------------------------------------------
@pytest.fixture(scope="module")
def references() -> dict[str, list[dict]]:
    lm = load_model(TINY, dtype=torch.float32, device="cpu")
    return {mode: Script().run(LocalCache(mode, lm)) for mode in ("instant", "lagged")}


@pytest.fixture(scope="module", params=[(3,), (1, 1, 1), (2, 1)], ids=["1x3", "3x1", "2+1"])
def tiny_session(request, ray_cluster) -> Iterator[RaySession]:
    before = alive()
    with RaySession(RayConfig(request.param), tiny_spec()) as session:
        yield session
    assert_none_left(before)


@pytest.mark.ray
@pytest.mark.parametrize("mode", ["instant", "lagged"])
def test_placement_invariance_tiny(tiny_session, references, mode):
    tiny_session.call("reset", mode)
    got = Script().run(RayCache(tiny_session))
    assert_same_logits(got, references[mode])


@pytest.mark.ray
def test_instant_without_overlap_gives_the_same_logits(no_leaks, references):
    """The CPU default: a history this short is not worth overlapping (the exchange is awaited first)."""
    with RaySession(RayConfig((2, 1)), tiny_spec(overlap_min=None)) as session:
        assert_same_logits(Script().run(RayCache(session)), references["instant"])


@pytest.mark.ray
def test_actors_load_identical_weights(tiny_session):
    local = WorkerActor(tiny_spec(), Placement((1,), 0))
    assert set(tiny_session.call("weights_digest")) == {local.weights_digest()}


@pytest.mark.ray
def test_an_error_in_an_actor_is_raised_as_itself(tiny_session):
    tiny_session.call("reset", "instant")
    block = tiny_session.agree("new_block", 16)
    with pytest.raises(LayoutError, match="does not exist"):
        tiny_session.forward([(View.of(block + 7), [1])], [0])


@pytest.mark.ray
def test_protocol_program_gives_the_same_events(tiny_session):
    """The collaboration protocol (sampling at temperature 1, commits, checks, the one-worker
    finisher) streams the same events from actors as in-process: RNG is per worker, not per actor."""
    from cluster.codec import CharCodec
    from cluster.prompts import Templates
    from cluster.protocol import Program, ProtocolConfig

    protocol = ProtocolConfig(workers=3, max_steps=20, max_step_tokens=6, check_every=4,
                              templates=Templates(answer=r"(?!)()"))  # never answers: the finisher runs
    program = Program("What is 2 + 3?", protocol, CharCodec(), max_context=2048)
    params = SamplingParams(temperature=1.0, seed=1)
    engine = HogwildEngine(load_model(TINY, dtype=torch.float32, device="cpu"))
    want = list(program.run(LocalBackend(engine, params, 3)))
    tiny_session.call("reset", "instant", sampling=params)
    assert list(tiny_session.events(program)) == want
    assert type(want[-1]).__name__ == "Finished" and want[-1].reason == "budget"


# ---- a program run on actors: the real model, streaming, failures --------------------------------
@dataclass(frozen=True)
class GreedyProgram:
    """Two workers decode greedily side by side; views ``[prompt, other's step, own step]``.
    Yields each decode step's tokens (the events of this program)."""

    prompt: tuple[int, ...]
    prefixes: tuple[tuple[int, ...], tuple[int, ...]]
    steps: int

    def run(self, backend) -> Iterator[list[int]]:
        common = backend.new_block(len(self.prompt))
        backend.prefill(common, list(self.prompt))
        own = [backend.new_block(self.steps + 32) for _ in self.prefixes]
        views = [View.of(common, own[1 - w], own[w]) for w in range(2)]
        feeds = [list(p) for p in self.prefixes]
        for _ in range(self.steps):
            tokens = backend.step(list(zip(views, feeds)), [0, 1], greedy=True)
            yield tokens
            feeds = [[t] for t in tokens]


@pytest.mark.ray
@pytest.mark.slow
def test_real_model_same_greedy_tokens_on_two_actors(no_leaks, default_lm):
    from workers.model_store import default_model_path

    tok = default_lm.tokenizer
    prompt = tok.encode("Two friends solve a puzzle together. Alice and Bob each write their thoughts; "
                        "they can see each other's notes.\n")
    program = GreedyProgram(tuple(prompt), (tuple(tok.encode("Alice: I think")), tuple(tok.encode("Bob: Let me"))),
                            steps=48)
    want = list(program.run(LocalBackend(HogwildEngine(default_lm), SamplingParams(), 2)))
    spec = EngineSpec(ModelSpec(str(default_model_path()), dtype="float32"))
    got = list(run_program(program, spec, RayConfig((1, 1))))
    assert got == want


@pytest.mark.ray
def test_more_resources_than_the_cluster_has_fail_fast(no_leaks):
    start = time.monotonic()
    with pytest.raises(ResourcesError, match=r"needs 8\.1 CPU \(the cluster has 6\)"):
        RaySession(RayConfig((1,) * 8), tiny_spec()).start()
    with pytest.raises(ResourcesError, match=r"1 GPU \(the cluster has 0\)"):
        RaySession(RayConfig((1,), device="cuda"), tiny_spec()).start()
    assert time.monotonic() - start < 10


@pytest.mark.ray
def test_a_killed_actor_ends_the_session_with_its_name(no_leaks):
    program = GreedyProgram(tuple(range(5, 25)), ((30, 31), (40,)), steps=900)
    session = RaySession(RayConfig((1, 1), chunk_s=0.05), tiny_spec()).start()
    try:
        events = session.events(program)
        next(events)
        ray.kill(session.actors[1])
        with pytest.raises(ActorFailedError, match=r"worker actor rank 1 \(workers \[1\].*died"):
            for _ in events:
                pass
    finally:
        session.close()


# ---- NCCL (two or more GPUs) ---------------------------------------------------------------------
@pytest.mark.ray
@pytest.mark.multigpu
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two CUDA devices")
@pytest.mark.parametrize("mode", ["instant", "lagged"])
def test_placement_invariance_nccl(no_leaks, mode):
    """Two actors on two GPUs (NCCL) against the single-GPU engine, fp32."""
    lm = load_model(TINY, dtype=torch.float32, device="cuda")
    want = Script().run(LocalCache(mode, lm))
    with RaySession(RayConfig((2, 1), device="cuda"), tiny_spec(mode)) as session:
        got = Script().run(RayCache(session))
    assert_same_logits(got, [{w: x.cpu() for w, x in step.items()} for step in want], atol=1e-4)
