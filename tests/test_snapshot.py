"""Snapshots (msgpack header + raw tensor bytes, never pickle) and the CacheService: round trips,
malformed input, and save -> restore into fresh actors -> continue == an uninterrupted run."""

from __future__ import annotations

import pickle

import pytest
import torch

from cache_service.service import CacheService, Committed, Wrote
from cache_service.snapshot import (MAGIC, BlockState, KVSnapshot, SnapshotError, capture, decode, encode,
                                    restore)
from cluster.ray_session import RayConfig, RaySession
from workers.engine import HogwildEngine
from workers.model import load_model

from tests.test_distributed import (TINY, LocalCache, RayCache, Script, assert_same_logits,  # noqa: F401
                                    no_leaks, ray_cluster, tiny_spec)


# ---- the codec -----------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.int64])
def test_tensors_round_trip_bit_exact(dtype):
    x = (torch.randn(2, 3, 5, generator=torch.Generator().manual_seed(0)) * 100).to(dtype)
    tensors, meta = decode(encode({"x": x, "empty": x[:, :, :0], "scalar": x[0, 0, 0]}, {"k": [1, "a"]}))
    assert meta == {"k": [1, "a"]}
    assert tensors["x"].dtype == dtype and torch.equal(tensors["x"], x)
    assert tensors["empty"].shape == (2, 3, 0) and tensors["scalar"].shape == ()
    assert torch.equal(tensors["scalar"], x[0, 0, 0])


def test_malformed_snapshots_are_refused_without_running_code():
    blob = encode({"x": torch.ones(4)}, {})
    with pytest.raises(SnapshotError, match="bad magic"):
        decode(pickle.dumps({"x": torch.ones(4)}))
    with pytest.raises(SnapshotError, match="truncated"):
        decode(blob[:-3])
    with pytest.raises(SnapshotError, match="unknown dtype"):
        decode(blob.replace(b"float32", b"pickle!"))
    with pytest.raises(SnapshotError, match="corrupt|version"):
        decode(MAGIC + b"\x05\x00\x00\x00" + b"\xc1" * 5)
    with pytest.raises(SnapshotError, match="cannot read"):
        KVSnapshot.load("/nonexistent/snapshot.hwkv")


# ---- cache snapshots on one engine ---------------------------------------------------------------
def test_restored_engine_continues_like_an_uninterrupted_one():
    lm = load_model(TINY, dtype=torch.float32, device="cpu")
    want = Script().run(LocalCache("instant", lm))

    first, script = LocalCache("instant", lm), Script()
    script.setup(first)
    got = script.first(first)
    blob = KVSnapshot(capture(first.engine.store), max(first.engine.store.blocks) + 1, {"m": 1}).to_bytes()
    second = LocalCache("instant", lm)
    restore(second.engine.store, KVSnapshot.from_bytes(blob))
    got += script.second(second)
    assert_same_logits(got, want, atol=0)  # same computation, same bits


def test_restore_refuses_another_model_shape():
    lm = load_model(TINY, dtype=torch.float32, device="cpu")
    wrong = KVSnapshot({0: BlockState(torch.zeros(2, 2, 3, 4, 16), 16)}, 1)
    with pytest.raises(SnapshotError, match="same model and dtype"):
        restore(HogwildEngine(lm).store, wrong)


# ---- the CacheService (as a plain object) --------------------------------------------------------
def entries(n: int, value: float) -> torch.Tensor:
    return torch.full((2, 2, 2, n, 4), value)


def test_service_mirrors_history_and_logs_tokens():
    service = CacheService()
    service.apply([Wrote(0, [1, 2, 3], entries(3, 1.0)), Wrote(1, [7]), Wrote(1, [8])])
    service.apply([Committed(1, 0, entries(2, 2.0)), Wrote(1, [9])])
    assert service.block_tokens(0) == [1, 2, 3, 7, 8] and service.block_tokens(1) == [9]
    assert service.mirrored() == {0: 5}
    live = {1: BlockState(entries(1, 3.0), 16)}
    snap = KVSnapshot.from_bytes(service.snapshot(live, {0: (5, 64), 1: (1, 16)}, 2, {"model": "m"}))
    assert snap.blocks[0].capacity == 64 and snap.blocks[0].tokens == [1, 2, 3, 7, 8]
    assert torch.equal(snap.blocks[0].entries[:, :, :, 3:], entries(2, 2.0))
    assert snap.meta == {"model": "m"} and snap.next_block == 2
    with pytest.raises(SnapshotError, match="neither mirrored"):
        service.snapshot({}, {0: (5, 64), 1: (1, 16)}, 2, {})
    with pytest.raises(SnapshotError, match="sync the worker"):
        service.snapshot(live, {0: (6, 64), 1: (1, 16)}, 2, {})


