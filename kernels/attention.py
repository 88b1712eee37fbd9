"""Attention of many rows (workers) over a shared pool of KV blocks, with query rotation.

Every block's keys are stored RoPE-rotated at block-local positions 0..len-1, and each row's new
tokens enter the model at block-local positions of the row's own (target) block, so the new keys
are stored as they come. A row whose target sits at view offset o_t reads block b at offset o_b by
rotating its query by ``o_t - o_b``: ``(R(o_t - o_b) R(j) q) . (R(i) k_i)`` is the score of query
view position o_t + j against key view position o_b + i. No key of a block is rotated per step.

Rows of one forward may belong to unrelated sessions (disjoint views), so a block is scored only by
the rows that read it. Blocks are read in two ways, chosen per step by the planner (one plan serves
every layer):

* **direct** chunks: a block read in place, one matmul per contiguous run of its pages in the pool,
  by the queries of a contiguous range of rows (``rows``: its readers, a slice of the queries, no
  gather), rotated once for the chunk. The shared history of a session is one chunk, whatever its
  length (and a few runs, however it grew); S sessions cost S chunks of their own rows each.
* the **tail**: small blocks (headers, unfinished steps), gathered per row in view order and rotated
  in one pass, then read by all rows with one batched matmul. Its size is bounded by step lengths,
  not context; rows with fewer tail tokens are padded with the pool's null slot (zeros, masked).

Direct chunks whose keys exist before the step (no row writes into them: the shared history) come
first; the plan's leading ``stable`` ones are scored before the step's new entries are stored, so a
caller that receives those entries from other devices overlaps the transfer with them (``arrive``).

Each part (a run of a direct chunk, or the tail) gives scores for its rows; they are merged per
query with a log-sum-exp (softmax) merge: the query's max over all its parts, then ``exp`` and the
sums (in float32, whatever the model's dtype), then the normalised probabilities times the part's
values accumulate into the rows' slice of the output. A row never touches a part it does not read,
so nothing in another session's blocks (not even a NaN) reaches it. Additive masks carry causality
inside a row's own block, visibility (lagged peers, rows inside a chunk's range that do not read
it) and padding. Queries are laid out ``[kv_heads, rows * group * T, d]`` so grouped-query heads
share each key read.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from kernels.rope import Rotation


@dataclass(frozen=True)
class DirectChunk:
    """A block's first ``length`` tokens, read in place: pool ranges ``(start, n)`` in token order,
    scored by the local rows ``rows[0]..rows[1]-1`` (the block's readers; ``R`` rows)."""

    runs: tuple[tuple[int, int], ...]
    length: int
    rows: tuple[int, int]
    rotation: Rotation | None  # per row, shape [R, 1, d]; None when no reader needs one
    mask: torch.Tensor | None  # [R * group * T, length] additive, or None

    def slots(self) -> list[int]:
        """The pool slots read, in token order."""
        return [s for start, n in self.runs for s in range(start, start + n)]


@dataclass(frozen=True)
class TailGather:
    """Small blocks gathered per row: ``slots`` [rows * size] pool slots, keys rotated per slot."""

    size: int
    slots: torch.Tensor  # [rows * size] long
    rotation: Rotation  # shape [rows * size, d]
    mask: torch.Tensor | None  # [kv_heads * rows, group * T, size] additive, or None


@dataclass(frozen=True)
class AttentionPlan:
    """Everything a layer needs for one step, built once per step (integers turned into tensors)."""

    rows: int  # rows whose queries are computed here
    tokens: int  # padded tokens per row (T)
    write_src: torch.Tensor | None  # [n_new] indices into written rows * T; None: all are real
    write_slots: torch.Tensor  # [n_new] pool slots of the new entries
    direct: tuple[DirectChunk, ...]
    stable: int  # the first ``stable`` direct chunks hold no entry written this step: read them early
    tail: TailGather | None


def write_new_entries(
    kv: torch.Tensor, k_new: torch.Tensor, v_new: torch.Tensor, plan: AttentionPlan
) -> None:
    """Store this step's keys/values (``[rows, kv_heads, T, d]``, block-local) at their slots."""
    rows, heads, tokens, dim = k_new.shape
    new = torch.stack((k_new.transpose(0, 1), v_new.transpose(0, 1))).view(2, heads, rows * tokens, dim)
    if plan.write_src is not None:
        new = new.index_select(2, plan.write_src)
    kv.index_copy_(2, plan.write_slots, new)


def block_attention(
    q: torch.Tensor,
    kv: torch.Tensor,
    plan: AttentionPlan,
    scale: float,
    arrive: Callable[[], None] | None = None,
) -> torch.Tensor:
    """Attention output ``[rows, T, heads, d]`` (a view) for queries ``q`` ``[rows, heads, T, d]``.

    ``kv`` is one layer of the pool, ``[2, kv_heads, slots, d]`` (keys, values). It holds this
    step's new entries already, or ``arrive`` stores them: it is called once, after the stable
    chunks are scored and before anything that reads a new entry.
    """
    rows, n_heads, tokens, dim = q.shape
    kv_heads = kv.shape[1]
    width = n_heads // kv_heads * tokens  # query rows per (row, kv head): group * T
    q = q.reshape(rows, kv_heads, width, dim).transpose(0, 1).contiguous().mul_(scale)  # [kvh, R, gT, d]
    parts: list[tuple[slice, torch.Tensor, torch.Tensor]] = []  # (query rows, scores, values)

    def score(chunk: DirectChunk) -> None:
        first, end = chunk.rows
        qc = q[:, first:end] if chunk.rotation is None else chunk.rotation.apply(q[:, first:end])
        qc = qc.reshape(kv_heads, (end - first) * width, dim)  # a view: the rows are contiguous
        at = 0
        for start, n in chunk.runs:
            mask = None if chunk.mask is None else chunk.mask[:, at : at + n]
            scores = _scores(mask, qc, kv[0, :, start : start + n].transpose(1, 2))
            parts.append((slice(first * width, end * width), scores, kv[1, :, start : start + n]))
            at += n

    for chunk in plan.direct[: plan.stable]:
        score(chunk)
    if arrive is not None:
        arrive()
    for chunk in plan.direct[plan.stable :]:
        score(chunk)
    if plan.tail is not None:
        tail = plan.tail
        gathered = kv.index_select(2, tail.slots)  # [2, kvh, R * S, d]
        keys = tail.rotation.apply(gathered[0]).view(kv_heads * rows, tail.size, dim)
        scores = _scores(tail.mask, q.view(kv_heads * rows, width, dim), keys.transpose(1, 2))
        values = gathered[1].view(kv_heads * rows, tail.size, dim)  # batched per (kv head, row)
        parts.append((slice(None), scores.view(kv_heads, rows * width, tail.size), values))

    # log-sum-exp merge per query over all its parts, in float32 (half-precision scores are
    # normalised in float32): its max, exp and sums, then its probabilities times values
    top = q.new_full((kv_heads, rows * width), float("-inf"), dtype=torch.float32)
    total, out = torch.zeros_like(top), q.new_zeros(kv_heads, rows * width, dim)
    parts = [(scores.float(), values, top[:, span], total[:, span], out[:, span])  # no copy if float32
             for span, scores, values in parts]
    for scores, _, top_rows, _, _ in parts:
        torch.maximum(top_rows, scores.amax(dim=-1), out=top_rows)
    for scores, _, top_rows, total_rows, _ in parts:
        total_rows.add_(scores.sub_(top_rows[..., None]).exp_().sum(dim=-1))
    for scores, values, _, total_rows, out_rows in parts:
        p = scores.div_(total_rows[..., None]).to(q.dtype)
        batches = values.shape[0]  # kv heads (direct) or kv heads * rows (tail)
        out_rows.view(batches, -1, dim).baddbmm_(p.view(batches, -1, p.shape[-1]), values)
    # [kvh, R, g, T, d] -> [R, T, kvh, g, d] == [R, T, heads, d]
    return out.view(kv_heads, rows, n_heads // kv_heads, tokens, dim).permute(1, 3, 0, 2, 4)


def _scores(mask: torch.Tensor | None, q: torch.Tensor, keys_t: torch.Tensor) -> torch.Tensor:
    """``mask + q @ keys_t`` in one batched matmul."""
    return torch.bmm(q, keys_t) if mask is None else torch.baddbmm(mask, q, keys_t)
