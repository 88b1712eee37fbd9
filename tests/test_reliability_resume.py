"""Save a session, stop, resume it: the events (and so the result) equal an uninterrupted run's,
greedy and seeded, instant and lagged; in a fresh process through ``hogwild run --resume``."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import time

import pytest

from cache_service.snapshot import SnapshotError
from cluster.events import Tick
from cluster.protocol import ProtocolConfig
from cluster.resume import SavedSession
from cluster.session import Session, SessionConfig
from tests.conftest import tiny_model
from workers.sampling import SamplingParams

PROBLEM = "What is 2 + 3?"


def config(sampling: SamplingParams, mode: str, max_steps: int = 30) -> SessionConfig:
    protocol = ProtocolConfig(workers=2, max_steps=max_steps, max_step_tokens=6, check_every=5)
    return SessionConfig(protocol=protocol, sampling=sampling, model="tiny", mode=mode)


def stopped_at(session: SavedSession, tick: int) -> list:
    """Iterate until the Tick of step ``tick``, then stop (as a killed process would)."""
    events = []
    for event in session.events():
        events.append(event)
        if isinstance(event, Tick) and event.step == tick:
            break
    return events


@pytest.mark.parametrize("sampling, mode", [(SamplingParams(), "instant"),
                                            (SamplingParams(temperature=0.9, top_p=0.95, seed=5), "lagged")],
                         ids=["greedy-instant", "seeded-lagged"])
def test_a_resumed_session_equals_an_uninterrupted_one(tmp_path, sampling, mode):
    lm = tiny_model("llama")
    want = list(Session(PROBLEM, config(sampling, mode), lm=lm).events())
    path = tmp_path / "session.hwkv"
    first = SavedSession.new(PROBLEM, config(sampling, mode), save_to=path, every=4, lm=lm)
    stopped_at(first, 10)  # the file holds step 8
    resumed = SavedSession.resume(path, lm=lm)
    assert resumed.resumed_at == 8
    got = list(resumed.events())
    assert got == want
    result, uninterrupted = resumed.result(), Session(PROBLEM, config(sampling, mode), lm=lm).result()
    assert (result.answer, result.workers, result.transcript, result.steps) == (
        uninterrupted.answer, uninterrupted.workers, uninterrupted.transcript, uninterrupted.steps)


def test_a_file_that_is_no_saved_session_is_refused(tmp_path):
    path = tmp_path / "other.hwkv"
    path.write_bytes(b"not a snapshot")
    with pytest.raises(SnapshotError, match="not a hogwild snapshot"):
        SavedSession.resume(path, lm=tiny_model("llama"))


def hogwild(*args: str, **popen) -> subprocess.Popen:
    command = [shutil.which("hogwild")] if shutil.which("hogwild") else [sys.executable, "-m", "deploy.cli"]
    return subprocess.Popen(command + list(args), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **popen)


def _killed_after_first_save_then_resumed(tmp_path, args: list[str], resume: list[str]) -> None:
    """``hogwild run ... --save`` is killed after its first save; ``hogwild run --resume`` (with
    ``resume``) in a new process prints the result of an uninterrupted run with ``args``."""
    reference = hogwild("run", PROBLEM, *args)
    want, err = reference.communicate(timeout=300)
    assert reference.returncode == 0, err
    path = tmp_path / "s.hwkv"
    saving = hogwild("run", PROBLEM, *args, "--save", str(path), "--save-every", "8")
    deadline = time.monotonic() + 300
    while not path.exists() and saving.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    saving.kill()  # a local Ray that process started goes with it, and its actors
    saving.communicate()
    assert path.exists(), "the session was never saved"
    resumed = hogwild("run", "--resume", str(path), "--json", *resume)
    got, err = resumed.communicate(timeout=300)
    assert resumed.returncode == 0, err
    want, got = json.loads(want), json.loads(got)
    for key in ("answer", "reason", "workers", "transcript", "steps"):
        assert got[key] == want[key], key


@pytest.mark.slow
@pytest.mark.parametrize("sampling", [["--temperature", "0"], ["--temperature", "0.8", "--seed", "3"]],
                         ids=["greedy", "seeded"])
def test_resume_in_a_fresh_process_through_the_cli(tmp_path, sampling):
    _killed_after_first_save_then_resumed(tmp_path, ["--max-steps", "40", "--json", *sampling], [])


@pytest.mark.slow
@pytest.mark.ray
def test_resume_on_actors_in_a_fresh_process_through_the_cli(tmp_path):
    """The same on 2 actors (seeded), saved and resumed in separate processes."""
    args = ["--max-steps", "40", "--json", "--temperature", "0.8", "--seed", "3", "--actors", "2"]
    _killed_after_first_save_then_resumed(tmp_path, args, ["--actors", "2"])


@pytest.mark.parametrize("args, match", [
    (["run", "2+2?", "--actors", "-1", "--save", "s.hwkv"], "--actors must be >= 0"),
    (["run", "2+2?", "--actors", "2", "--resume", "s.hwkv"], "leave out the problem"),
    (["run", "2+2?", "--resume", "s.hwkv"], "leave out the problem"),
    (["run", "--resume", "/no/such/file.hwkv"], "cannot read the snapshot"),
    (["run", "2+2?", "--save", "s.hwkv", "--save-every", "0"], "--save-every must be >= 1"),
])
def test_save_and_resume_mistakes_are_one_line(args, match, capsys):
    from cluster.cli import main
    from tests.test_cli import assert_one_line_error

    assert_one_line_error(main(args), capsys.readouterr().err, match)


@pytest.mark.parametrize("sampling, mode", [(SamplingParams(), "instant"),
                                            (SamplingParams(temperature=0.9, seed=3), "lagged")],
                         ids=["greedy-instant", "seeded-lagged"])
def test_a_host_adopts_a_session_restored_from_a_snapshot(sampling, mode):
    """What a gang does after a recovery, in one process: a session's blocks and run state taken at
    a decode-step boundary, restored into another engine and adopted by another host, go on
    exactly as the uninterrupted session."""
    from cache_service.kv_store import PoolConfig
    from cache_service.snapshot import KVSnapshot, capture, restore
    from cluster.gang import _Tracked
    from cluster.host import SessionHost
    from workers.engine import HogwildEngine

    lm, pool = tiny_model("llama"), PoolConfig(tokens=1 << 13)
    program = Session(PROBLEM, config(sampling, mode), lm=lm).program
    want = list(SessionHost(HogwildEngine(lm, pool=pool)).submit(program, sampling, mode).events())
    first = SessionHost(HogwildEngine(lm, pool=pool))
    handle = first.submit(_Tracked(program), sampling, mode)
    while not first.live or first.live[0].handle.program.run.steps < 9:
        first.step()
    got = handle.poll()
    split = len(got)
    live = first.live[0]
    assert live.handle.program.run.boundary
    state = live.handle.program.run.state()
    rng = {w: g.get_state().numpy().tobytes() for w, g in enumerate(live.generators)}
    store = first.engine.store
    blob = KVSnapshot(capture(store, live.blocks.owned), max(store.blocks) + 1, {}).to_bytes()
    second = SessionHost(HogwildEngine(lm, pool=pool))
    restore(second.engine.store, KVSnapshot.from_bytes(blob))
    adopted = second.adopt(_Tracked(program), state, live.blocks.owned, sampling, mode, rng)
    got += list(adopted.events())
    assert got == want
    assert [e.step for e in want[:split] if isinstance(e, Tick)][-1] == 9  # it was split mid-session
