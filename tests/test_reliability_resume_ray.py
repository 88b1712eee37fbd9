"""Sessions on Ray worker actors saved and resumed (``hogwild run --actors N --save/--resume``): a
session saved from its gang's checkpoints, stopped (its gang removed) and resumed on new actors
gives the events of an uninterrupted run, greedy and seeded; the file format is the in-process
one, so each kind resumes the other's files."""

from __future__ import annotations

import pytest

from cluster.events import Tick
from cluster.protocol import ProtocolConfig
from cluster.resume import RaySavedSession, SavedSession
from cluster.session import Session, SessionConfig
from tests.conftest import tiny_model
from workers.actor import ModelSpec
from workers.model import tiny_config
from workers.sampling import SamplingParams

pytestmark = pytest.mark.ray

PROBLEM = "What is 2 + 3?"
MODEL = ModelSpec(tiny_config("llama"), dtype="float32")  # the same weights as tiny_model("llama")


def config(sampling: SamplingParams, mode: str) -> SessionConfig:
    protocol = ProtocolConfig(workers=2, max_steps=40, max_step_tokens=6, check_every=5)
    return SessionConfig(protocol=protocol, sampling=sampling, model="tiny", mode=mode)


def test_saved_on_actors_stopped_and_resumed_on_new_actors(tmp_path, no_leaks):
    lm, sampling, mode = tiny_model("llama"), SamplingParams(temperature=0.9, top_p=0.95, seed=5), "lagged"
    want = list(Session(PROBLEM, config(sampling, mode), lm=lm).events())
    path = tmp_path / "session.hwkv"
    first = RaySavedSession.new(PROBLEM, config(sampling, mode), 2, save_to=path, every=8, lm=lm, model=MODEL)
    for event in first.events():
        if isinstance(event, Tick) and event.step == 28:
            break
    first.close()  # stop: the gang is removed
    assert path.exists(), "the session was never saved"
    resumed = RaySavedSession.resume(path, 2, lm=lm, model=MODEL)
    assert 8 <= resumed.resumed_at <= 28
    assert list(resumed.events()) == want
    assert list(SavedSession.resume(path, lm=lm).events()) == want  # the same file, in this process


def test_an_in_process_save_resumes_on_actors(tmp_path, no_leaks):
    lm, sampling = tiny_model("llama"), SamplingParams()  # greedy
    want = list(Session(PROBLEM, config(sampling, "instant"), lm=lm).events())
    path = tmp_path / "session.hwkv"
    first = SavedSession.new(PROBLEM, config(sampling, "instant"), save_to=path, every=6, lm=lm)
    for event in first.events():
        if isinstance(event, Tick) and event.step == 14:
            break
    resumed = RaySavedSession.resume(path, 2, lm=lm, model=MODEL)
    assert resumed.resumed_at == 12
    assert list(resumed.events()) == want
