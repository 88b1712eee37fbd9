"""Rows of unrelated sessions in one forward (DESIGN.md §7): a block is scored only by the rows that
read it, so a session's logits do not depend on what another session's blocks hold (not even NaN),
and a step of S sessions scores about the sum of their views, not S times it."""

from __future__ import annotations

import pytest
import torch

from cache_service.kv_store import KVStore, PoolConfig
from cache_service.layout import View
from cache_service.planner import DIRECT_MIN_TOKENS, Mode, Row, plan_step
from kernels.rope import RopeTable
from workers.engine import HogwildEngine

from tests.conftest import tiny_model

NAN = float("nan")


# ---- isolation: NaN in one session's blocks leaves the other's logits bit for bit ---------------
def _session(engine: HogwildEngine, seed: int) -> tuple[list[int], list[View]]:
    """A prompt block and two workers' step blocks; combined views ``[prompt, peer, own]``; one
    step of both workers already written. Returns the session's blocks and its workers' views."""
    prompt, alice, bob = engine.new_block(), engine.new_block(), engine.new_block()
    engine.prefill(prompt, [(seed * 7 + i) % 100 + 3 for i in range(12)])
    views = [View.of(prompt, bob, alice), View.of(prompt, alice, bob)]
    engine.forward([(views[0], [seed + 5, seed + 6]), (views[1], [seed + 9])])
    return [prompt, alice, bob], views


def _joint_step(mode: str, direct_min: int, a_first: bool,
                poison: bool) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """Sessions A and B built alone, then one forward over both (4 rows, each session's rows
    together); with ``poison`` every slot of A's blocks (their whole pages) is NaN before it.
    Returns the step's all-token logits of A's rows and of B's rows."""
    engine = HogwildEngine(tiny_model("llama"), mode=mode, direct_min=direct_min, overlap_min=0,
                           pool=PoolConfig(tokens=1024, page_size=4))
    blocks_a, views_a = _session(engine, 1)
    _, views_b = _session(engine, 2)
    if poison:
        store = engine.store
        slots = [s for b in blocks_a for s in store.slots(b, 0, store.capacity_of(b))]
        store.pool[:, :, :, slots, :] = NAN
    rows_a = [(views_a[0], [40]), (views_a[1], [41, 42, 43])]
    rows_b = [(views_b[0], [50, 51]), (views_b[1], [52])]
    rows = rows_a + rows_b if a_first else rows_b + rows_a
    logits = engine.forward(rows, all_logits=True)
    mine_a, mine_b = (logits[:2], logits[2:]) if a_first else (logits[2:], logits[:2])
    return mine_a, mine_b


@pytest.mark.parametrize("a_first", [True, False])
@pytest.mark.parametrize("direct_min", [1, 8, DIRECT_MIN_TOKENS])  # all direct, prompts direct, all tail
@pytest.mark.parametrize("mode", ["instant", "lagged"])
def test_nan_in_one_session_does_not_reach_another(mode, direct_min, a_first, plan_spy):
    clean_a, clean_b = _joint_step(mode, direct_min, a_first, poison=False)
    joint = plan_spy[-1]
    poisoned_a, poisoned_b = _joint_step(mode, direct_min, a_first, poison=True)
    assert all(x.isnan().all() for x in poisoned_a)  # the poison reached every token of A
    assert all(torch.isfinite(x).all() for x in clean_a + clean_b)
    assert all(torch.equal(p, c) for p, c in zip(poisoned_b, clean_b))
    # the paths this case is about were taken
    lengths = sorted(c.length for c in joint.direct)
    if direct_min == DIRECT_MIN_TOKENS:
        assert not joint.direct and joint.tail is not None
    elif direct_min == 8:
        assert lengths == [12, 12] and joint.tail is not None  # the prompts
    else:
        assert joint.tail is None and len(joint.direct) == 6
    assert all(c.rows[1] - c.rows[0] <= 2 for c in joint.direct)


def test_null_slot_is_zero_never_free_and_survives_clear():
    store = KVStore(1, 2, 8, tokens=64, page_size=4)
    assert (store.pages, store.capacity, store.free_pages) == (16, 64, 16)
    assert store.null_slot == 64 and store.pool.shape[3] == 68
    blocks = [store.new_block(reserve=16) for _ in range(4)]  # every usable page
    assert store.free_pages == 0 and store.used_pages == 16
    assert store.null_slot not in {s for b in blocks for s in store.slots(b, 0, 16)}
    store.pool[:, :, :, store.null_slot] = NAN
    store.clear()
    assert store.free_pages == 16 and not store.pool[:, :, :, store.null_slot:].any()


