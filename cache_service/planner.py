"""Turn one step's rows (views + token counts) into an ``AttentionPlan`` and model positions.

All per-step attention metadata is built here, once per step, and shared by every layer: view
offsets, the positions the model rotates queries and keys to, where new entries land, which blocks
are read in place and which are gathered, the query/key rotations and one additive mask.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum

import torch

from cache_service.errors import ConfigError, LayoutError
from cache_service.kv_store import KVStore
from cache_service.layout import View
from kernels.attention import AttentionPlan, DirectChunk, TailGather
from kernels.rope import RopeTable

DIRECT_MIN_TOKENS = 128


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
class _Read:
    row: int
    block: int
    offset: int  # view offset of the block for this row
    visible: int  # tokens of the block this row may see
    own: int  # -1, or the block length before the step when this is the row's own target


_Segment = tuple[int, list[list[tuple[_Read, int]]]]  # (width, per row: [(read, column)])


def plan_step(
    store: KVStore,
    rows: list[Row],
    mode: Mode,
    rope: RopeTable,
    *,
    direct_min: int = DIRECT_MIN_TOKENS,
    local: range | None = None,
    write_remote: bool = True,
) -> tuple[AttentionPlan, torch.Tensor]:
    """Plan one step; returns the plan and model ``position_ids`` ``[local rows, T]``.

    ``local``: the rows this device computes (default all; queries, positions and mask cover only
    them). ``write_remote``: whether the layers write the new entries of all rows (they arrive by
    exchange, instant mode) or only the local rows' (the rest is exchanged after the step).
    Must be called before the new tokens are counted in the store's block lengths; the caller
    advances the targets' lengths after the forward pass.
    """
    device, dtype = store.arena.device, store.arena.dtype
    writers = _writers(rows)
    before = {b: store.length(b) for b in writers}
    n_rows, tokens = len(rows), max(r.tokens for r in rows)

    def visible(i: int, block: int) -> int:
        if block == rows[i].view.target:
            return before[block] + rows[i].tokens
        if block in writers:
            return before[block] + (rows[writers[block]].tokens if mode is Mode.INSTANT else 0)
        return store.length(block)

    reads: list[_Read] = []
    target_offset = []
    for i, row in enumerate(rows):
        offset = 0
        for block in row.view.blocks:
            vis = visible(i, block)
            own = before[block] if block == row.view.target else -1
            if block == row.view.target:
                target_offset.append(offset)
            if vis:
                reads.append(_Read(i, block, offset, vis, own))
            offset += vis

    positions = torch.zeros(n_rows, tokens, dtype=torch.long)
    write_src, write_slots, write_rot = [], [], []
    for i, row in enumerate(rows):
        first = target_offset[i] + before[row.view.target]
        positions[i] = torch.arange(first, first + tokens).clamp(max=first + row.tokens - 1)
        write_src.extend(range(i * tokens, i * tokens + row.tokens))
        write_slots.extend(store.slots(row.view.target, before[row.view.target],
                                       before[row.view.target] + row.tokens))
        write_rot.extend([-target_offset[i]] * row.tokens)

    direct_blocks = _direct_blocks(reads, direct_min)
    direct: list[DirectChunk] = []
    segments: list[_Segment] = []
    for block in direct_blocks:
        block_reads = {r.row: r for r in reads if r.block == block}
        length = max(r.visible for r in block_reads.values())
        offsets = torch.tensor([-block_reads[i].offset if i in block_reads else 0 for i in range(n_rows)])
        cos = sin = None
        if offsets.any():
            cos, sin = rope.cos_sin(offsets[:, None, None], dtype, device)
        direct.append(DirectChunk(store.span(block).start, length, cos, sin))
        segments.append((length, [[(block_reads[i], 0)] if i in block_reads else [] for i in range(n_rows)]))

    tail = None
    tail_reads = [[r for r in reads if r.row == i and r.block not in direct_blocks] for i in range(n_rows)]
    size = max(sum(r.visible for r in row_reads) for row_reads in tail_reads)
    if size:
        slots = torch.zeros(n_rows, size, dtype=torch.long)
        rot = torch.zeros(n_rows, size, dtype=torch.long)
        placements = []
        for i, row_reads in enumerate(tail_reads):
            at, placed = 0, []
            for r in row_reads:
                slots[i, at : at + r.visible] = torch.tensor(store.slots(r.block, 0, r.visible))
                rot[i, at : at + r.visible] = r.offset
                placed.append((r, at))
                at += r.visible
            placements.append(placed)
        cos, sin = rope.cos_sin(rot.flatten(), dtype, device)
        tail = TailGather(size, slots.flatten().to(device), cos, sin)
        segments.append((size, placements))

    mask = _mask(rows, tokens, segments)
    local = local or range(n_rows)
    if not write_remote:
        keep = [k for k, src in enumerate(write_src) if src // tokens in local]
        write_src = [write_src[k] - local.start * tokens for k in keep]
        write_slots = [write_slots[k] for k in keep]
        write_rot = [write_rot[k] for k in keep]
    write_rot_t = torch.tensor(write_rot)
    write_cos = write_sin = None
    if write_rot_t.any():
        write_cos, write_sin = rope.cos_sin(write_rot_t, dtype, device)
    n_new = len(write_src)
    writers_rows = n_rows if write_remote else len(local)
    if local != range(n_rows):
        direct, tail, mask = _restrict(direct, tail, mask, local)
    plan = AttentionPlan(
        rows=len(local),
        tokens=tokens,
        write_src=None if n_new == writers_rows * tokens else torch.tensor(write_src, device=device),
        write_slots=torch.tensor(write_slots, device=device),
        write_cos=write_cos,
        write_sin=write_sin,
        direct=tuple(direct),
        tail=tail,
        mask=None if mask is None else mask.to(device=device, dtype=dtype),
    )
    return plan, positions[local.start : local.stop].to(device)


def _restrict(direct, tail, mask, local: range):
    """Keep only the query side of ``local`` rows (the writes are chosen by the caller)."""
    rows = slice(local.start, local.stop)
    direct = [
        DirectChunk(c.start, c.length, None if c.q_cos is None else c.q_cos[rows],
                    None if c.q_sin is None else c.q_sin[rows])
        for c in direct
    ]
    if tail is not None:
        span = slice(local.start * tail.size, local.stop * tail.size)
        tail = TailGather(tail.size, tail.slots[span], tail.k_cos[span], tail.k_sin[span])
    return direct, tail, None if mask is None else mask[rows]


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


def _direct_blocks(reads: list[_Read], direct_min: int) -> list[int]:
    """Blocks read in place: long ones (and each view's first block, read at offset 0)."""
    chosen: list[int] = []
    for r in reads:
        if r.block not in chosen and (r.visible >= direct_min or r.offset == 0 and r.own < 0):
            chosen.append(r.block)
    return chosen


def _mask(rows: list[Row], tokens: int, segments: list[_Segment]) -> torch.Tensor | None:
    """Additive mask [rows, T, keys]: -inf where a row may not look (padding, not read, causal)."""
    total = sum(width for width, _ in segments)
    allowed = torch.zeros(len(rows), tokens, total, dtype=torch.bool)
    at = 0
    for width, placements in segments:
        for i, placed in enumerate(placements):
            query = torch.arange(tokens).clamp(max=rows[i].tokens - 1)
            for r, col in placed:
                keys = torch.arange(r.visible)
                seen = allowed[i, :, at + col : at + col + r.visible]
                if r.own >= 0:  # causal inside the row's own block
                    seen.copy_(keys[None, :] <= (r.own + query)[:, None])
                else:
                    seen.fill_(True)
        at += width
    if allowed.all():
        return None
    return torch.zeros(allowed.shape).masked_fill_(~allowed, float("-inf"))
