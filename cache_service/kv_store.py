"""The paged KV pool of one device: every block's K/V for every layer, in one tensor allocated once.

The pool ``[layers, 2, kv_heads, pages * page_size, head_dim]`` is created when the store is built
and never reallocated or moved, so its addresses are stable for the store's whole life. It is cut
into fixed pages; a block is a page table (a list of pages) and a length, so it grows by taking free
pages and shrinks or dies by handing them back at once: nothing is ever copied to make room. Token
``i`` of a block lives at slot ``pages[i // page_size] * page_size + i % page_size``.

A request that the free pages cannot hold raises ``PoolExhaustedError`` before anything changes.
Allocation keeps blocks in few contiguous runs (attention reads a run in place with one matmul): a
growing block takes the pages right after its last one while they are free, and a request of several
pages takes the first free run long enough to hold them all.

A page may be held by several blocks at once: a prompt block can start with the pages of a prompt
prefix another session wrote (``share_prefix``; the ``PrefixCache`` remembers them after their
sessions end, ``remember_prefix``). Only whole pages before a block's length are shared, and blocks
only grow at their end, so nobody writes a shared page. A page is free again when its last holder
lets it go; pages only the prefix cache holds count as free (they are forgotten when room is needed).

One more page, after the ``pages`` usable ones, is the **null page**: it always holds zeros, is
never in the free list and never belongs to a block. Attention pads rows of a gathered tail with its
first slot (``null_slot``), so a padded column reads zeros and never another block's entries (a NaN
in a block cannot reach a row that does not read that block). The accounting (``pages``,
``capacity``, ``used_pages``, ``free_pages``) counts the usable pages only.
"""

from __future__ import annotations

import heapq
import math
import os
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

from cache_service.errors import ConfigError, LayoutError, PoolExhaustedError
from cache_service.prefix_cache import PrefixCache
from kernels.rope import RopeTable, rotate_by

DEFAULT_PAGE_SIZE = 16
# Pool size when none is configured: on CUDA a fraction of the free device memory (after the weights
# are loaded), at most MAX_DEFAULT_TOKENS; on the CPU CPU_DEFAULT_TOKENS, at most a fraction of the
# available memory (a CPU pool is touched page by page as it fills, but counts against the machine).
CUDA_MEMORY_FRACTION = 0.9
MAX_DEFAULT_TOKENS = 1 << 20
CPU_DEFAULT_TOKENS = 32768
CPU_MEMORY_FRACTION = 0.25


@dataclass(frozen=True)
class PoolConfig:
    """Size of an engine's KV pool: ``tokens``, else ``memory_fraction`` of the device's free memory,
    else the device's default; ``page_size`` tokens per page."""

    tokens: int | None = None
    page_size: int = DEFAULT_PAGE_SIZE
    memory_fraction: float | None = None

    def __post_init__(self) -> None:
        if self.page_size < 1:
            raise ConfigError(f"the KV page size must be >= 1 token, got {self.page_size}")
        if self.tokens is not None and self.tokens < self.page_size:
            raise ConfigError(f"the KV pool must hold at least one page ({self.page_size} tokens), "
                              f"got {self.tokens} tokens")
        if self.memory_fraction is not None and not 0 < self.memory_fraction <= 1:
            raise ConfigError(f"the KV memory fraction must be in (0, 1], got {self.memory_fraction}")

    def tokens_for(self, bytes_per_token: int, device: torch.device) -> int:
        """The pool size in tokens for this device (rounded down to whole pages)."""
        if self.tokens is not None:
            tokens = self.tokens
        elif device.type == "cuda":
            fraction = self.memory_fraction or CUDA_MEMORY_FRACTION
            tokens = int(torch.cuda.mem_get_info(device)[0] * fraction) // bytes_per_token
            if self.memory_fraction is None:
                tokens = min(tokens, MAX_DEFAULT_TOKENS)
        else:
            fraction = self.memory_fraction or CPU_MEMORY_FRACTION
            tokens = int(available_memory() * fraction) // bytes_per_token
            if self.memory_fraction is None:
                tokens = min(tokens, CPU_DEFAULT_TOKENS)
        if tokens < self.page_size:
            raise ConfigError(f"the KV pool would hold {tokens} tokens on {device}, less than one page; "
                              "free memory or give kv_tokens")
        return tokens // self.page_size * self.page_size


