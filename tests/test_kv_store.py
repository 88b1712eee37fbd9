"""KVStore: amortised growth, commits (append_block), accounting and errors; View validation."""

from __future__ import annotations

import math

import pytest
import torch

from cache_service.errors import HogwildError, LayoutError
from cache_service.kv_store import MIN_BLOCK_CAPACITY, KVStore
from cache_service.layout import View
from kernels.rope import RopeTable, rotate_by

LAYERS, KV_HEADS, HEAD_DIM = 2, 2, 8


def _store(capacity: int = 64, dtype=torch.float32) -> KVStore:
    return KVStore(LAYERS, KV_HEADS, HEAD_DIM, capacity=capacity, dtype=dtype)


def _entries(n: int, seed: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(LAYERS, 2, KV_HEADS, n, HEAD_DIM, generator=generator)


def _table() -> RopeTable:
    return RopeTable.from_inv_freq(1.0 / 10000.0 ** (torch.arange(0, HEAD_DIM, 2) / HEAD_DIM), HEAD_DIM)


def _token(value: float) -> torch.Tensor:
    return torch.full((LAYERS, 2, KV_HEADS, 1, HEAD_DIM), value)


def test_new_store_and_blocks():
    store = _store()
    a, b = store.new_block(), store.new_block(reserve=100)
    assert a != b
    assert store.length(a) == store.length(b) == 0
    assert store.read(a).shape == (LAYERS, 2, KV_HEADS, 0, HEAD_DIM)
    assert store.span(b).capacity >= 100
    assert store.span(a).capacity >= MIN_BLOCK_CAPACITY
    assert store.nbytes() == 0


def test_append_and_read_round_trip():
    store = _store()
    block = store.new_block()
    first, second = _entries(5, 0), _entries(3, 1)
    store.append(block, first)
    store.append(block, second)
    assert store.length(block) == 8
    assert torch.equal(store.read(block), torch.cat((first, second), dim=3))


def test_amortised_growth_interleaved_blocks():
    """One token at a time into interleaved blocks: exact contents, logarithmic reallocations."""
    store = _store(capacity=64)
    blocks = [store.new_block() for _ in range(4)]
    steps = 1500
    arena, reallocations = store.arena, 0
    moves = {b: 0 for b in blocks}
    for t in range(steps):
        for b in blocks:
            start = store.span(b).start
            store.append(b, _token(t * 10.0 + b))
            moves[b] += store.span(b).start != start
            if store.arena is not arena:
                reallocations += 1
                arena = store.arena
    total = steps * len(blocks)
    # the arena at least doubles each time: log2(6000 / 64) ~ 6.6
    assert 1 <= reallocations <= math.ceil(math.log2(total / 64)) + 2, reallocations
    # each block at least doubles when it moves: log2(1500 / 16) ~ 6.6 (not linear in tokens)
    assert max(moves.values()) <= math.ceil(math.log2(steps / MIN_BLOCK_CAPACITY)) + 2, moves
    expected = torch.arange(steps, dtype=torch.float32) * 10.0
    for b in blocks:
        assert store.length(b) == steps
        held = store.read(b)
        assert torch.equal(held, (expected + b)[None, None, None, :, None].expand_as(held))


def test_growth_preserves_contents_with_free_blocks_and_random_sizes():
    store = _store(capacity=32)
    generator = torch.Generator().manual_seed(0)
    blocks = {store.new_block(): [] for _ in range(3)}
    for i in range(200):
        b = list(blocks)[int(torch.randint(len(blocks), (1,), generator=generator))]
        n = int(torch.randint(1, 9, (1,), generator=generator))
        chunk = _entries(n, i)
        store.append(b, chunk)
        blocks[b].append(chunk)
        if i == 80:  # free one block in the middle of the run; the others must be unaffected
            gone = list(blocks)[0]
            store.free(gone)
            del blocks[gone]
            blocks[store.new_block()] = []
    for b, chunks in blocks.items():
        assert chunks, "every block got tokens"
        assert torch.equal(store.read(b), torch.cat(chunks, dim=3))


@pytest.mark.parametrize("capacity", [16, 4096])  # 16: the commit forces blocks to move/compact
def test_append_block_rotates_keys_once_and_keeps_values(capacity):
    store, table = _store(capacity=capacity), _table()
    common, step, other = store.new_block(), store.new_block(), store.new_block()
    prefix, tail, bystander = _entries(13, 0), _entries(9, 1), _entries(4, 2)
    store.append(common, prefix)
    store.append(step, tail)
    store.append(other, bystander)
    store.append_block(step, common, table)
    assert store.length(step) == 0 and store.read(step).shape[3] == 0
    assert store.length(common) == 22
    held = store.read(common)
    assert torch.equal(held[:, :, :, :13], prefix)
    assert torch.equal(held[:, 1, :, 13:], tail[:, 1])  # values unchanged
    torch.testing.assert_close(held[:, 0, :, 13:], rotate_by(tail[:, 0], torch.tensor(13), table))
    assert torch.equal(store.read(other), bystander)
    # the step block is reusable after the commit
    again = _entries(2, 3)
    store.append(step, again)
    assert torch.equal(store.read(step), again)


def test_append_block_twice_rotates_by_each_destination_length():
    store, table = _store(), _table()
    common, step = store.new_block(), store.new_block()
    store.append(common, _entries(5, 0))
    first, second = _entries(3, 1), _entries(4, 2)
    store.append(step, first)
    store.append_block(step, common, table)
    store.append(step, second)
    store.append_block(step, common, table)
    held = store.read(common)
    torch.testing.assert_close(held[:, 0, :, 5:8], rotate_by(first[:, 0], torch.tensor(5), table))
    torch.testing.assert_close(held[:, 0, :, 8:12], rotate_by(second[:, 0], torch.tensor(8), table))


def test_append_block_into_empty_destination_is_a_copy():
    store, table = _store(), _table()
    dst, src = store.new_block(), store.new_block()
    entries = _entries(6, 0)
    store.append(src, entries)
    store.append_block(src, dst, table)
    torch.testing.assert_close(store.read(dst), entries, atol=0, rtol=0)


def test_append_block_to_itself_is_an_error():
    store = _store()
    block = store.new_block()
    with pytest.raises(LayoutError):
        store.append_block(block, block, _table())


def test_nbytes_counts_held_tokens():
    store = _store(capacity=1024)
    per_token = LAYERS * 2 * KV_HEADS * HEAD_DIM * 4
    a, b = store.new_block(reserve=200), store.new_block()
    store.append(a, _entries(7, 0))
    store.append(b, _entries(3, 1))
    assert store.nbytes() == 10 * per_token
    store.truncate(a, 2)
    assert store.nbytes() == 5 * per_token
    store.append_block(b, a, _table())
    assert store.nbytes() == 5 * per_token
    half = KVStore(LAYERS, KV_HEADS, HEAD_DIM, capacity=64, dtype=torch.bfloat16)
    c = half.new_block()
    half.append(c, _entries(4, 2).to(torch.bfloat16))
    assert half.nbytes() == 4 * per_token // 2


def test_truncate():
    store = _store()
    block = store.new_block()
    entries = _entries(6, 0)
    store.append(block, entries)
    store.truncate(block, 4)
    assert torch.equal(store.read(block), entries[:, :, :, :4])
    store.append(block, entries[:, :, :, 5:])
    assert torch.equal(store.read(block)[:, :, :, 4], entries[:, :, :, 5])
    with pytest.raises(LayoutError):
        store.truncate(block, 6)
    with pytest.raises(LayoutError):
        store.truncate(block, -1)


@pytest.mark.parametrize(
    "operation",
    [
        lambda s, b: s.length(99),
        lambda s, b: s.read(99),
        lambda s, b: s.append(99, _entries(1, 0)),
        lambda s, b: s.append_block(99, b, _table()),
        lambda s, b: s.append_block(b, 99, _table()),
        lambda s, b: s.truncate(99, 0),
        lambda s, b: s.reserve(99, 1),
        lambda s, b: s.slots(99, 0, 1),
    ],
    ids=["length", "read", "append", "append_block_src", "append_block_dst", "truncate", "reserve", "slots"],
)
def test_unknown_block_is_a_layout_error(operation):
    store = _store()
    block = store.new_block()
    with pytest.raises(LayoutError, match="99"):
        operation(store, block)
    assert issubclass(LayoutError, HogwildError)


def test_free_unknown_block_is_a_layout_error():
    store = _store()
    block = store.new_block()
    store.free(block)
    with pytest.raises(LayoutError):
        store.free(block)


def test_freed_block_is_gone_and_ids_are_not_reused():
    store = _store()
    a = store.new_block()
    store.free(a)
    with pytest.raises(LayoutError):
        store.length(a)
    assert store.new_block() != a


# ---- View ----------------------------------------------------------------------------------------
def test_view_of_targets_last_block():
    view = View.of(3, 1, 2)
    assert view.blocks == (3, 1, 2) and view.target == 2
    assert View((0, 1), 0).target == 0
    with pytest.raises(Exception):
        view.target = 1  # frozen


def test_view_target_must_be_in_blocks():
    with pytest.raises(LayoutError, match="target"):
        View((0, 1), 2)
    with pytest.raises(LayoutError):
        View((), 0)


def test_view_rejects_duplicates():
    with pytest.raises(LayoutError, match="twice"):
        View((0, 1, 0), 1)
    with pytest.raises(LayoutError):
        View.of(2, 2)


def test_view_normalises_block_ids():
    view = View([0, 1], 1)
    assert view.blocks == (0, 1) and isinstance(view.blocks, tuple)
    assert hash(view) == hash(View((0, 1), 1))


def test_empty_view_of_is_a_layout_error():
    with pytest.raises(LayoutError):
        View.of()
