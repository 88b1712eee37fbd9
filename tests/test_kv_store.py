"""KVStore: the paged pool (fixed tensor, page tables, free list, exhaustion), commits, accounting, errors; View."""

from __future__ import annotations


import pytest
import torch

from cache_service.errors import ConfigError, HogwildError, LayoutError, PoolExhaustedError
from cache_service.kv_store import KVStore, PoolConfig
from cache_service.layout import View
from kernels.rope import RopeTable, rotate_by

LAYERS, KV_HEADS, HEAD_DIM = 2, 2, 8


def _store(tokens: int = 64, dtype=torch.float32, page_size: int = 4) -> KVStore:
    return KVStore(LAYERS, KV_HEADS, HEAD_DIM, tokens=tokens, page_size=page_size, dtype=dtype)


def _entries(n: int, seed: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(LAYERS, 2, KV_HEADS, n, HEAD_DIM, generator=generator)


def _table() -> RopeTable:
    return RopeTable.from_inv_freq(1.0 / 10000.0 ** (torch.arange(0, HEAD_DIM, 2) / HEAD_DIM), HEAD_DIM)


def _token(value: float) -> torch.Tensor:
    return torch.full((LAYERS, 2, KV_HEADS, 1, HEAD_DIM), value)


def test_new_store_and_blocks():
    store = _store()
    a, b = store.new_block(), store.new_block(reserve=10)
    assert a != b
    assert store.length(a) == store.length(b) == 0
    assert store.read(a).shape == (LAYERS, 2, KV_HEADS, 0, HEAD_DIM)
    assert store.capacity_of(a) == 0 and store.capacity_of(b) == 12  # 3 pages of 4
    assert store.used_pages == 3 and store.free_pages == 13
    assert store.nbytes() == 0


def test_append_and_read_round_trip():
    store = _store()
    block = store.new_block()
    first, second = _entries(5, 0), _entries(3, 1)
    store.append(block, first)
    store.append(block, second)
    assert store.length(block) == 8
    assert torch.equal(store.read(block), torch.cat((first, second), dim=3))
    assert torch.equal(store.read(block, 2, 7), torch.cat((first, second), dim=3)[:, :, :, 2:7])


def test_the_pool_never_moves_and_blocks_never_move():
    """One token at a time into interleaved blocks: exact contents, the pool tensor and every
    page of a block stay where they were (a block only gains pages)."""
    store = _store(tokens=4 * 400)
    pool, address = store.pool, store.pool.data_ptr()
    blocks = [store.new_block() for _ in range(4)]
    steps = 300
    for t in range(steps):
        for b in blocks:
            before = list(store.block(b).pages)
            store.append(b, _token(t * 10.0 + b))
            assert store.block(b).pages[: len(before)] == before
    assert store.pool is pool and store.pool.data_ptr() == address
    expected = torch.arange(steps, dtype=torch.float32) * 10.0
    for b in blocks:
        held = store.read(b)
        assert torch.equal(held, (expected + b)[None, None, None, :, None].expand_as(held))


def test_contents_survive_frees_and_random_sizes():
    store = _store(tokens=4096)
    generator = torch.Generator().manual_seed(0)
    blocks = {store.new_block(): [] for _ in range(3)}
    for i in range(200):
        b = list(blocks)[int(torch.randint(len(blocks), (1,), generator=generator))]
        n = int(torch.randint(1, 9, (1,), generator=generator))
        chunk = _entries(n, i)
        store.append(b, chunk)
        blocks[b].append(chunk)
        if i in (80, 150):  # free a block in the middle of the run; the others must be unaffected
            gone = list(blocks)[0]
            store.free(gone)
            del blocks[gone]
            blocks[store.new_block()] = []
    for b, chunks in blocks.items():
        assert chunks, "every block got tokens"
        assert torch.equal(store.read(b), torch.cat(chunks, dim=3))


def _live_pages(store: KVStore) -> int:
    return sum(store.pages_for(max(b.length, b.reserved)) for b in store.blocks.values())


def test_churn_keeps_pages_in_use_equal_to_live_pages():
    """1,000 create/append/free cycles: pages in use always equal the live tokens' pages, the pool
    never grows, and usage is back to zero once every block is freed."""
    store = _store(tokens=2048, page_size=8)
    generator = torch.Generator().manual_seed(1)
    live: dict[int, int] = {}
    for cycle in range(1000):
        block = store.new_block(reserve=int(torch.randint(0, 20, (1,), generator=generator)))
        live[block] = 0
        for b in list(live)[-3:]:
            n = int(torch.randint(1, 12, (1,), generator=generator))
            store.append(b, _token(float(cycle)).expand(-1, -1, -1, n, -1))
        if len(live) > 6 or cycle % 7 == 0:
            victim = list(live)[int(torch.randint(len(live), (1,), generator=generator))]
            store.free(victim)
            del live[victim]
        if cycle % 50 == 0 and live:
            some = next(iter(live))
            store.truncate(some, store.length(some) // 2)
        assert store.used_pages == _live_pages(store)
        assert store.capacity == 2048
    for block in list(live):
        store.free(block)
    assert store.used_pages == 0 and store.free_pages == store.pages and store.nbytes() == 0


def test_exhaustion_is_typed_and_changes_nothing():
    store = _store(tokens=32, page_size=4)  # 8 pages
    a, b = store.new_block(), store.new_block()
    store.append(a, _entries(20, 0))  # 5 pages
    store.append(b, _entries(6, 1))  # 2 pages
    before = (store.used_pages, store.length(a), store.length(b), list(store.block(b).pages))
    with pytest.raises(PoolExhaustedError, match="KV pool is full"):
        store.append(b, _entries(8, 2))  # 2 more pages, 1 free
    with pytest.raises(PoolExhaustedError):
        store.reserve_many({a: 4, b: 4})  # one page each: 2 pages, 1 free
    with pytest.raises(PoolExhaustedError):
        store.new_block(reserve=8)
    with pytest.raises(PoolExhaustedError):
        store.append_block(a, b, _table())  # 20 tokens into b
    assert (store.used_pages, store.length(a), store.length(b), list(store.block(b).pages)) == before
    assert torch.equal(store.read(a), _entries(20, 0)) and torch.equal(store.read(b), _entries(6, 1))
    assert issubclass(PoolExhaustedError, HogwildError)
    store.free(a)  # usable after: the freed pages serve the request that failed
    store.append(b, _entries(8, 2))
    assert torch.equal(store.read(b), torch.cat((_entries(6, 1), _entries(8, 2)), dim=3))


def test_growing_blocks_stay_in_few_runs():
    """A block that grows while others take pages keeps taking the pages after its last one when
    they are free, and a multi-page request takes one contiguous run."""
    store = _store(tokens=1024, page_size=4)
    history = store.new_block(reserve=40)
    steps = [store.new_block(reserve=16) for _ in range(3)]
    assert len(store.runs(history, 40)) == 1
    for _ in range(20):
        for step in steps:
            store.append(step, _entries(7, 0))
        for step in steps:
            store.append_block(step, history, _table())
    assert store.length(history) == 20 * 3 * 7
    assert len(store.runs(history, store.length(history))) <= 3
    scattered = _store(tokens=64, page_size=4)
    blocks = [scattered.new_block(reserve=4) for _ in range(16)]
    for b in blocks[::2]:
        scattered.free(b)
    wide = scattered.new_block(reserve=12)  # no 3 free pages in a row: the lowest 3 instead
    assert scattered.block(wide).pages == [0, 2, 4]
    assert scattered.runs(wide, 12) == [(0, 4), (8, 4), (16, 4)]


def test_runs_cover_the_slots_in_order():
    store = _store(tokens=256, page_size=4)
    a, b = store.new_block(), store.new_block()
    for i in range(10):
        store.append(a if i % 2 else b, _entries(3, i))
    runs = store.runs(a, store.length(a))
    assert [s for start, n in runs for s in range(start, start + n)] == store.slots(a, 0, store.length(a))


def test_truncate_returns_pages_beyond_the_reservation():
    store = _store(tokens=256, page_size=4)
    block = store.new_block(reserve=8)
    store.append(block, _entries(30, 0))
    assert store.used_pages == 8
    store.truncate(block, 10)
    assert store.used_pages == 3
    store.truncate(block, 0)
    assert store.used_pages == 2 and store.capacity_of(block) == 8  # its reservation is kept


def test_clear_forgets_every_block_and_keeps_the_pool():
    store = _store()
    pool = store.pool
    store.append(store.new_block(), _entries(9, 0))
    store.clear()
    assert store.blocks == {} and store.used_pages == 0 and store.pool is pool
    assert store.new_block() == 0


def test_pool_config_sizes_and_errors():
    assert PoolConfig(tokens=100, page_size=16).tokens_for(4, torch.device("cpu")) == 96
    half_free = PoolConfig(memory_fraction=1e-6).tokens_for(1, torch.device("cpu"))
    assert half_free > 0 and half_free % 16 == 0
    assert PoolConfig().tokens_for(1, torch.device("cpu")) == 32768  # the CPU default
    for bad in (dict(page_size=0), dict(tokens=8), dict(memory_fraction=0), dict(memory_fraction=1.5)):
        with pytest.raises(ConfigError):
            PoolConfig(**bad)
    with pytest.raises(ConfigError, match="less than one page"):
        PoolConfig(memory_fraction=1e-9).tokens_for(1 << 40, torch.device("cpu"))


@pytest.mark.parametrize("page_size", [1, 4, 64])
def test_append_block_rotates_keys_once_and_keeps_values(page_size):
    store, table = _store(tokens=256, page_size=page_size), _table()
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
    store = _store(tokens=1024)
    per_token = LAYERS * 2 * KV_HEADS * HEAD_DIM * 4
    assert store.bytes_per_token() == per_token and store.pool_bytes() == 1024 * per_token
    a, b = store.new_block(reserve=200), store.new_block()
    store.append(a, _entries(7, 0))
    store.append(b, _entries(3, 1))
    assert store.nbytes() == 10 * per_token
    store.truncate(a, 2)
    assert store.nbytes() == 5 * per_token
    store.append_block(b, a, _table())
    assert store.nbytes() == 5 * per_token
    half = KVStore(LAYERS, KV_HEADS, HEAD_DIM, tokens=64, dtype=torch.bfloat16)
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
