"""Turn one step's rows (views + token counts) into an ``AttentionPlan`` and model positions.

All per-step attention metadata is built here, once per step, and shared by every layer: view
offsets, the block-local positions the model rotates new queries and keys to, where new entries
land, which blocks are read in place and which are gathered, the rotations and the masks.

Only the rows computed here (``local``) read: a block read in place is scored by the contiguous
range of local rows from its first to its last reader (rows of other sessions, with disjoint
views, never score it when each session's rows are contiguous), up to the longest view of it
among those readers; the tail holds the local rows' small blocks only.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from enum import Enum

import torch

from cache_service.errors import ConfigError, LayoutError
from cache_service.kv_store import KVStore
from cache_service.layout import View
from kernels.attention import AttentionPlan, DirectChunk, TailGather
from kernels.rope import RopeTable

DIRECT_MIN_TOKENS = 128
# Unwritten history (tokens read in place) from which a step scores it while the new K/V entries are
# still being exchanged (instant mode across devices). NCCL moves them on its own stream, so that
# always pays; gloo moves them on host threads that compete with the step for the CPU, which was
# measured to cost 8% at 512 tokens, ~3% at 2048 and to save 3% at 4096 on a 2-core machine
# (benchmarks/RESULTS.md, distributed_overhead).
OVERLAP_MIN_TOKENS = {"cuda": 0, "cpu": 4096}


def overlap_min_tokens(device: torch.device) -> int:
    """The default ``overlap_min`` of ``plan_step`` on ``device``."""
    return OVERLAP_MIN_TOKENS.get(device.type, 0)


class Mode(str, Enum):
    INSTANT = "instant"  # peers' entries of this step are visible at once (the paper's semantics)
    LAGGED = "lagged"  # peers' entries of this step become visible at the next step

    @classmethod
    def parse(cls, value: "str | Mode") -> "Mode":
        try:
            return cls(value)
        except ValueError:
            raise ConfigError(f"unknown mode {value!r}; use 'instant' or 'lagged'") from None


@dataclass(frozen=True)
class Row:
    """One writer of a step: ``tokens`` new tokens written to ``view.target``."""

    view: View
    tokens: int


@dataclass(frozen=True)
class PlannedStep:
    plan: AttentionPlan
    positions: torch.Tensor  # [1, n]: block-local position of each packed token in its row's target
    view_length: int  # tokens in the longest view once the step is written


@dataclass(frozen=True)
class _Read:
    """Row ``row`` reads ``visible`` tokens of ``block``; ``shift`` = its target offset - block offset."""

    row: int
    block: int
    shift: int
    visible: int
    own: int  # -1, or the block's length before the step when it is the row's own target


# Where a row's reads sit among a segment's key columns: [(read, first column)]
_Placed = list[tuple[_Read, int]]


def plan_step(
    store: KVStore,
    rows: list[Row],
    mode: Mode | list[Mode],
    rope: RopeTable,
    *,
    group: int = 1,
    direct_min: int = DIRECT_MIN_TOKENS,
    local: range | None = None,
    write_remote: bool = True,
    overlap_min: int = 0,
) -> PlannedStep:
    """Plan one step for query heads in groups of ``group`` per kv head; ``mode`` for every row,
    or one per row (a row sees its peers' entries of this step when ITS mode is instant).

    ``local``: the rows this device computes (default all; queries, positions, masks and the
    blocks read, up to the lengths these rows see, cover only them). ``write_remote``: whether
    the layers store the new entries of all rows (they arrive by exchange, instant mode) or only
    the local rows' (the rest is exchanged after the step).
    ``overlap_min``: the unwritten history read in place is scored before the new entries are
    stored (while they travel) when it holds at least this many tokens. Call it before the new
    tokens count in the block lengths; the caller advances them after the forward.
    """
    writers = _writers(rows)
    before = {b: store.length(b) for b in writers}
    modes = [mode] * len(rows) if isinstance(mode, Mode) else list(mode)
    reads, view_length = _reads(store, rows, modes, before, writers)
    n_rows, tokens = len(rows), max(r.tokens for r in rows)
    local = range(n_rows) if local is None else local
    device, dtype = store.pool.device, store.pool.dtype
    counts = [rows[i].tokens for i in local]
    starts = [sum(counts[:k]) for k in range(len(counts))]  # each local row's first packed token

    positions = torch.cat([before[rows[i].view.target] + torch.arange(rows[i].tokens) for i in local])
    padded = [starts[k] + min(j, counts[k] - 1) for k in range(len(counts)) for j in range(tokens)]
    packed = [k * tokens + j for k in range(len(counts)) for j in range(counts[k])]
    writing = range(n_rows) if write_remote else local
    write_src = [i * tokens + j for i in range(len(writing)) for j in range(rows[writing[i]].tokens)]
    write_slots = [s for i in writing for s in
                   store.slots(rows[i].view.target, before[rows[i].view.target],
                               before[rows[i].view.target] + rows[i].tokens)]

    reads = [r for r in reads if r.row in local]  # only the rows computed here read
    direct_blocks = _direct_blocks(reads, direct_min, writers)
    shape = _Shape(rows, tokens, group, local, starts, rope, dtype, device)
    direct, shifts = [], []
    for b in direct_blocks:
        chunk, chunk_shifts = _direct_chunk(store, shape, [r for r in reads if r.block == b])
        if chunk_shifts is not None:
            chunk = replace(chunk, rotated=sum(map(len, shifts)))
            shifts.append(chunk_shifts)
        direct.append(chunk)
    tail = _tail(store, shape, [[r for r in reads if r.row == i and r.block not in direct_blocks]
                                for i in local])
    unwritten = direct[: sum(b not in writers for b in direct_blocks)]
    query_index = [t for c in direct if c.rotated is not None for t in range(*c.tokens)]
    plan = AttentionPlan(
        rows=len(local),
        tokens=tokens,
        padded=torch.tensor(padded, device=device),
        packed=torch.tensor(packed, device=device),
        write_src=None if len(write_src) == len(writing) * tokens else torch.tensor(write_src, device=device),
        write_slots=torch.tensor(write_slots, device=device),
        query_index=torch.tensor(query_index, device=device) if shifts else None,
        query_rotation=rope.rotation(torch.cat(shifts)[:, None], dtype, device) if shifts else None,
        direct=tuple(direct),
        stable=len(unwritten) if sum(c.length for c in unwritten) >= overlap_min else 0,
        tail=tail,
    )
    return PlannedStep(plan, positions[None].to(device), view_length)


def _writers(rows: list[Row]) -> dict[int, int]:
    if not rows:
        raise LayoutError("a step needs at least one row")
    writers: dict[int, int] = {}
    for i, row in enumerate(rows):
        if row.tokens < 1:
            raise LayoutError(f"row {i} has {row.tokens} new tokens; every row writes at least one")
        if row.view.target in writers:
            raise LayoutError(
                f"rows {writers[row.view.target]} and {i} both write block {row.view.target}; "
                "give each row its own target block"
            )
        writers[row.view.target] = i
    return writers


def _reads(store: KVStore, rows: list[Row], modes: list[Mode], before: dict[int, int],
           writers: dict[int, int]) -> tuple[list[_Read], int]:
    """Every (row, block) pair with visible tokens, and the longest view length."""

    def visible(i: int, block: int) -> int:
        if block == rows[i].view.target:
            return before[block] + rows[i].tokens
        if block in writers:
            return before[block] + (rows[writers[block]].tokens if modes[i] is Mode.INSTANT else 0)
        return store.length(block)

    reads, longest = [], 0
    for i, row in enumerate(rows):
        lengths = [visible(i, b) for b in row.view.blocks]
        offsets = [sum(lengths[:k]) for k in range(len(lengths))]
        target_offset = offsets[row.view.blocks.index(row.view.target)]
        for block, offset, vis in zip(row.view.blocks, offsets, lengths):
            own = before[block] if block == row.view.target else -1
            if vis:
                reads.append(_Read(i, block, target_offset - offset, vis, own))
        longest = max(longest, sum(lengths))
    return reads, longest


def _direct_blocks(reads: list[_Read], direct_min: int, writers: dict[int, int]) -> list[int]:
    """Blocks read in place: long ones, and any block every reader sees without a shift. Those
    nobody writes this step (stable: they can be read before the new entries arrive) come first."""
    shifted = {r.block for r in reads if r.shift != 0}
    chosen: list[int] = []
    for r in reads:
        if r.block not in chosen and (r.visible >= direct_min or r.block not in shifted):
            chosen.append(r.block)
    return sorted(chosen, key=lambda b: b in writers)


@dataclass(frozen=True)
class _Shape:
    rows: list[Row]
    tokens: int
    group: int
    local: range
    starts: list[int]  # first packed token of each local row
    rope: RopeTable
    dtype: torch.dtype
    device: torch.device

    def token_range(self, rows: range) -> tuple[int, int]:
        """The packed query tokens of the local rows ``rows``."""
        first, last = rows.start - self.local.start, rows.stop - 1 - self.local.start
        return self.starts[first], self.starts[last] + self.rows[rows.stop - 1].tokens


def _direct_chunk(store: KVStore, shape: _Shape, block_reads: list[_Read]) -> tuple[DirectChunk, torch.Tensor | None]:
    """The block of ``block_reads`` (local reads) for the rows from its first to its last reader,
    and the query rotation of each of their tokens (None when no reader needs one)."""
    by_row = {r.row: r for r in block_reads}
    readers = range(min(by_row), max(by_row) + 1)
    length = max(r.visible for r in block_reads)
    shifts = torch.cat([torch.full((shape.rows[i].tokens,), by_row[i].shift if i in by_row else 0)
                        for i in readers])
    mask = _mask(shape, readers, length, [[(by_row[i], 0)] if i in by_row else [] for i in readers])
    if mask is not None:  # [R, T, g, L] -> the real tokens' [n * g, L]
        mask = torch.cat([mask[k, : shape.rows[i].tokens] for k, i in enumerate(readers)]).reshape(-1, length)
    first = readers.start - shape.local.start
    chunk = DirectChunk(runs=tuple(store.runs(block_reads[0].block, length)), length=length,
                        rows=(first, first + len(readers)), tokens=shape.token_range(readers), rotated=None,
                        mask=mask)
    return chunk, shifts if shifts.any() else None


def _tail(store: KVStore, shape: _Shape, tail_reads: list[list[_Read]]) -> TailGather | None:
    """The local rows' other reads, gathered per row; shorter rows are padded with the null slot."""
    size = max((sum(r.visible for r in row_reads) for row_reads in tail_reads), default=0)
    if not size:
        return None
    slots = torch.full((len(tail_reads), size), store.null_slot, dtype=torch.long)
    shifts = torch.zeros(len(tail_reads), size, dtype=torch.long)
    placements = []
    for i, row_reads in enumerate(tail_reads):
        at, placed = 0, []
        for r in row_reads:
            slots[i, at : at + r.visible] = torch.tensor(store.slots(r.block, 0, r.visible))
            shifts[i, at : at + r.visible] = -r.shift
            placed.append((r, at))
            at += r.visible
        placements.append(placed)
    rotation = shape.rope.rotation(shifts.flatten(), shape.dtype, shape.device)
    mask = _mask(shape, shape.local, size, placements)
    if mask is not None:  # [kvh * R, T * g, S], the batch layout of the tail matmul
        kv_heads, width = store.pool.shape[2], shape.group * shape.tokens
        mask = mask.reshape(1, -1, size).expand(kv_heads, -1, -1).reshape(-1, width, size)
    return TailGather(size, slots.flatten().to(shape.device), rotation, mask)


def _mask(shape: _Shape, rows: range, width: int, placements: list[_Placed]) -> torch.Tensor | None:
    """Additive mask ``[len(rows), T, g, width]``: -inf where a row may not look, or None.
    ``placements[k]``: where row ``rows[k]``'s reads sit among the ``width`` columns."""
    tokens = shape.tokens
    allowed = torch.zeros(len(rows), tokens, width, dtype=torch.bool)
    for k, i in enumerate(rows):
        query = torch.arange(tokens).clamp(max=shape.rows[i].tokens - 1)  # padding repeats the last token
        for r, col in placements[k]:
            seen = allowed[k, :, col : col + r.visible]
            if r.own >= 0:  # causal inside the row's own block
                seen.copy_(torch.arange(r.visible)[None, :] <= (r.own + query)[:, None])
            else:
                seen.fill_(True)
    if allowed.all():
        return None
    mask = torch.zeros(allowed.shape, dtype=shape.dtype).masked_fill_(~allowed, float("-inf"))
    return mask[:, :, None].expand(-1, -1, shape.group, -1).to(shape.device)
