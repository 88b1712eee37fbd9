"""The distributed ``Backend``: one worker actor's part of a lockstep (SPMD) session.

Every actor holds a full replica of the cache and hosts a contiguous range of workers; all actors
run the same program and make the same calls in the same order. A step's rows are put in rank
order (global order), each actor computes its own rows, and:

* instant mode: every layer all-gathers the rows' new K/V (``instant_exchange``), overlapping the
  transfer with attention over a long enough shared history (``HogwildEngine.overlap_min``);
* lagged mode: the forward stores only local rows' entries, then one all-gather per step hands
  every actor the others' entries (read back from the store, written with ``write_entries``).

Sampled tokens are all-gathered, so every actor returns every row's token and takes the same
decisions. Prefill runs once, on rank 0, and its entries are broadcast. Commits are local (every
replica appends the same entries). Rank 0 reports writes and commits to a ``Recorder`` (the
CacheService, off the critical path: it copies entries to the host asynchronously).
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

import torch

from cache_service.errors import ConfigError
from cache_service.layout import View
from cache_service.planner import Mode
from cache_service.service import Committed, Record, Wrote
from workers.backend import DecodeGroup, PrefillChunk, sample_rows
from workers.engine import HogwildEngine
from workers.exchange import Collective
from workers.sampling import SamplingParams, worker_generator

Rows = Sequence[tuple[View, Sequence[int]]]


class Recorder(Protocol):
    """Where rank 0 reports what it writes (e.g. a buffer flushed to the CacheService)."""

    def record(self, record: Record) -> None: ...


@dataclass(frozen=True)
class Placement:
    """Workers per actor (``counts``, in rank order) and this actor's rank."""

    counts: tuple[int, ...]
    rank: int

    def __post_init__(self) -> None:
        if not self.counts or min(self.counts) < 1:
            raise ConfigError(f"every actor must host at least one worker, got {self.counts}")
        if not 0 <= self.rank < len(self.counts):
            raise ConfigError(f"rank {self.rank} is outside a world of {len(self.counts)} actors")

    @property
    def world(self) -> int:
        return len(self.counts)

    @property
    def workers(self) -> range:
        """The global worker indices this actor hosts."""
        start = sum(self.counts[: self.rank])
        return range(start, start + self.counts[self.rank])

    def owner(self, worker: int) -> int:
        """The rank hosting ``worker``."""
        end = 0
        for rank, count in enumerate(self.counts):
            end += count
            if worker < end:
                return rank
        raise ConfigError(f"worker {worker} is not hosted: the session has {end} workers")


@dataclass(frozen=True)
class StepOrder:
    """A step's rows in global (rank) order: ``order[i]`` = caller's index of global row i."""

    order: tuple[int, ...]
    counts: tuple[int, ...]  # rows per rank in this step
    local: range  # this rank's global rows

    @classmethod
    def of(cls, workers: Sequence[int], placement: Placement) -> "StepOrder":
        return cls.by_rank([placement.owner(w) for w in workers], placement.rank, placement.world)

    @classmethod
    def by_rank(cls, owners: Sequence[int], rank: int, world: int) -> "StepOrder":
        """Rows owned by ``owners[i]``, stably sorted by rank (a rank's rows keep their order)."""
        order = tuple(sorted(range(len(owners)), key=lambda i: owners[i]))
        counts = tuple(list(owners).count(r) for r in range(world))
        start = sum(counts[:rank])
        return cls(order, counts, range(start, start + counts[rank]))

    def arrange(self, items: Sequence) -> list:
        """Caller order -> global order."""
        return [items[i] for i in self.order]

    def restore(self, items: Sequence) -> list:
        """Global order -> caller order."""
        out = [None] * len(items)
        for global_row, caller in enumerate(self.order):
            out[caller] = items[global_row]
        return out


