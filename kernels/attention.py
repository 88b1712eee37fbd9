"""Attention of many rows (workers) over a shared pool of KV blocks, with query rotation.

Rows carry different numbers of new tokens (most carry one; a row starting a new step carries a
few forced ones), so the step's queries are packed: token after token, row after row, with no
padding (the model's linear layers see only real tokens). Only the tail pads rows to the step's
longest row (``T``), and the K/V entries exchanged between devices are padded the same way.

Every block's keys are stored RoPE-rotated at block-local positions 0..len-1, and each row's new
tokens enter the model at block-local positions of the row's own (target) block, so the new keys
are stored as they come. A row whose target sits at view offset o_t reads block b at offset o_b by
rotating its query by ``o_t - o_b``: ``(R(o_t - o_b) R(j) q) . (R(i) k_i)`` is the score of query
view position o_t + j against key view position o_b + i. No key of a block is rotated per step.

Rows of one forward may belong to unrelated sessions (disjoint views), so a block is scored only by
the rows that read it. Blocks are read in two ways, chosen per step by the planner (one plan serves
every layer):

* **direct** chunks: a block read in place, one matmul per contiguous run of its pages in the pool,
  by the queries of a contiguous range of rows (``rows``: its readers, a slice of the packed
  queries, no gather). The queries of every chunk read at an offset are rotated together, once
  per layer. The shared history of a session is one chunk, whatever its
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
it) and padding. Queries are laid out ``[kv_heads, tokens * group, d]`` so grouped-query heads
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
    scored by the local rows ``rows[0]..rows[1]-1`` (the block's readers), whose packed query tokens
    are ``tokens[0]..tokens[1]-1``. ``rotated``: where those queries start among the plan's rotated
    queries (None: read unrotated)."""

    runs: tuple[tuple[int, int], ...]
    length: int
    rows: tuple[int, int]
    tokens: tuple[int, int]
    rotated: int | None
    mask: torch.Tensor | None  # [n_tokens * group, length] additive, or None

    def slots(self) -> list[int]:
        """The pool slots read, in token order."""
        return [s for start, n in self.runs for s in range(start, start + n)]


@dataclass(frozen=True)
class TailGather:
    """Small blocks gathered per row: ``slots`` [rows * size] pool slots, keys rotated per slot."""

    size: int
    slots: torch.Tensor  # [rows * size] long
    rotation: Rotation  # shape [rows * size, d]
    mask: torch.Tensor | None  # [kv_heads * rows, T * group, size] additive, or None


@dataclass(frozen=True)
class AttentionPlan:
    """Everything a layer needs for one step, built once per step (integers turned into tensors)."""

    rows: int  # rows whose queries are computed here
    tokens: int  # T: the most new tokens of any row of the step (the padded width)
    padded: torch.Tensor  # [rows * T] packed token of each padded position (padding repeats a row's last)
    packed: torch.Tensor  # [n] padded position of each packed token
    write_src: torch.Tensor | None  # [n_new] indices into entries padded to [rows * T]; None: all real
    write_slots: torch.Tensor  # [n_new] pool slots of the new entries
    query_index: torch.Tensor | None  # [n_rot] packed tokens whose queries direct chunks read rotated
    query_rotation: Rotation | None  # shape [n_rot, 1, d]
    direct: tuple[DirectChunk, ...]
    stable: int  # the first ``stable`` direct chunks hold no entry written this step: read them early
    tail: TailGather | None


def write_new_entries(
    kv: torch.Tensor, k_new: torch.Tensor, v_new: torch.Tensor, plan: AttentionPlan
) -> None:
    """Store this step's keys/values at their slots: packed ``[1, kv_heads, n, d]`` (this device's
    rows), or padded ``[rows, kv_heads, T, d]`` as an exchange delivers them."""
    heads, dim = k_new.shape[1], k_new.shape[3]
    new = torch.stack((k_new.transpose(0, 1), v_new.transpose(0, 1))).view(2, heads, -1, dim)
    if new.shape[2] != plan.write_slots.numel():  # padded: keep the real entries
        new = new.index_select(2, plan.write_src)
    kv.index_copy_(2, plan.write_slots, new)


def pad_rows(x: torch.Tensor, plan: AttentionPlan) -> torch.Tensor:
    """Packed ``[1, heads, n, d]`` to padded ``[rows, heads, T, d]`` (what an exchange sends)."""
    heads, dim = x.shape[1], x.shape[3]
    return x[0].index_select(1, plan.padded).view(heads, plan.rows, plan.tokens, dim).transpose(0, 1)