# ---- structure: each direct chunk is scored by its own session's rows only ----------------------
HEAD_DIM = 8


def _rope() -> RopeTable:
    return RopeTable.from_inv_freq(1.0 / 10000.0 ** (torch.arange(0, HEAD_DIM, 2) / HEAD_DIM), HEAD_DIM)


def _sessions(store: KVStore, sessions: int) -> tuple[list[Row], dict[int, int]]:
    """``sessions`` sessions of a prompt (40 + 10 s tokens) and two workers' steps (3 tokens each),
    combined views, one new token per row; rows session by session. Returns the rows and the owning
    session of every block."""
    rows, owner = [], {}
    for s in range(sessions):
        prompt, alice, bob = (store.new_block(80) for _ in range(3))
        store.append(prompt, torch.randn(1, 2, 2, 40 + 10 * s, HEAD_DIM))
        for block in (alice, bob):
            store.append(block, torch.randn(1, 2, 2, 3, HEAD_DIM))
        owner.update({prompt: s, alice: s, bob: s})
        rows += [Row(View.of(prompt, bob, alice), 1), Row(View.of(prompt, alice, bob), 1)]
    return rows, owner


@pytest.mark.parametrize("mode", [Mode.INSTANT, Mode.LAGGED])
@pytest.mark.parametrize("direct_min", [1, 16])
def test_direct_chunks_cover_only_their_sessions_rows(mode, direct_min):
    sessions = 4
    store = KVStore(1, 2, HEAD_DIM, tokens=2048, page_size=4)
    rows, owner = _sessions(store, sessions)
    slot_owner = {s: owner[b] for b in owner for s in store.slots(b, 0, store.capacity_of(b))}
    plan = plan_step(store, rows, mode, _rope(), group=2, direct_min=direct_min).plan
    assert len(plan.direct) == (3 if direct_min == 1 else 1) * sessions  # each block one chunk
    for chunk in plan.direct:
        (session,) = {slot_owner[s] for s in chunk.slots()}
        assert chunk.rows == (2 * session, 2 * session + 2)
    new = 2 if mode is Mode.INSTANT else 1  # the own token, and the peer's when instant
    views = [sum(store.length(b) for b in row.view.blocks) + new for row in rows]
    scored = sum((c.rows[1] - c.rows[0]) * c.length for c in plan.direct)
    scored += 0 if plan.tail is None else plan.rows * plan.tail.size
    if direct_min == 1 and mode is Mode.INSTANT:
        assert scored == sum(views)  # every row scores exactly its view
    assert scored < 1.2 * sum(views)  # (scored by all rows it would be ~sessions times that)


def test_readers_in_between_are_masked_and_lengths_are_local():
    """Rows [A, B, A]: A's prompt is scored by rows 0..2, row 1 (B) fully masked. Lagged on two
    devices, a block whose writer is remote is read up to what the local readers see (its new
    entries are not written here yet)."""
    store = KVStore(1, 2, HEAD_DIM, tokens=1024, page_size=4)
    (a0, a1, b0, _), _ = _sessions(store, 2)
    plan = plan_step(store, [a0, b0, a1], Mode.INSTANT, _rope(), group=2, direct_min=1).plan
    prompt_a = next(c for c in plan.direct if c.length == 40)
    assert prompt_a.rows == (0, 3)
    mask = prompt_a.mask.view(3, -1, 40)
    assert mask[1].eq(float("-inf")).all() and mask[[0, 2]].eq(0).all()

    rows = [a0, a1]  # a0 writes alice, a1 (remote) writes bob
    for target_len, local in ((3, range(0, 1)), (4, range(0, 2))):
        plan = plan_step(store, rows, Mode.LAGGED, _rope(), group=2, direct_min=1, local=local).plan
        bob = a1.view.target
        (chunk,) = [c for c in plan.direct if set(c.slots()) <= set(store.slots(bob, 0, 80))]
        assert chunk.length == target_len  # 3 before the step; its writer (row 1) sees 4
        assert chunk.rows == (0, len(local))