# ---- save from one session, restore into fresh actors, continue ----------------------------------
@pytest.mark.ray
def test_snapshot_round_trip_across_sessions(no_leaks, tmp_path):
    """Save after the first half on 2+1 actors; fresh 1+2 actors restore and run the second half
    (instant, then lagged in the same actors: ``restore`` rebuilds every cache from a file)."""
    lm = load_model(TINY, dtype=torch.float32, device="cpu")
    modes = ("instant", "lagged")
    want = {mode: Script().run(LocalCache(mode, lm)) for mode in modes}
    scripts, got = {mode: Script() for mode in modes}, {}
    with RaySession(RayConfig((2, 1)), tiny_spec()) as session:
        for mode in modes:
            session.call("reset", mode)
            scripts[mode].setup(RayCache(session))
            got[mode] = scripts[mode].first(RayCache(session))
            session.save(tmp_path / f"{mode}.hwkv")
    saved = KVSnapshot.load(tmp_path / "lagged.hwkv")
    assert (tmp_path / "lagged.hwkv").read_bytes().startswith(MAGIC) and saved.meta["mode"] == "lagged"
    assert saved.blocks[scripts["lagged"].common].tokens == list(range(5, 29))
    assert saved.blocks[scripts["lagged"].steps[0]].tokens == [30, 31, 32, 33, 34]
    with RaySession(RayConfig((1, 2)), tiny_spec(), snapshot=tmp_path / "instant.hwkv") as session:
        got["instant"] += scripts["instant"].second(RayCache(session))
        session.restore(tmp_path / "lagged.hwkv", mode="lagged")
        got["lagged"] += scripts["lagged"].second(RayCache(session))
    for mode in modes:
        assert_same_logits(got[mode], want[mode])


# ---- the service stays cheap and holds the run state ----------------------------------------------
def test_service_appends_chunks_and_concatenates_once_on_snapshot():
    """Commits append a chunk (no copy of the history: the first chunk is never moved); a snapshot
    concatenates once and keeps the result, and equals the history appended."""
    service = CacheService()
    service.apply([Wrote(0, [1, 2], entries(2, 0.0))])
    first = service.chunks[0][0].data_ptr()
    for step in range(1, 40):
        service.apply([Wrote(1, [step]), Committed(1, 0, entries(1, float(step)))])
        assert service.chunks[0][0].data_ptr() == first and len(service.chunks[0]) == step + 1
    assert service.mirrored() == {0: 41}
    snap = KVSnapshot.from_bytes(service.snapshot({1: BlockState(entries(0, 0.0), 8)}, {0: (41, 64), 1: (0, 8)},
                                                  2, {}))
    want = torch.cat([entries(2, 0.0)] + [entries(1, float(s)) for s in range(1, 40)], dim=3)
    assert torch.equal(snap.blocks[0].entries, want) and len(service.chunks[0]) == 1
    assert snap.blocks[0].tokens == [1, 2, *range(1, 40)]


def test_the_run_state_travels_in_snapshots():
    from cache_service.service import Progress, RunState

    rng = {0: torch.Generator().manual_seed(3).get_state().numpy().tobytes(), 1: b"\x00\x01"}
    state = RunState(17, {"table": [0, 1, 2], "workers": [{"step": 2, "feed": [5]}]}, rng)
    service = CacheService()
    service.apply([Wrote(0, [1], entries(1, 1.0)), Progress(state.to_dict())])
    blob = service.snapshot({}, {0: (1, 8)}, 1, {"model": "m"})
    restored = KVSnapshot.from_bytes(blob)
    assert RunState.from_dict(restored.meta["run"]) == state
    assert restored.meta["model"] == "m"
    fresh = CacheService()
    fresh.load(blob)
    assert fresh.run_state() == restored.meta["run"] and fresh.mirrored() == {0: 1}
    with pytest.raises(SnapshotError, match="run state is malformed"):
        RunState.from_dict({"steps": 1})