def block_attention(
    q: torch.Tensor,
    kv: torch.Tensor,
    plan: AttentionPlan,
    scale: float,
    arrive: Callable[[], None] | None = None,
) -> torch.Tensor:
    """Attention output ``[1, n, heads, d]`` for packed queries ``q`` ``[1, heads, n, d]``.

    ``kv`` is one layer of the pool, ``[2, kv_heads, slots, d]`` (keys, values). It holds this
    step's new entries already, or ``arrive`` stores them: it is called once, after the stable
    chunks are scored and before anything that reads a new entry.
    """
    _, n_heads, n, dim = q.shape
    kv_heads = kv.shape[1]
    group = n_heads // kv_heads
    q = q[0].view(kv_heads, group, n, dim).transpose(1, 2).contiguous().mul_(scale)  # [kvh, n, g, d]
    rotated = None if plan.query_rotation is None else plan.query_rotation.apply(q.index_select(1, plan.query_index))
    direct: list[tuple[slice, torch.Tensor, torch.Tensor]] = []  # (query rows, scores, values)

    def score(chunk: DirectChunk) -> None:
        first, end = chunk.tokens
        if chunk.rotated is None:
            qc = q[:, first:end]
        else:
            qc = rotated[:, chunk.rotated : chunk.rotated + end - first]
        qc = qc.reshape(kv_heads, (end - first) * group, dim)  # a view
        at = 0
        for start, count in chunk.runs:
            mask = None if chunk.mask is None else chunk.mask[:, at : at + count]
            scores = _scores(mask, qc, kv[0, :, start : start + count].transpose(1, 2))
            direct.append((slice(first * group, end * group), scores.float(), kv[1, :, start : start + count]))
            at += count

    for chunk in plan.direct[: plan.stable]:
        score(chunk)
    if arrive is not None:
        arrive()
    for chunk in plan.direct[plan.stable :]:
        score(chunk)

    # log-sum-exp merge per query over all its parts, in float32 (half-precision scores are
    # normalised in float32): its max, then exp and the sums, then one division at the end
    top = q.new_full((kv_heads, n * group), float("-inf"), dtype=torch.float32)
    total, out = torch.zeros_like(top), q.new_zeros(kv_heads, n * group, dim)
    tail = _tail_scores(q, kv, plan) if plan.tail is not None else None
    for span, scores, _ in direct:
        torch.maximum(top[:, span], scores.amax(dim=-1), out=top[:, span])
    if tail is not None:
        torch.maximum(top, _unpad(tail[0].amax(dim=-1), plan, group), out=top)
    for span, scores, values in direct:
        total[:, span].add_(scores.sub_(top[:, span, None]).exp_().sum(dim=-1))
        out[:, span].baddbmm_(scores.to(q.dtype), values)
    if tail is not None:
        scores, values = tail
        rows = plan.rows
        top_padded = top.view(kv_heads, n, group).index_select(1, plan.padded).view(kv_heads * rows, -1, 1)
        scores = scores.sub_(top_padded).exp_()
        total.add_(_unpad(scores.sum(dim=-1), plan, group))
        out.add_(_unpad(torch.bmm(scores.to(q.dtype), values), plan, group))
    out = out.div_(total[..., None]) if out.dtype == torch.float32 else (out / total[..., None]).to(q.dtype)
    # [kvh, n, g, d] -> [n, kvh, g, d] == [1, n, heads, d]
    return out.view(kv_heads, n, group, dim).transpose(0, 1).reshape(1, n, n_heads, dim)


def _tail_scores(q: torch.Tensor, kv: torch.Tensor, plan: AttentionPlan) -> tuple[torch.Tensor, torch.Tensor]:
    """The tail's float32 scores ``[kvh * rows, T * g, size]`` for queries padded per row, and its
    values ``[kvh * rows, size, d]``."""
    tail, (kv_heads, _, group, dim) = plan.tail, q.shape
    gathered = kv.index_select(2, tail.slots)  # [2, kvh, R * S, d]
    keys = tail.rotation.apply(gathered[0]).view(kv_heads * plan.rows, tail.size, dim)
    queries = q.index_select(1, plan.padded).view(kv_heads * plan.rows, plan.tokens * group, dim)
    scores = _scores(tail.mask, queries, keys.transpose(1, 2)).float()
    return scores, gathered[1].view(kv_heads * plan.rows, tail.size, dim)


def _unpad(x: torch.Tensor, plan: AttentionPlan, group: int) -> torch.Tensor:
    """Per-query values ``[kvh * rows, T * g, ...]`` of the padded layout, packed: ``[kvh, n * g, ...]``."""
    kv_heads = x.shape[0] // plan.rows
    padded = x.reshape(kv_heads, plan.rows * plan.tokens, group, *x.shape[2:])
    return padded.index_select(1, plan.packed).flatten(1, 2)


def _scores(mask: torch.Tensor | None, q: torch.Tensor, keys_t: torch.Tensor) -> torch.Tensor:
    """``mask + q @ keys_t`` in one batched matmul."""
    return torch.bmm(q, keys_t) if mask is None else torch.baddbmm(mask, q, keys_t)
