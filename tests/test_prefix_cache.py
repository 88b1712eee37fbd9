"""Shared prompt prefixes: the PrefixCache's chains, the KVStore's page holders, and a host whose
sessions start with the pages an earlier session's prompt wrote."""

from __future__ import annotations

import pytest
import torch

from cache_service.errors import LayoutError, PoolExhaustedError
from cache_service.kv_store import KVStore, PoolConfig
from cache_service.prefix_cache import PrefixCache
from cache_service.service import Wrote
from cluster.events import Tick
from cluster.host import SessionHost
from tests.test_host import GREEDY, host, program, tiny  # noqa: F401 (a fixture)
from workers.distributed import DistributedBackend, Placement
from workers.engine import HogwildEngine
from workers.exchange import Collective

PAGE = 4


def _store(tokens: int = 64) -> KVStore:
    return KVStore(2, 2, 8, tokens=tokens, page_size=PAGE)


def _write(store: KVStore, tokens: list[int]) -> int:
    """A prompt block holding ``tokens`` (its entries are the token ids, so pages can be told apart)."""
    block = store.new_block(len(tokens))
    entries = torch.tensor(tokens, dtype=torch.float32)[None, None, None, :, None].expand(2, 2, 2, -1, 8)
    store.append(block, entries.contiguous())
    return block


# ---- the cache -----------------------------------------------------------------------------------
def test_lookup_finds_the_longest_whole_page_prefix_compared_token_for_token():
    cache = PrefixCache(PAGE)
    assert cache.insert(list(range(10)), [7, 8, 9]) == [7, 8]  # two whole pages; the partial third is not kept
    assert cache.lookup(list(range(10))) == [7, 8]
    assert cache.lookup([0, 1, 2, 3, 4, 5, 6, 99, 8]) == [7]  # the second page differs in one token
    assert cache.lookup([1, 2, 3, 4]) == []
    assert cache.lookup([0, 1, 2]) == []  # less than a page


def test_a_page_is_found_only_after_the_same_pages_before_it():
    cache = PrefixCache(PAGE)
    cache.insert([0, 1, 2, 3, 4, 5, 6, 7], [1, 2])
    assert cache.lookup([9, 9, 9, 9, 4, 5, 6, 7]) == []  # same second page, other first page


def test_eviction_forgets_the_last_pages_of_a_chain_first_and_only_pages_nobody_else_holds():
    cache = PrefixCache(PAGE)
    cache.insert(list(range(12)), [1, 2, 3])
    held = {2}
    assert cache.evict(3, sole=lambda p: p not in held) == [3]  # 2 is held, so 1 before it stays too
    held.clear()
    assert cache.evict(5, sole=lambda p: True) == [2, 1]
    assert len(cache) == 0


# ---- the store -----------------------------------------------------------------------------------
def test_a_block_starts_with_the_cached_pages_and_reads_the_same_entries():
    store = _store()
    prompt = list(range(10))
    first = _write(store, prompt)
    store.remember_prefix(first, prompt)
    second = store.new_block(len(prompt) + 6)
    assert store.share_prefix(second, prompt + [50, 51]) == 8
    assert store.block(second).pages[:2] == store.block(first).pages[:2]
    assert torch.equal(store.read(second), store.read(first, 0, 8))
    store.append(second, torch.full((2, 2, 2, 4, 8), -1.0))  # grows into its own pages
    assert torch.equal(store.read(first)[0, 0, 0, :, 0], torch.arange(10.0))  # the shared pages untouched


def test_shared_pages_are_freed_by_their_last_holder_and_cached_ones_count_as_free():
    store = _store(64)  # 16 pages
    prompt = list(range(8))
    first = _write(store, prompt)
    store.remember_prefix(first, prompt)
    second = store.new_block(8)
    store.share_prefix(second, prompt)
    assert store.used_pages == 2 and store.cached_pages == 2
    store.free(first)
    assert store.used_pages == 2  # the second block still reads them
    store.free(second)
    assert store.used_pages == 0 and store.free_pages == 16 and store.cached_pages == 2
    blocks = [store.new_block(16) for _ in range(4)]  # all 16 pages: the cache lets its two go
    assert store.cached_pages == 0 and store.free_pages == 0
    with pytest.raises(PoolExhaustedError):
        store.new_block(1)
    for block in blocks:
        store.free(block)
    assert store.free_pages == 16


def test_a_block_cannot_be_cut_inside_a_page_it_shares():
    store = _store()
    prompt = list(range(8))
    first = _write(store, prompt)
    store.remember_prefix(first, prompt)
    second = store.new_block(8)
    store.share_prefix(second, prompt)
    with pytest.raises(LayoutError, match="shares"):
        store.truncate(second, 6)
    store.truncate(second, 4)  # at a page boundary: the rest is let go, nothing shared changes
    assert store.length(second) == 4 and store.length(first) == 8


def test_only_an_empty_block_starts_with_a_prefix():
    store = _store()
    block = _write(store, [1, 2])
    with pytest.raises(LayoutError, match="empty"):
        store.share_prefix(block, [1, 2, 3, 4])


# ---- the host ------------------------------------------------------------------------------------
def _tokens(events) -> list:
    return [e.tokens for e in events if isinstance(e, Tick)]


