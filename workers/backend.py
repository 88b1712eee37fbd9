"""What a collaboration protocol drives: a shared cache that steps workers and returns tokens.

The protocol (cluster/) sees block ids, views and sampled tokens, never logits or devices, so the
same deterministic program runs on one engine in the driver (``LocalBackend``) or, identically, in
every worker actor of a distributed session (whose backend exchanges K/V and all-gathers tokens).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

import torch

from cache_service.layout import View
from cache_service.planner import Mode
from workers.engine import HogwildEngine
from workers.sampling import SamplingParams, sample, worker_generator


@dataclass(frozen=True)
class DecodeGroup:
    """One session's rows of a batched decode step: row i is the session's worker ``workers[i]``,
    sampled from ``generators[i]`` with the session's parameters (greedy when asked, never one of
    ``suppress``); the rows see their peers' entries of this step as ``mode`` says. ``recent[i]``:
    the ids row i generated lately (the repetition penalty's; empty when the session has none)."""

    rows: Sequence[tuple[View, Sequence[int]]]
    workers: Sequence[int]
    mode: Mode
    params: SamplingParams
    generators: Sequence[torch.Generator]
    greedy: bool = False
    suppress: Sequence[int] = ()
    recent: Sequence[Sequence[int]] = ()


@dataclass(frozen=True)
class PrefillChunk:
    """Prompt tokens to write into ``block`` after the blocks of ``context`` (no sampling)."""

    block: int
    tokens: Sequence[int]
    context: Sequence[int] = ()


class Replica(Protocol):
    """What a session host runs rounds on: an engine (block bookkeeping), prefill, batched decode
    (``decode`` also writes ``prefills``: in the same forward where the replica can)."""

    engine: HogwildEngine

    def prefill(self, block: int, tokens: Sequence[int], context: Sequence[int] = ()) -> None: ...

    def decode(self, groups: Sequence[DecodeGroup], prefills: Sequence[PrefillChunk] = ()) -> list[list[int]]: ...

    def share_prefix(self, block: int, tokens: Sequence[int]) -> int: ...


class Backend(Protocol):
    """Shared-cache operations of one session; row i of a step is worker ``workers[i]``."""

    def new_block(self, reserve: int = 0) -> int: ...

    def length(self, block: int) -> int: ...

    def prefill(self, block: int, tokens: Sequence[int], context: Sequence[int] = ()) -> None: ...

    def step(
        self,
        rows: Sequence[tuple[View, Sequence[int]]],
        workers: Sequence[int],
        *,
        greedy: bool = False,
        suppress: Sequence[int] = (),
        recent: Sequence[Sequence[int]] = (),
    ) -> list[int]: ...

    def commit(self, step_block: int, into: int) -> None: ...


class LocalBackend:
    """All workers on one engine (one device); also a ``Replica`` for a host of many sessions."""

    def __init__(self, engine: HogwildEngine, params: SamplingParams | None = None, n_workers: int = 0) -> None:
        self.engine = engine
        self.params = params or SamplingParams()
        self.generators = [worker_generator(self.params, w) for w in range(n_workers)]

    def new_block(self, reserve: int = 0) -> int:
        return self.engine.new_block(reserve)

    def length(self, block: int) -> int:
        return self.engine.length(block)

    def prefill(self, block: int, tokens: Sequence[int], context: Sequence[int] = ()) -> None:
        self.engine.prefill(block, tokens, context)

    def step(
        self,
        rows: Sequence[tuple[View, Sequence[int]]],
        workers: Sequence[int],
        *,
        greedy: bool = False,
        suppress: Sequence[int] = (),
        recent: Sequence[Sequence[int]] = (),
    ) -> list[int]:
        group = DecodeGroup(rows, workers, self.engine.mode, self.params, [self.generators[w] for w in workers],
                            greedy, suppress, recent)
        return self.decode([group])[0]

    def decode(self, groups: Sequence[DecodeGroup], prefills: Sequence[PrefillChunk] = ()) -> list[list[int]]:
        """One forward over the prefill chunks and every group's rows; each group sampled on its own."""
        rows = [(View((*p.context, p.block), p.block), p.tokens) for p in prefills]
        rows += [row for g in groups for row in g.rows]
        modes = [Mode.INSTANT] * len(prefills) + [g.mode for g in groups for _ in g.rows]
        logits = self.engine.forward(rows, modes=modes)
        return sample_groups(logits[len(prefills) :], groups)

    def commit(self, step_block: int, into: int) -> None:
        self.engine.commit(step_block, into)

    def share_prefix(self, block: int, tokens: Sequence[int]) -> int:
        """Start the empty prompt ``block`` with cached pages (``KVStore.share_prefix``)."""
        return self.engine.store.share_prefix(block, tokens)


def sample_groups(logits: torch.Tensor, groups: Sequence[DecodeGroup]) -> list[list[int]]:
    """Tokens per group from the logits of all their rows, in order."""
    out, at = [], 0
    for g in groups:
        n = len(g.rows)
        out.append(sample_rows(logits[at : at + n], g.params, list(g.generators), g.greedy, g.suppress, g.recent))
        at += n
    return out


def sample_rows(
    logits: torch.Tensor,
    params: SamplingParams,
    generators: list[torch.Generator],
    greedy: bool,
    suppress: Sequence[int],
    recent: Sequence[Sequence[int]] = (),
) -> list[int]:
    """Sample one token per row, never one of ``suppress``; greedy when asked (e.g. a finisher:
    plain argmax, no repetition penalty, since an answer repeats what its worker computed)."""
    if suppress:
        logits = logits.clone()
        logits[:, list(suppress)] = float("-inf")
    if greedy:
        return sample(logits, SamplingParams(seed=params.seed), generators)
    return sample(logits, params, generators, recent)
