"""Sessions on real engines: tiny random models (fast) and the default model (slow)."""

from __future__ import annotations

import json
import pickle

import pytest
import torch

from cluster.codec import TokenizerCodec
from cluster.events import Finished, StepDone, Tick
from cluster.layouts import Layout, get_layout, view
from cluster.prompts import Templates
from cluster.protocol import Program, ProtocolConfig, allocate_blocks
from cluster.session import Session, SessionConfig, local_backend
from tests.conftest import tiny_model
from workers.engine import HogwildEngine
from workers.sampling import SamplingParams

PROBLEM = "Alice has 3 boxes with 4 apples each. She gives away 5 apples. How many apples does she have left?"
NO_ANSWERS = Templates(answer=r"(?!)()")  # a pattern that never matches: the run uses its whole budget


class RecordingBackend:
    """Wraps a backend and mirrors every block's token ids, to read back what the cache holds."""

    def __init__(self, inner) -> None:
        self.inner = inner
        self.tokens: dict[int, list[int]] = {}

    def new_block(self, reserve: int = 0) -> int:
        block = self.inner.new_block(reserve)
        self.tokens[block] = []
        return block

    def length(self, block: int) -> int:
        return self.inner.length(block)

    def prefill(self, block, tokens, context=()):
        self.inner.prefill(block, tokens, context)
        self.tokens[block] += list(tokens)

    def step(self, rows, workers, **options):
        out = self.inner.step(rows, workers, **options)
        for row_view, tokens in rows:
            self.tokens[row_view.target] += list(tokens)
        return out

    def commit(self, step_block, into):
        self.inner.commit(step_block, into)
        self.tokens[into] += self.tokens[step_block]
        self.tokens[step_block] = []


def recorded_session(problem: str, config: SessionConfig, lm) -> tuple[Session, list[RecordingBackend]]:
    made: list[RecordingBackend] = []

    def factory(lm, config):
        made.append(RecordingBackend(local_backend(lm, config)))
        return made[-1]

    return Session(problem, config, lm=lm, backend_factory=factory), made


# ---- tiny random models (no tokenizer: one token per character) -----------------------------
@pytest.mark.parametrize("layout, mode", [("combined", "instant"), ("contiguous", "instant"),
                                          ("interleaved", "instant"), ("combined", "lagged")])
def test_tiny_model_session(layout, mode):
    protocol = ProtocolConfig(workers=3, layout=layout, max_steps=24, max_step_tokens=6, check_every=4)
    config = SessionConfig(protocol=protocol, sampling=SamplingParams(temperature=1.0, seed=1), mode=mode)
    session, made = recorded_session("What is 2 + 3?", config, tiny_model("llama"))
    events = list(session.events())
    result = session.result()
    backend = made[0]
    assert all(backend.length(b) == len(t) for b, t in backend.tokens.items())  # the engine agrees
    done = [e for e in events if isinstance(e, StepDone)]
    assert len(done) >= 3 and all(e.committed == get_layout(layout).commits for e in done)
    assert result.steps == 24 and result.reason == "budget"
    assert all(w.tokens == 24 - w.steps for w in result.workers)  # one sample dropped per step end
    assert [r.finished for r in result.transcript][: len(done)] == [True] * len(done)


def test_session_events_stream_once():
    config = SessionConfig(protocol=ProtocolConfig(workers=1, max_steps=3))
    session = Session("2 + 3?", config, lm=tiny_model("qwen2"))
    first = next(iter(session.events()))
    assert session.events() is session.events()
    result = session.result()  # drains the rest
    assert result.steps == 3 and type(first).__name__ == "Started"
    assert result.timings["wall_s"] >= result.timings["decode_s"] >= 0


# ---- the default model -----------------------------------------------------------------------
@pytest.fixture(scope="module")
def real_run(default_lm):
    protocol = ProtocolConfig(workers=2, max_steps=64, max_step_tokens=24, check_every=32, templates=NO_ANSWERS)
    config = SessionConfig(protocol=protocol, sampling=SamplingParams(temperature=0.6, top_p=0.95, seed=0))
    session, made = recorded_session(PROBLEM, config, default_lm)
    events = list(session.events())
    return session, made[0], events, session.result()


@pytest.mark.slow
def test_two_workers_run_and_commit(real_run, default_lm):
    session, backend, events, result = real_run
    assert result.steps == 64 and isinstance(events[-1], Finished)
    assert [w.name for w in result.workers] == ["Alice", "Bob"]
    assert all(w.text.strip() and w.tokens > 50 for w in result.workers)
    codec = TokenizerCodec(default_lm.tokenizer)
    common = codec.decode(backend.tokens[0])
    done = [e for e in events if isinstance(e, StepDone)]
    assert {e.worker for e in done} == {0, 1}
    for step in done:  # every finished step is in the common history, in commit order
        assert step.text in common
    assert common.index(done[0].text) < common.index(done[-1].text)
    assert all(backend.length(b) == len(t) for b, t in backend.tokens.items())
    assert sum(isinstance(e, Tick) for e in events) == 64
    clone = pickle.loads(pickle.dumps(session.program))  # what a distributed session ships to actors
    assert clone.prompt_ids == session.program.prompt_ids


