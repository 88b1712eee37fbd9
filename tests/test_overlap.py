"""Overlap of the instant K/V exchange with attention over the shared history.

The planner puts the direct chunks nobody writes this step ("stable") first; the kernel scores them
before ``arrive`` stores the step's new entries (received from other devices), and reads no new
entry before that. These tests poison what must not matter and require bit-identical results.
"""

from __future__ import annotations

import pytest
import torch

from cache_service.kv_store import KVStore
from cache_service.layout import View
from cache_service.planner import Mode, Row, plan_step
from kernels.attention import AttentionPlan, block_attention, write_new_entries
from kernels.rope import RopeTable
from workers.engine import HogwildEngine

from tests.conftest import tiny_model

KV_HEADS, GROUP, HEAD_DIM = 2, 2, 8


def _rope() -> RopeTable:
    return RopeTable.from_inv_freq(1.0 / 10000.0 ** (torch.arange(0, HEAD_DIM, 2) / HEAD_DIM), HEAD_DIM)


def _randn(*shape: int, seed: int) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def _written(plan: AttentionPlan) -> set[int]:
    return set(plan.write_slots.tolist())


def _stable_slots(plan: AttentionPlan) -> list[int]:
    return [s for c in plan.direct[: plan.stable] for s in c.slots()]


def _two_workers(store: KVStore, tokens: int) -> list[Row]:
    """Two workers whose views put the peer's step *before* the shared history (so only the
    planner's ordering brings the history first); every block is read in place (``direct_min``
    4); ``tokens`` new tokens per row."""
    history, *own = (store.new_block(64) for _ in range(3))
    store.append(history, _randn(1, 2, KV_HEADS, 40, HEAD_DIM, seed=1))
    for k, block in enumerate(own):
        store.append(block, _randn(1, 2, KV_HEADS, 6, HEAD_DIM, seed=2 + k))
    for row in range(2):
        store.reserve(own[row], tokens)
    return [Row(View.of(own[1 - w], history, own[w]), tokens) for w in range(2)]


def _plan(store: KVStore, tokens: int, overlap_min: int = 0) -> AttentionPlan:
    rows = _two_workers(store, tokens)
    return plan_step(store, rows, Mode.INSTANT, _rope(), group=GROUP, direct_min=4, overlap_min=overlap_min).plan


@pytest.mark.parametrize("tokens", [1, 3])
def test_planner_puts_unwritten_direct_chunks_first(tokens):
    store = KVStore(1, KV_HEADS, HEAD_DIM, tokens=256)
    plan = _plan(store, tokens)
    assert plan.stable == 1 and len(plan.direct) == 3  # the history, then the two step blocks
    assert plan.direct[0].length == 40
    assert all(chunk.rows == (0, 2) for chunk in plan.direct)  # both workers read every block
    assert not _written(plan) & set(_stable_slots(plan))
    for chunk in plan.direct[plan.stable :]:
        assert _written(plan) & set(chunk.slots())


def test_a_short_history_is_not_read_early():
    """``overlap_min``: the history (40 tokens) is read early from 40 tokens on, not from 41."""
    stable = [_plan(KVStore(1, KV_HEADS, HEAD_DIM, tokens=256), 1, m).stable for m in (40, 41)]
    assert stable == [1, 0]


@pytest.mark.parametrize("tokens", [1, 3])
def test_stable_chunks_are_scored_before_the_new_entries_arrive(tokens):
    """Poison the new entries' slots before the call and the stable keys inside ``arrive``: the
    result is bit-identical to writing the entries first, so nothing scored before ``arrive`` read a
    new entry and every stable score was taken before it."""
    store = KVStore(1, KV_HEADS, HEAD_DIM, tokens=256)
    plan = _plan(store, tokens)
    q = _randn(1, KV_HEADS * GROUP, 2 * tokens, HEAD_DIM, seed=10)  # packed: row 0's tokens, then row 1's
    k, v = _randn(2, KV_HEADS, tokens, HEAD_DIM, seed=11), _randn(2, KV_HEADS, tokens, HEAD_DIM, seed=12)

    kv = store.pool[0].clone()
    write_new_entries(kv, k, v, plan)
    want = block_attention(q.clone(), kv, plan, 0.3)

    kv = store.pool[0].clone()
    kv[:, :, plan.write_slots] = float("nan")
    arrivals = []

    def arrive() -> None:
        write_new_entries(kv, k, v, plan)
        kv[0, :, _stable_slots(plan)] = float("nan")  # keys only: values are still read after
        arrivals.append(True)

    got = block_attention(q.clone(), kv, plan, 0.3, arrive)
    assert arrivals == [True]
    assert torch.equal(got, want)


def test_engine_with_a_deferred_exchange_equals_the_engine():
    """The engine's hook stores what a deferred exchange hands over, one wait per layer; the logits
    equal a step without exchange bit for bit (a prompt long enough to be read in place)."""
    lm = tiny_model("llama")
    plain, deferred = HogwildEngine(lm, direct_min=16), HogwildEngine(lm, direct_min=16, overlap_min=0)
    waits = []

    def exchange(layer: int, k: torch.Tensor, v: torch.Tensor):
        def received():
            waits.append(layer)
            return k, v

        return received

    prompt = list(range(3, 43))
    logits = []
    for engine, hook in ((plain, None), (deferred, exchange)):
        common, a, b = engine.new_block(64), engine.new_block(), engine.new_block()
        engine.prefill(common, prompt)
        rows = [(View.of(common, b, a), [50, 51]), (View.of(common, a, b), [60])]
        engine.forward(rows, exchange=hook)
        logits.append(engine.forward([(View.of(common, b, a), [52]), (View.of(common, a, b), [61, 62])],
                                     exchange=hook))
    assert waits == list(range(lm.config.num_hidden_layers)) * 2
    assert torch.equal(logits[0], logits[1])
