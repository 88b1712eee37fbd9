"""Attention of many rows (workers) over a shared pool of KV blocks, with query rotation.

Every block's keys are stored RoPE-rotated at block-local positions 0..len-1, and each row's new
tokens enter the model at block-local positions of the row's own (target) block, so the new keys
are stored as they come. A row whose target sits at view offset o_t reads block b at offset o_b by
rotating its query by ``o_t - o_b``: ``(R(o_t - o_b) R(j) q) . (R(i) k_i)`` is the score of query
view position o_t + j against key view position o_b + i. No key of a block is rotated per step.

Blocks are read in two ways, chosen per step by the planner (one plan serves every layer):

* **direct** chunks: a block read in place by all rows, one matmul per contiguous run of its pages
  in the pool, the rows' queries rotated once for the chunk. The shared history is one chunk,
  whatever its length (and a few runs, however it grew).
* the **tail**: small blocks (headers, unfinished steps), gathered per row in view order and rotated
  in one pass, then read with one batched matmul. Its size is bounded by step lengths, not context.

Direct chunks whose keys exist before the step (no row writes into them: the shared history) come
first; the plan's leading ``stable`` ones are scored before the step's new entries are stored, so a
caller that receives those entries from other devices overlaps the transfer with them (``arrive``).

Scores of all chunks are concatenated and normalised by one softmax (the same as a log-sum-exp
merge of per-chunk results); additive masks carry causality inside a row's own block, visibility
(lagged peers, blocks a row does not read) and padding. Queries are laid out ``[kv_heads, rows *
group * T, d]`` so grouped-query heads share each key read.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from kernels.rope import Rotation


@dataclass(frozen=True)
class DirectChunk:
    """A block's first ``length`` tokens, read in place: pool ranges ``(start, n)`` in token order."""

    runs: tuple[tuple[int, int], ...]
    length: int
    rotation: Rotation | None  # per row, shape [rows, 1, d]; None when no reader needs one
    mask: torch.Tensor | None  # [rows * group * T, length] additive, or None

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

    def direct_scores(chunk: DirectChunk) -> list[torch.Tensor]:  # per run: [kvh, R * gT, n]
        qc = (q if chunk.rotation is None else chunk.rotation.apply(q)).view(kv_heads, rows * width, dim)
        scores, at = [], 0
        for start, n in chunk.runs:
            mask = None if chunk.mask is None else chunk.mask[:, at : at + n]
            scores.append(_scores(mask, qc, kv[0, :, start : start + n].transpose(1, 2)))
            at += n
        return scores

    parts = [s for chunk in plan.direct[: plan.stable] for s in direct_scores(chunk)]
    if arrive is not None:
        arrive()
    parts += [s for chunk in plan.direct[plan.stable :] for s in direct_scores(chunk)]
    if plan.tail is not None:
        tail = plan.tail
        gathered = kv.index_select(2, tail.slots)  # [2, kvh, R * S, d]
        keys = tail.rotation.apply(gathered[0]).view(kv_heads * rows, tail.size, dim)
        scores = _scores(tail.mask, q.view(kv_heads * rows, width, dim), keys.transpose(1, 2))
        parts.append(scores.view(kv_heads, rows * width, tail.size))

    scores = torch.cat(parts, dim=-1) if len(parts) > 1 else parts[0]
    if scores.dtype == torch.float32:
        probs = scores.softmax(dim=-1)
    else:  # normalise half-precision scores in float32
        probs = scores.softmax(dim=-1, dtype=torch.float32).to(q.dtype)

    out = q.new_zeros(kv_heads, rows * width, dim) if not plan.direct else None
    at = 0
    for start, n in (run for chunk in plan.direct for run in chunk.runs):
        values = kv[1, :, start : start + n]
        p = probs[..., at : at + n]
        out = torch.bmm(p, values) if out is None else torch.baddbmm(out, p, values)
        at += n
    if plan.tail is not None:
        values = gathered[1].view(kv_heads * rows, plan.tail.size, dim)
        p = probs[..., at:].reshape(kv_heads * rows, width, plan.tail.size)
        out = torch.baddbmm(out.view(kv_heads * rows, width, dim), p, values)
    # [kvh, R, g, T, d] -> [R, T, kvh, g, d] == [R, T, heads, d]
    return out.view(kv_heads, rows, n_heads // kv_heads, tokens, dim).permute(1, 3, 0, 2, 4)


def _scores(mask: torch.Tensor | None, q: torch.Tensor, keys_t: torch.Tensor) -> torch.Tensor:
    """``mask + q @ keys_t`` in one batched matmul."""
    return torch.bmm(q, keys_t) if mask is None else torch.baddbmm(mask, q, keys_t)
