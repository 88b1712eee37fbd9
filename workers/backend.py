"""What a collaboration protocol drives: a shared cache that steps workers and returns tokens.

The protocol (cluster/) sees block ids, views and sampled tokens, never logits or devices, so the
same deterministic program runs on one engine in the driver (``LocalBackend``) or, identically, in
every worker actor of a distributed session (whose backend exchanges K/V and all-gathers tokens).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

import torch

from cache_service.layout import View
from workers.engine import HogwildEngine
from workers.sampling import SamplingParams, sample, worker_generator


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
    ) -> list[int]: ...

    def commit(self, step_block: int, into: int) -> None: ...


class LocalBackend:
    """All workers on one engine (one device)."""

    def __init__(self, engine: HogwildEngine, params: SamplingParams, n_workers: int) -> None:
        self.engine = engine
        self.params = params
        self.generators = [worker_generator(params, w) for w in range(n_workers)]

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
    ) -> list[int]:
        logits = self.engine.forward(rows)
        return sample_rows(logits, self.params, [self.generators[w] for w in workers], greedy, suppress)

    def commit(self, step_block: int, into: int) -> None:
        self.engine.commit(step_block, into)


def sample_rows(
    logits: torch.Tensor,
    params: SamplingParams,
    generators: list[torch.Generator],
    greedy: bool,
    suppress: Sequence[int],
) -> list[int]:
    """Sample one token per row, never one of ``suppress``; greedy when asked (e.g. a finisher)."""
    if suppress:
        logits = logits.clone()
        logits[:, list(suppress)] = float("-inf")
    return sample(logits, SamplingParams(seed=params.seed) if greedy else params, generators)