def available_memory() -> int:
    """Bytes of memory available to new allocations on this host (MemAvailable on Linux)."""
    try:
        with open("/proc/meminfo") as meminfo:
            for line in meminfo:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")


@dataclass
class Block:
    """A block's page table; ``reserved`` tokens' pages are kept even while the block is shorter."""

    pages: list[int] = field(default_factory=list)
    length: int = 0
    reserved: int = 0


class KVStore:
    """Owner of the KV pool of one device; blocks are addressed by integer ids."""

    def __init__(
        self,
        layers: int,
        kv_heads: int,
        head_dim: int,
        *,
        tokens: int,
        page_size: int = DEFAULT_PAGE_SIZE,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str = "cpu",
    ) -> None:
        if page_size < 1 or tokens < page_size:
            raise LayoutError(f"a KV pool needs page_size >= 1 and at least one page of tokens; "
                              f"got {tokens} tokens of page size {page_size}")
        self.shape = (layers, 2, kv_heads, head_dim)
        self.page_size = page_size
        self.pages = tokens // page_size
        self.null_slot = self.pages * page_size  # the null page's first slot: always zeros
        with torch.inference_mode(False):  # a normal tensor: written inside and outside inference mode
            self.pool = torch.zeros(layers, 2, kv_heads, (self.pages + 1) * page_size, head_dim,
                                     dtype=dtype, device=device)
        self.clear()

    def clear(self) -> None:
        """Forget every block (ids start again at 0); the pool tensor stays where it is, and the
        null page (never free, never a block's) holds zeros."""
        self.pool[:, :, :, self.null_slot :].zero_()
        self.blocks: dict[int, Block] = {}
        self.prefixes = PrefixCache(self.page_size)
        self._holders = [0] * self.pages  # blocks (and the prefix cache) holding each page
        self._free = set(range(self.pages))
        self._lowest = list(range(self.pages))  # min-heap of free pages (stale entries skipped)
        self._next_id = 0

    # ---- accounting --------------------------------------------------------------------------
    @property
    def capacity(self) -> int:
        """Tokens the pool holds."""
        return self.pages * self.page_size

    @property
    def free_pages(self) -> int:
        """Pages a request can take: free ones and those only the prefix cache holds."""
        return len(self._free) + sum(map(self._sole, self.prefixes.pages()))

    @property
    def used_pages(self) -> int:
        return self.pages - self.free_pages

    @property
    def cached_pages(self) -> int:
        """Pages the prefix cache names (some may be held by blocks too)."""
        return len(self.prefixes)

    def pages_for(self, tokens: int) -> int:
        return math.ceil(tokens / self.page_size)

    def bytes_per_token(self) -> int:
        return self.pool[:, :, :, :1].numel() * self.pool.element_size()

    def nbytes(self) -> int:
        """Bytes of K/V actually held by blocks (not the free or reserved room)."""
        return self.bytes_per_token() * sum(b.length for b in self.blocks.values())

    def pool_bytes(self) -> int:
        """Bytes of the usable pool (allocated once, with one null page more)."""
        return self.capacity * self.bytes_per_token()

    # ---- blocks ------------------------------------------------------------------------------
    def block(self, block: int) -> Block:
        try:
            return self.blocks[block]
        except KeyError:
            raise LayoutError(f"block {block} does not exist; create it with new_block()") from None

    def length(self, block: int) -> int:
        return self.block(block).length

    def capacity_of(self, block: int) -> int:
        """Tokens the block's pages hold."""
        return len(self.block(block).pages) * self.page_size

    def new_block(self, reserve: int = 0) -> int:
        """A new empty block keeping pages for ``reserve`` tokens (taken now, in one run if possible)."""
        if reserve < 0:
            raise LayoutError(f"a block cannot reserve {reserve} tokens; give 0 or more")
        pages = self._take(self.pages_for(reserve), after=None)
        block = self._next_id
        self._next_id += 1
        self.blocks[block] = Block(pages, 0, reserve)
        return block

    def free(self, block: int) -> None:
        """Delete ``block``; its pages are free at once."""
        self._give(self.block(block).pages)
        del self.blocks[block]

    def reserve(self, block: int, extra: int) -> None:
        """Give ``block`` pages for ``extra`` more tokens (``PoolExhaustedError`` when they are not free)."""
        self.reserve_many({block: extra})

    def reserve_many(self, extras: dict[int, int]) -> None:
        """``reserve`` for several blocks at once: all of it, or (pool exhausted) none of it."""
        short = {b: self.pages_for(self.block(b).length + n) - len(self.block(b).pages) for b, n in extras.items()}
        short = {b: n for b, n in short.items() if n > 0}
        self.check_free(sum(short.values()))
        for b, n in short.items():
            pages = self.blocks[b].pages
            pages += self._take(n, after=pages[-1] if pages else None)

    def truncate(self, block: int, length: int) -> None:
        """Shorten ``block`` to ``length`` tokens; pages beyond it (and its reservation) are freed."""
        entry = self.block(block)
        if not 0 <= length <= entry.length:
            raise LayoutError(f"cannot truncate block {block} of length {entry.length} to {length}")
        if length % self.page_size and self._holders[entry.pages[length // self.page_size]] > 1:
            raise LayoutError(f"cannot truncate block {block} to {length} tokens: that cuts a page it "
                              "shares with other blocks (a cached prompt prefix), which later writes would change")
        entry.length = length
        keep = self.pages_for(max(length, entry.reserved))
        self._give(entry.pages[keep:])
        del entry.pages[keep:]

    # ---- shared prompt prefixes --------------------------------------------------------------
    def share_prefix(self, block: int, tokens: Sequence[int]) -> int:
        """Start the empty ``block`` with the cached pages of the longest whole-page prefix of
        ``tokens`` (its own first pages go back); the number of tokens it now holds."""
        entry = self.block(block)
        if entry.length:
            raise LayoutError(f"block {block} holds {entry.length} tokens; only an empty block starts with a prefix")
        shared = self.prefixes.lookup(tokens)
        if shared:
            for page in shared:
                self._holders[page] += 1
            self._give(entry.pages[: len(shared)])
            entry.pages[: len(shared)] = shared
            entry.length = len(shared) * self.page_size
        return entry.length

    def forget_prefixes(self) -> None:
        """Empty the prefix cache (pages blocks still hold stay theirs)."""
        self._give(self.prefixes.evict(len(self.prefixes), self._sole))

    def remember_prefix(self, block: int, tokens: Sequence[int]) -> None:
        """Keep the whole pages of ``block``'s first ``len(tokens)`` tokens, which are ``tokens``,
        for later blocks that start with them (``share_prefix``)."""
        if len(tokens) > self.length(block):
            raise LayoutError(f"block {block} holds {self.length(block)} tokens, not {len(tokens)}")
        for page in self.prefixes.insert(tokens, self.block(block).pages):
            self._holders[page] += 1

    # ---- addressing --------------------------------------------------------------------------
    def slots(self, block: int, begin: int, end: int) -> list[int]:
        """Pool slots of tokens ``begin..end-1`` of ``block`` (its pages must hold them)."""
        pages, size = self.block(block).pages, self.page_size
        if end > len(pages) * size:
            raise LayoutError(f"block {block} has pages for {len(pages) * size} tokens, not {end}; reserve first")
        return [pages[i // size] * size + i % size for i in range(begin, end)]

    def runs(self, block: int, length: int) -> list[tuple[int, int]]:
        """The first ``length`` tokens of ``block`` as contiguous pool ranges ``(start, length)``."""
        pages, size = self.block(block).pages, self.page_size
        out: list[tuple[int, int]] = []
        for i in range(self.pages_for(length)):
            n = min(size, length - i * size)
            start = pages[i] * size
            if out and out[-1][0] + out[-1][1] == start:
                out[-1] = (out[-1][0], out[-1][1] + n)
            else:
                out.append((start, n))
        return out

    # ---- contents ----------------------------------------------------------------------------
    def read(self, block: int, begin: int = 0, end: int | None = None) -> torch.Tensor:
        """A copy of tokens ``begin..end-1`` (default all) of a block, ``[layers, 2, kv_heads, n, head_dim]``."""
        end = self.length(block) if end is None else end
        index = torch.tensor(self.slots(block, begin, end), dtype=torch.long, device=self.pool.device)
        return self.pool.index_select(3, index)

    def write_entries(self, block: int, begin: int, entries: torch.Tensor) -> None:
        """Overwrite positions ``begin..`` of a block (its pages must exist, e.g. peers' lagged entries)."""
        index = torch.tensor(self.slots(block, begin, begin + entries.shape[3]), device=self.pool.device)
        self.pool.index_copy_(3, index, entries.to(self.pool.dtype))

    def append(self, block: int, entries: torch.Tensor) -> None:
        """Append K/V entries ``[layers, 2, kv_heads, n, head_dim]`` (keys already block-local)."""
        self.reserve(block, entries.shape[3])
        entry = self.blocks[block]
        self.write_entries(block, entry.length, entries)
        entry.length += entries.shape[3]

    def append_block(self, src: int, dst: int, rope: RopeTable) -> None:
        """Append block ``src`` to the end of ``dst``, rotating its keys once, and empty ``src``."""
        if src == dst:
            raise LayoutError(f"cannot append block {src} to itself")
        offset = self.length(dst)
        entries = self.read(src)
        self.reserve(dst, entries.shape[3])  # before anything changes: may raise PoolExhaustedError
        entries[:, 0] = rotate_by(entries[:, 0], torch.tensor(offset), rope)
        self.append(dst, entries)
        self.truncate(src, 0)

    # ---- the free list -----------------------------------------------------------------------
    def check_free(self, pages: int) -> None:
        """Raise ``PoolExhaustedError`` unless ``pages`` pages are free (the prefix cache forgets
        pages only it holds to make room)."""
        if pages > len(self._free) and self.prefixes:
            self._give(self.prefixes.evict(pages - len(self._free), self._sole))
        if pages > len(self._free):
            raise PoolExhaustedError(
                f"the KV pool is full: {pages} more pages of {self.page_size} tokens are needed, "
                f"{len(self._free)} of {self.pages} are free; end or cancel sessions, or give the "
                "engine a larger pool (kv_tokens / kv_memory_fraction)"
            )

    def _sole(self, page: int) -> bool:
        """Whether the prefix cache alone holds ``page``."""
        return self._holders[page] == 1

    def _take(self, n: int, after: int | None) -> list[int]:
        """``n`` free pages: those right after page ``after`` while free, then a contiguous run."""
        self.check_free(n)
        taken: list[int] = []
        if after is not None:
            page = after + 1
            while len(taken) < n and page in self._free:
                self._free.discard(page)
                taken.append(page)
                page += 1
        rest = n - len(taken)
        if rest > 1:
            run = self._first_run(rest)
            self._free.difference_update(run)
            taken += run
        else:
            taken += [self._pop_lowest() for _ in range(rest)]
        for page in taken:
            self._holders[page] = 1
        return taken

    def _first_run(self, n: int) -> list[int]:
        """The first run of ``n`` contiguous free pages, or the ``n`` lowest free pages."""
        ordered = sorted(self._free)
        for i in range(len(ordered) - n + 1):
            if ordered[i + n - 1] - ordered[i] == n - 1:
                return ordered[i : i + n]
        return ordered[:n]

    def _pop_lowest(self) -> int:
        while True:
            page = heapq.heappop(self._lowest)
            if page in self._free:
                self._free.discard(page)
                return page

    def _give(self, pages: list[int]) -> None:
        """Let go of one hold on each of ``pages``; a page nobody holds is free again."""
        for page in pages:
            self._holders[page] -= 1
            if self._holders[page]:
                continue
            self._free.add(page)
            heapq.heappush(self._lowest, page)
        if len(self._lowest) > 2 * self.pages:  # drop stale entries (pages taken by runs)
            self._lowest = sorted(self._free)