def test_a_later_session_reuses_the_prompt_pages_and_generates_the_same(tiny):
    prog = program(tiny, "What is 2 + 3?")
    cold = host(tiny, prefix_cache=False)
    alone = _tokens(cold.submit(prog, GREEDY).events())
    assert cold.engine.store.cached_pages == 0

    warm = host(tiny)
    first = _tokens(warm.submit(prog, GREEDY).events())
    cached = warm.engine.store.cached_pages
    assert cached == len(prog.prompt_ids) // warm.page_size and warm.engine.store.used_pages == 0
    written = []
    real = warm.replica.decode
    warm.replica.decode = lambda groups, prefills=(): written.extend(p.tokens for p in prefills) or real(groups, prefills)
    again = _tokens(warm.submit(prog, GREEDY).events())
    assert first == alone and again == alone
    assert all(len(tokens) < len(prog.prompt_ids) for tokens in written)  # the prompt was not written again
    assert sum(map(len, written)) == sum(map(len, _prefills(prog))) - cached * warm.page_size


def _prefills(prog) -> list:
    return [prog.prompt_ids, *prog.shared_ids.values(), *(ids for parts in prog.worker_ids for ids in parts.values())]


def test_concurrent_sessions_with_a_common_prompt_start_share_its_pages(tiny):
    h = host(tiny)
    progs = [program(tiny, p) for p in ["What is 2 + 3?", "What is 2 + 4?", "What is 2 + 5?"]]
    handles = [h.submit(p, GREEDY) for p in progs]
    while not all(handle.done.is_set() for handle in handles):
        h.step()
        pages = [h.engine.store.block(b).pages for b in h.engine.store.blocks]
        shared = {p for table in pages for p in table if sum(p in t for t in pages) > 1}
        if len(h.live) == 3 and shared:
            break
    assert shared, "the three prompts' common pages were never shared"
    for handle in handles:
        handle.result()
    assert h.engine.store.used_pages == 0 and h.claimed == 0


def test_a_prompt_cached_whole_is_not_written_at_all(tiny):
    h = SessionHost(HogwildEngine(tiny, pool=PoolConfig(tokens=1 << 14, page_size=1)))  # every token a page
    prog = program(tiny, "Is 91 prime?")
    first = _tokens(h.submit(prog, GREEDY).events())
    prompts = []
    real = h.replica.decode
    h.replica.decode = lambda groups, prefills=(): prompts.extend(p for p in prefills if not p.context) or real(groups, prefills)
    assert _tokens(h.submit(prog, GREEDY).events()) == first
    assert prompts == []


def test_forgetting_the_prefixes_frees_only_pages_nobody_else_holds():
    store = _store(64)
    prompt = list(range(8))
    first = _write(store, prompt)
    store.remember_prefix(first, prompt)
    other = _write(store, [9] * 8)
    store.remember_prefix(other, [9] * 8)
    store.free(other)
    store.forget_prefixes()
    assert store.cached_pages == 2 and store.used_pages == 2  # the first block's pages stay cached: it holds them
    store.free(first)
    store.forget_prefixes()
    assert store.cached_pages == 0 and store.free_pages == store.pages


def test_a_block_with_its_own_copy_of_a_cached_page_extends_no_chain():
    """Else the cached pages before its pages would stay held by nobody but the cache, yet could
    never be forgotten while it lives (pages no session's worst case counts)."""
    store = _store(64)
    first = _write(store, list(range(8)))
    second = _write(store, list(range(12)))  # the same first two pages, written again, and one more
    store.remember_prefix(first, list(range(8)))
    store.remember_prefix(second, list(range(12)))
    assert store.cached_pages == 2 and store.prefixes.lookup(list(range(12))) == store.block(first).pages[:2]
    store.free(first)
    blocks = [store.new_block(4) for _ in range(store.free_pages)]  # every page not held by the second block
    assert len(blocks) == 13 and store.cached_pages == 0


class _Records:
    """A recorder that keeps what it is told."""

    def __init__(self) -> None:
        self.records: list = []

    def record(self, record) -> None:
        self.records.append(record)

    def flush(self, wait: bool = False) -> None:
        pass


def test_a_gang_actor_records_the_shared_prefix_as_the_prompts_first_tokens(tiny):
    """The CacheService's log of a prompt block holds its whole prompt, shared pages included."""
    recorder = _Records()
    backend = DistributedBackend(HogwildEngine(tiny, pool=PoolConfig(tokens=1 << 14)), GREEDY, Placement((2,), 0),
                                 Collective(0, 1, torch.device("cpu")), recorder)
    h = SessionHost(backend)
    prog = program(tiny, "What is 2 + 3?")
    h.submit(prog, GREEDY).result()
    recorder.records.clear()
    second = h.submit(prog, GREEDY)
    while not any(isinstance(r, Wrote) for r in recorder.records):
        h.step()
    first = recorder.records[0]
    assert first.tokens == prog.prompt_ids[: len(first.tokens)] and len(first.tokens) >= h.page_size
    assert first.entries is not None and first.entries.shape[3] == len(first.tokens)
    prompt = [t for r in recorder.records if isinstance(r, Wrote) and r.block == first.block for t in r.tokens]
    assert prompt == list(prog.prompt_ids)
    second.result()