@pytest.mark.slow
def test_transcript_exports(real_run):
    _, _, _, result = real_run
    data = json.loads(result.to_json())
    assert {"answer", "workers", "steps", "wall_s", "transcript", "timings"} <= set(data)
    assert [w["name"] for w in data["workers"]] == ["Alice", "Bob"]
    markdown = result.to_markdown()
    assert markdown.startswith("# Hogwild! session") and PROBLEM in markdown
    assert all(r.text.strip() in markdown for r in result.transcript)


def prefilled_blocks(program: Program, engine: HogwildEngine):
    """The session's block table, its prefill requests carried out on ``engine``."""
    steps = allocate_blocks(program, engine)
    try:
        while True:
            request = next(steps)
            engine.prefill(request.block, request.tokens, request.context)
    except StopIteration as done:
        return done.value


class BobProbe:
    """Bob's next-token logits after Alice finished one step and started another, on one engine
    whose prompt is encoded once (each probe truncates the blocks back to that state)."""

    def __init__(self, lm, layout: str | Layout) -> None:
        self.program = Program(PROBLEM, ProtocolConfig(workers=2, layout=layout),
                               TokenizerCodec(lm.tokenizer), lm.max_context)
        self.engine = HogwildEngine(lm)
        self.table = prefilled_blocks(self.program, self.engine)
        self.common = self.engine.length(self.table.common)

    def logits(self, alice_done: str, alice_now: str) -> torch.Tensor:
        store, table, encode = self.engine.store, self.table, self.program.codec.encode
        store.truncate(table.common, self.common)
        for worker in (0, 1):
            store.truncate(table.step(worker), 0)
        alice, bob = (view(self.program.layout, table, w) for w in (0, 1))
        self.engine.forward([(alice, encode("Alice (step 1): " + alice_done + "\n\n"))])
        if self.program.layout.commits:
            self.engine.commit(table.step(0), table.common)
        self.engine.forward([(alice, encode("Alice (step 2): " + alice_now))])
        return self.engine.forward([(bob, encode("Bob (step 1): So the number of apples is"))])[0]


@pytest.mark.slow
def test_workers_see_each_other(default_lm):
    done, other_done = "Each box has 4 apples, so 3 boxes hold 12.", "Each box has 9 apples, so 3 boxes hold 27."
    now, other_now = "After giving 5 away, 7 are left", "After giving 5 away, 22 are left"
    combined = BobProbe(default_lm, "combined")
    base = combined.logits(done, now)
    assert not torch.allclose(base, combined.logits(other_done, now), atol=1e-3)
    assert not torch.allclose(base, combined.logits(done, other_now), atol=1e-3)
    assert torch.equal(base, combined.logits(done, now))  # the probe itself is repeatable
    # interleaved: finished steps are shared, a step in progress is not
    interleaved = BobProbe(default_lm, "interleaved")
    shared = interleaved.logits(done, now)
    assert not torch.allclose(shared, interleaved.logits(other_done, now), atol=1e-3)
    assert torch.equal(shared, interleaved.logits(done, other_now))
    # a layout that hides Alice from Bob altogether: nothing she writes reaches him
    hidden = BobProbe(default_lm, Layout("hidden", lead=(), peer=(), own=("own_header", "step"), commits=False))
    assert torch.equal(hidden.logits(done, now), hidden.logits(other_done, other_now))


@pytest.mark.slow
def test_a_session_run_elsewhere_loads_no_weights_here(monkeypatch):
    """With a runner (Ray actors host the model) the driver used to load the whole model only to
    read its tokenizer and context length; now loading weights here fails the test."""
    import workers.model
    from workers.model_store import default_model_path

    default_model_path()  # pulled before the weights are made unloadable

    def no_weights(*args, **kwargs):
        raise AssertionError("the driver loaded model weights")

    monkeypatch.setattr(workers.model.AutoModelForCausalLM, "from_pretrained", no_weights)
    ran = []

    def runner(program, config):
        ran.append(program)
        yield from ()

    session = Session(PROBLEM, SessionConfig(model="default"), runner=runner)
    assert session.lm is None and session.program.max_context == 8192
    assert isinstance(session.program.codec, TokenizerCodec)
    assert list(session.events()) == [] and ran == [session.program]