class DistributedBackend:
    """``Backend`` of one actor of a lockstep session (see the module docstring)."""

    def __init__(self, engine: HogwildEngine, params: SamplingParams, placement: Placement,
                 collective: Collective, recorder: Recorder | None = None) -> None:
        self.engine = engine
        self.params = params
        self.placement = placement
        self.collective = collective
        self.recorder = recorder
        self.generators = {w: worker_generator(params, w) for w in placement.workers}
        self.mirrored: set[int] = set()  # blocks whose whole K/V the recorder has

    # ---- Backend -----------------------------------------------------------------------------
    def new_block(self, reserve: int = 0) -> int:
        return self.engine.new_block(reserve)

    def length(self, block: int) -> int:
        return self.engine.length(block)

    def prefill(self, block: int, tokens: Sequence[int], context: Sequence[int] = ()) -> None:
        """Rank 0 encodes the tokens; every other actor receives the entries (one broadcast).
        Requests that would fail are refused on every rank alike, before any collective."""
        if not tokens:
            raise ConfigError("prefill needs at least one token")
        store, before = self.engine.store, self.engine.length(block)
        if self.placement.rank == 0:
            self.engine.prefill(block, tokens, context)
            entries = store.read(block)[:, :, :, before:]
        else:
            layers, two, kv_heads, head_dim = store.shape
            entries = store.pool.new_empty(layers, two, kv_heads, len(tokens), head_dim)
        entries = self.collective.broadcast(entries, src=0)
        if self.placement.rank != 0:
            store.append(block, entries)
        self._wrote(block, tokens, entries, mirror=before == 0 or block in self.mirrored)

    def share_prefix(self, block: int, tokens: Sequence[int]) -> int:
        """``KVStore.share_prefix`` on this actor's store (every actor alike); the recorder hears of
        the tokens (and their K/V) the block now starts with, as if they had been prefilled."""
        shared = self.engine.store.share_prefix(block, tokens)
        if shared:
            entries = self.engine.store.read(block) if self.recorder is not None else None
            self._wrote(block, tokens[:shared], entries, mirror=True)
        return shared

    def step(self, rows: Rows, workers: Sequence[int], *, greedy: bool = False,
             suppress: Sequence[int] = (), recent: Sequence[Sequence[int]] = ()) -> list[int]:
        """One token per row, sampled where the row's worker lives, known to every actor."""
        order = StepOrder.of(workers, self.placement)
        logits = self._forward(order.arrange(rows), order)
        mine = [self.generators[w] for w in order.arrange(workers)[order.local.start : order.local.stop]]
        near = order.arrange(recent)[order.local.start : order.local.stop] if recent else ()
        local = sample_rows(logits, self.params, mine, greedy, suppress, near) if len(order.local) else []
        return order.restore(self.collective.gather_tokens(local, order.counts))

    def commit(self, step_block: int, into: int) -> None:
        before = self.engine.length(into)
        self.engine.commit(step_block, into)
        if self.recorder is not None:
            mirrored = into in self.mirrored
            entries = self.engine.store.read(into)[:, :, :, before:] if mirrored else None  # the recorder copies
            self.mirrored.discard(step_block)
            self.recorder.record(Committed(step_block, into, entries))

    # ---- many sessions (a session host on every actor of a gang) -------------------------------
    def decode(self, groups: Sequence[DecodeGroup], prefills: Sequence[PrefillChunk] = ()) -> list[list[int]]:
        """One step of every group's rows (``Replica.decode``): a session's worker w runs on rank
        ``w % world``; rows are computed and sampled where they run, every layer exchanges every
        row's entries (a lagged row just does not read its peers' until the next step), and the
        tokens are all-gathered, so every actor returns every group's tokens. The prefill chunks
        are written first, each by rank 0 and broadcast (``prefill``)."""
        for chunk in prefills:
            self.prefill(chunk.block, chunk.tokens, chunk.context)
        if not groups:
            return []
        rows = [row for g in groups for row in g.rows]
        order = StepOrder.by_rank([w % self.placement.world for g in groups for w in g.workers],
                                  self.placement.rank, self.placement.world)
        modes = order.arrange([g.mode for g in groups for _ in g.rows])
        logits = self._forward(order.arrange(rows), order, modes=modes)
        samplers = order.arrange([(g, k) for g in groups for k in range(len(g.rows))])[order.local.start : order.local.stop]
        local = []
        for _, run in itertools.groupby(samplers, key=lambda item: id(item[0])):
            run = list(run)
            g, first = run[0][0], len(local)
            gens = [g.generators[k] for _, k in run]
            near = [g.recent[k] for _, k in run] if g.recent else ()
            local += sample_rows(logits[first : first + len(run)], g.params, gens, g.greedy, g.suppress, near)
        tokens = order.restore(self.collective.gather_tokens(local, order.counts))
        out, at = [], 0
        for g in groups:
            out.append(tokens[at : at + len(g.rows)])
            at += len(g.rows)
        return out

    # ---- teacher forcing (tests, benchmarks) -------------------------------------------------
    def forward(self, rows: Rows, workers: Sequence[int], *, all_logits: bool = False) -> dict[int, torch.Tensor]:
        """Write the rows' tokens; the logits of this actor's rows, by worker (last token, or all)."""
        order = StepOrder.of(workers, self.placement)
        logits = self._forward(order.arrange(rows), order, all_logits=all_logits)
        mine = order.arrange(workers)[order.local.start : order.local.stop]
        return {w: logits[i] for i, w in enumerate(mine)}

    # ---- one step ----------------------------------------------------------------------------
    def _forward(self, rows: Rows, order: StepOrder, all_logits: bool = False,
                 modes: Sequence[Mode] | None = None) -> torch.Tensor | list[torch.Tensor] | None:
        """Run a step of rows in global order; logits of the local rows (None when there are none).
        With ``modes`` (one per row) every layer exchanges every row's entries."""
        before = {view.target: self.engine.length(view.target) for view, _ in rows}
        computes = len(order.local) > 0
        lagged = modes is None and self.engine.mode is Mode.LAGGED
        solo = self.placement.world == 1
        logits = None
        if computes:
            exchange = None if solo or lagged else self.collective.instant_exchange(order.counts)
            logits = self.engine.forward(rows, all_logits=all_logits, local=order.local, exchange=exchange,
                                         modes=modes)
        if not solo and (lagged or not computes):
            self._receive_peers(rows, order, before, advanced=computes, lagged=lagged)
        for view, tokens in rows:
            self._wrote(view.target, tokens, None, mirror=False)
        return logits

    def _receive_peers(self, rows: Rows, order: StepOrder, before: dict[int, int], advanced: bool,
                       lagged: bool) -> None:
        """Store the other actors' new entries: one gather after a lagged step, or the per-layer
        gathers an idle actor joins during an instant step (it has no rows to compute)."""
        width = max(len(tokens) for _, tokens in rows)
        if lagged:
            gathered = self.collective.gather_rows(self._local_entries(rows, order, before, width), order.counts)
        else:
            gathered = self._join_instant_layers(len(order.local), width, order.counts)
        store = self.engine.store
        for i, (view, tokens) in enumerate(rows):
            if i in order.local:
                continue
            entries = gathered[i, :, :, :, : len(tokens)]
            if advanced:
                store.write_entries(view.target, before[view.target], entries)
            else:
                store.append(view.target, entries)

    def _local_entries(self, rows: Rows, order: StepOrder, before: dict[int, int], width: int) -> torch.Tensor:
        """``[local rows, layers, 2, kv_heads, width, d]``: what the local rows just wrote (padded)."""
        store = self.engine.store
        out = store.pool.new_zeros(len(order.local), *store.shape[:3], width, store.shape[3])
        for k, i in enumerate(order.local):
            view, tokens = rows[i]
            begin = before[view.target]
            out[k, :, :, :, : len(tokens)] = store.read(view.target)[:, :, :, begin : begin + len(tokens)]
        return out

    def _join_instant_layers(self, local: int, width: int, counts: Sequence[int]) -> torch.Tensor:
        """The per-layer all-gathers of an instant step, with no rows of our own."""
        store = self.engine.store
        layers, _, kv_heads, head_dim = store.shape
        nothing = store.pool.new_zeros(local, 2, kv_heads, width, head_dim)
        per_layer = [self.collective.gather_rows(nothing, counts) for _ in range(layers)]
        return torch.stack(per_layer, dim=1)  # [rows, layers, 2, kv_heads, width, d]

    # ---- the recorder ------------------------------------------------------------------------
    def _wrote(self, block: int, tokens: Sequence[int], entries: torch.Tensor | None, mirror: bool) -> None:
        if self.recorder is None:
            return
        if mirror:
            self.mirrored.add(block)
            self.recorder.record(Wrote(block, list(tokens), entries))  # the recorder copies it to the host
        else:
            self.mirrored.discard(block)
            self.recorder.record(Wrote(block, list(tokens)))
