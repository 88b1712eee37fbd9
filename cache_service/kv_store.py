"""The block store: every block's K/V for every layer, in one preallocated arena per device.

Bookkeeping (``BlockSpan``: start, capacity, length) is plain integers; the arena tensor
``[layers, 2, kv_heads, capacity, head_dim]`` is the only tensor. Blocks grow in place when they can
and move to the top of the arena with doubled capacity when they cannot, so appending costs amortised
O(1) per token and nothing cache-sized is allocated per step.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from cache_service.errors import LayoutError
from kernels.rope import RopeTable, rotate_by

MIN_BLOCK_CAPACITY = 16


@dataclass
class BlockSpan:
    start: int
    capacity: int
    length: int = 0


class KVStore:
    """Owner of the KV arena of one device; blocks are addressed by integer ids."""

    def __init__(
        self,
        layers: int,
        kv_heads: int,
        head_dim: int,
        *,
        capacity: int = 4096,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str = "cpu",
    ) -> None:
        self.shape = (layers, 2, kv_heads, head_dim)
        self.arena = torch.zeros(layers, 2, kv_heads, max(capacity, MIN_BLOCK_CAPACITY), head_dim,
                                 dtype=dtype, device=device)
        self.spans: dict[int, BlockSpan] = {}
        self.top = 0
        self._next_id = 0

    # ---- bookkeeping -------------------------------------------------------------------------
    @property
    def capacity(self) -> int:
        return self.arena.shape[3]

    def span(self, block: int) -> BlockSpan:
        try:
            return self.spans[block]
        except KeyError:
            raise LayoutError(f"block {block} does not exist; create it with new_block()") from None

    def length(self, block: int) -> int:
        return self.span(block).length

    def new_block(self, reserve: int = MIN_BLOCK_CAPACITY) -> int:
        size = max(reserve, MIN_BLOCK_CAPACITY)
        block = self._next_id
        self._next_id += 1
        self.spans[block] = BlockSpan(start=self._claim(size), capacity=size)
        return block

    def free(self, block: int) -> None:
        span = self.span(block)
        del self.spans[block]
        if span.start + span.capacity == self.top:
            self.top = span.start

    def reserve(self, block: int, extra: int) -> None:
        """Make room for ``extra`` more tokens in ``block`` (may move it; never per token)."""
        span = self.span(block)
        need = span.length + extra
        if need <= span.capacity:
            return
        new_capacity = max(need, 2 * span.capacity)
        if span.start + span.capacity == self.top and span.start + new_capacity <= self.capacity:
            self.top = span.start + new_capacity
        else:
            start = self._claim(new_capacity)
            self.arena[:, :, :, start : start + span.length] = self.arena[
                :, :, :, span.start : span.start + span.length
            ]
            span.start = start
        span.capacity = new_capacity

    def _claim(self, size: int) -> int:
        if self.top + size > self.capacity:
            self._compact(min_free=size)
        start = self.top
        self.top += size
        return start

    def _compact(self, min_free: int) -> None:
        """Pack live blocks into a larger arena (amortised: the arena at least doubles)."""
        live = sum(s.capacity for s in self.spans.values())
        size = max(2 * self.capacity, live + min_free)
        arena = torch.zeros(*self.arena.shape[:3], size, self.arena.shape[4],
                            dtype=self.arena.dtype, device=self.arena.device)
        top = 0
        for span in sorted(self.spans.values(), key=lambda s: s.start):
            arena[:, :, :, top : top + span.length] = self.arena[:, :, :, span.start : span.start + span.length]
            span.start = top
            top += span.capacity
        self.arena, self.top = arena, top

    # ---- contents ----------------------------------------------------------------------------
    def slots(self, block: int, begin: int, end: int) -> range:
        start = self.span(block).start
        return range(start + begin, start + end)

    def read(self, block: int) -> torch.Tensor:
        """K/V of a block, ``[layers, 2, kv_heads, length, head_dim]`` (a view)."""
        span = self.span(block)
        return self.arena[:, :, :, span.start : span.start + span.length]

    def write_entries(self, block: int, begin: int, entries: torch.Tensor) -> None:
        """Overwrite positions ``begin..`` of a block (reserved, e.g. peers' entries of a lagged step)."""
        span = self.span(block)
        n = entries.shape[3]
        if begin + n > span.capacity:
            raise LayoutError(f"block {block} has room for {span.capacity} tokens, not {begin + n}")
        self.arena[:, :, :, span.start + begin : span.start + begin + n] = entries

    def append(self, block: int, entries: torch.Tensor) -> None:
        """Append K/V entries ``[layers, 2, kv_heads, n, head_dim]`` (keys already block-local)."""
        n = entries.shape[3]
        self.reserve(block, n)
        span = self.span(block)
        self.arena[:, :, :, span.start + span.length : span.start + span.length + n] = entries
        span.length += n

    def append_block(self, src: int, dst: int, rope: RopeTable) -> None:
        """Append block ``src`` to the end of ``dst``, rotating its keys once, and empty ``src``."""
        if src == dst:
            raise LayoutError(f"cannot append block {src} to itself")
        offset = self.length(dst)
        n = self.length(src)
        self.reserve(dst, n)  # may move blocks: read src only afterwards
        entries = self.read(src).clone()
        entries[:, 0] = rotate_by(entries[:, 0], torch.tensor(offset), rope)
        self.append(dst, entries)
        self.span(src).length = 0

    def truncate(self, block: int, length: int) -> None:
        span = self.span(block)
        if not 0 <= length <= span.length:
            raise LayoutError(f"cannot truncate block {block} of length {span.length} to {length}")
        span.length = length

    def nbytes(self) -> int:
        """Bytes of K/V actually held by blocks (not the spare arena capacity)."""
        per_token = self.arena[:, :, :, :1].numel() * self.arena.element_size()
        return per_token * sum(s.length for s in self.spans.values())
