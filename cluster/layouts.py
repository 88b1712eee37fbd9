"""Layouts: which blocks each worker sees, in which order. A layout is data, not code.

Every worker's view is ``[common] + lead + (peer parts of every other worker, in worker order) +
own parts``. Parts name blocks: ``step`` (a worker's current step, or whole stream when nothing is
committed), ``peer_header``/``peer_tail`` (text around a peer's step), ``own_header`` (before one's
own step) and the shared ``others_header``. Block ids never change during a session (a commit
empties a step block in place), so views are computed once.
"""

from __future__ import annotations

from dataclasses import dataclass

from cache_service.errors import ConfigError
from cache_service.layout import View

SHARED_PARTS = ("others_header",)
WORKER_PARTS = ("peer_header", "step", "peer_tail", "own_header")


@dataclass(frozen=True)
class Layout:
    """``commits``: finished steps are appended to the common block (else steps stay in the stream)."""

    name: str
    lead: tuple[str, ...]
    peer: tuple[str, ...]
    own: tuple[str, ...]
    commits: bool

    def __post_init__(self) -> None:
        for group, allowed in ((self.lead, SHARED_PARTS), (self.peer, WORKER_PARTS), (self.own, WORKER_PARTS)):
            unknown = [p for p in group if p not in allowed]
            if unknown:
                raise ConfigError(f"layout {self.name!r}: unknown parts {unknown}; use {allowed}")
        if not self.own or self.own[-1] != "step":
            raise ConfigError(f"layout {self.name!r}: a worker's own parts must end with its 'step'")

    def parts(self) -> tuple[str, ...]:
        """Every part a session of this layout needs blocks for."""
        return tuple(dict.fromkeys(self.lead + self.peer + self.own))


LAYOUTS = {
    "combined": Layout("combined", lead=("others_header",), peer=("step", "peer_tail"),
                       own=("own_header", "step"), commits=True),
    "contiguous": Layout("contiguous", lead=(), peer=("peer_header", "step", "peer_tail"),
                         own=("own_header", "step"), commits=False),
    "interleaved": Layout("interleaved", lead=(), peer=(), own=("step",), commits=True),
}


def get_layout(layout: str | Layout) -> Layout:
    if isinstance(layout, Layout):
        return layout
    try:
        return LAYOUTS[layout]
    except KeyError:
        raise ConfigError(f"unknown layout {layout!r}; use one of {', '.join(LAYOUTS)}") from None


@dataclass(frozen=True)
class BlockTable:
    """Block ids of a session: the common block, shared parts, and parts per worker."""

    common: int
    shared: dict[str, int]  # part -> block (parts with no text have no block)
    workers: tuple[dict[str, int], ...]  # per worker: part -> block

    def step(self, worker: int) -> int:
        return self.workers[worker]["step"]


def view(layout: Layout, table: BlockTable, worker: int) -> View:
    """The view of ``worker``: its blocks in reading order, writing into its step block."""
    blocks = [table.common]
    if len(table.workers) > 1:
        blocks += [table.shared[p] for p in layout.lead if p in table.shared]
    for peer, parts in enumerate(table.workers):
        if peer != worker:
            blocks += [parts[p] for p in layout.peer if p in parts]
    own = table.workers[worker]
    blocks += [own[p] for p in layout.own if p in own]
    return View(tuple(blocks), table.step(worker))
