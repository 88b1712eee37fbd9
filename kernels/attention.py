"""Attention of many rows (workers) over a shared arena of KV blocks, with query rotation.

Every block's keys are stored RoPE-rotated at block-local positions 0..len-1. A row whose query sits
at view position p and reads block b placed at view offset o_b scores key j as
``(R(p - o_b) q) . (R(j) k_j)``: the query is rotated once per block instead of rotating the keys.

Blocks are read in two ways, chosen per step by the planner (one plan serves every layer):

* **direct** chunks: a contiguous arena range read in place by all rows with one matmul; each row's
  query is rotated by ``-o_b`` (no copy of the block, whatever its length). The shared history is one.
* the **tail**: small blocks (headers, unfinished steps), gathered per row in view order and rotated
  to view positions in one pass, then read with one batched matmul. Its size is bounded by the step
  length, not by the context.

Scores of all chunks are concatenated and normalised by one softmax (equal to a log-sum-exp merge of
per-chunk results), with one additive mask for causality inside a row's own block, visibility
(lagged peers, blocks a row does not read) and padding.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from kernels.rope import rotate


@dataclass(frozen=True)
class DirectChunk:
    """Arena range ``[start, start + length)`` read in place; queries rotated by ``q_cos/q_sin``."""

    start: int
    length: int
    q_cos: torch.Tensor | None  # [rows, 1, 1, rotary_dim] or None when every reader has offset 0
    q_sin: torch.Tensor | None


@dataclass(frozen=True)
class TailGather:
    """Per-row gathered small blocks: ``slots`` [rows * size] arena slots, keys rotated to view."""

    size: int
    slots: torch.Tensor  # [rows * size] long
    k_cos: torch.Tensor  # [rows * size, rotary_dim]
    k_sin: torch.Tensor


@dataclass(frozen=True)
class AttentionPlan:
    """Everything a layer needs for one step, built once per step (integers turned into tensors)."""

    rows: int
    tokens: int  # padded tokens per row (T)
    write_src: torch.Tensor | None  # [n_new] indices into rows*T of real tokens; None: all are real
    write_slots: torch.Tensor  # [n_new] arena slots of the new tokens
    write_cos: torch.Tensor | None  # [n_new, rotary_dim]: block-local = view position - o_target
    write_sin: torch.Tensor | None
    direct: tuple[DirectChunk, ...]
    tail: TailGather | None
    mask: torch.Tensor | None  # [rows, T, total keys] additive (0 / -inf) in score dtype

    @property
    def total_keys(self) -> int:
        return sum(c.length for c in self.direct) + (self.tail.size if self.tail else 0)


def write_new_entries(
    kv: torch.Tensor, k_new: torch.Tensor, v_new: torch.Tensor, plan: AttentionPlan
) -> None:
    """Store this step's keys/values (``[rows, kv_heads, T, d]``) at their block-local slots."""
    rows, heads, tokens, dim = k_new.shape
    new = torch.stack((k_new, v_new)).transpose(1, 2).reshape(2, heads, rows * tokens, dim)
    if plan.write_src is not None:
        new = new.index_select(2, plan.write_src)
    if plan.write_cos is not None:
        new[0] = rotate(new[0], plan.write_cos, plan.write_sin)
    kv.index_copy_(2, plan.write_slots, new)


def block_attention(
    q: torch.Tensor, kv: torch.Tensor, plan: AttentionPlan, scale: float
) -> torch.Tensor:
    """Attention output ``[rows, T, heads, d]`` for queries ``q`` ``[rows, heads, T, d]``.

    ``kv`` is one layer of the arena, ``[2, kv_heads, capacity, d]`` (keys, values), already holding
    this step's new entries.
    """
    rows, n_heads, tokens, dim = q.shape
    kv_heads = kv.shape[1]
    group = n_heads // kv_heads
    q = q.reshape(rows, kv_heads, group * tokens, dim) * scale  # [R, kvh, gT, d]

    parts: list[torch.Tensor] = []  # scores, each [kvh, R, gT, L]
    for chunk in plan.direct:
        qc = q if chunk.q_cos is None else rotate(q, chunk.q_cos, chunk.q_sin)
        qc = qc.transpose(0, 1).reshape(kv_heads, rows * group * tokens, dim)
        keys = kv[0, :, chunk.start : chunk.start + chunk.length]
        parts.append(torch.matmul(qc, keys.transpose(1, 2)).view(kv_heads, rows, group * tokens, -1))
    if plan.tail is not None:
        gathered = kv.index_select(2, plan.tail.slots)  # [2, kvh, R*S, d]
        keys = rotate(gathered[0], plan.tail.k_cos, plan.tail.k_sin)
        keys = keys.view(kv_heads, rows, plan.tail.size, dim).transpose(0, 1)
        parts.append(torch.matmul(q, keys.transpose(2, 3)).transpose(0, 1))

    scores = torch.cat(parts, dim=-1) if len(parts) > 1 else parts[0].contiguous()
    if plan.mask is not None:
        scores.view(kv_heads, rows, group, tokens, -1).add_(plan.mask[None, :, None])
    probs = torch.softmax(scores, dim=-1, dtype=torch.float32).to(q.dtype)

    out = None
    at = 0
    for chunk in plan.direct:
        p = probs[..., at : at + chunk.length].reshape(kv_heads, rows * group * tokens, -1)
        values = kv[1, :, chunk.start : chunk.start + chunk.length]
        o = torch.matmul(p, values)
        out = o if out is None else out.add_(o)
        at += chunk.length
    out = None if out is None else out.view(kv_heads, rows, group * tokens, dim)
    if plan.tail is not None:
        values = gathered[1].view(kv_heads, rows, plan.tail.size, dim).transpose(0, 1)
        o = torch.matmul(probs[..., at:].transpose(0, 1), values).transpose(0, 1)
        out = o if out is None else out.add_(o)
    # [kvh, R, g*T, d] -> [R, T, heads, d]
    out = out.view(kv_heads, rows, group, tokens, dim).permute(1, 3, 0, 2, 4)
    return out.reshape(rows, tokens, n_heads, dim)
