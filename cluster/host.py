"""Many sessions on one engine (DESIGN.md §7): a session host with continuous batching.

    host = SessionHost(engine)                        # owns the engine for its lifetime
    handle = host.submit(program, sampling, "instant") # admitted when its worst case fits the pool
    for event in handle.events(): ...                 # streams as it happens
    handle.result()                                   # or handle.cancel()

Each round (``step``): admit waiting sessions whose worst case (``Program.worst_case_pages``) fits
in the part of the KV pool no admitted session may claim, in submission order; then ONE forward
over a chunk of each session still being prefilled (up to ``prefill_chunk`` prompt tokens in all,
oldest first) and the rows of every session waiting for a decode step, each session's rows in its
own mode and sampled with its own parameters and per-worker generators. Programs are sans-IO generators
(``cluster.protocol``): the host hands each its tokens and forwards its events to its handle. A
session's blocks are freed the moment it ends, fails or is cancelled.

``start()`` runs rounds on a background thread: submit, iterate (also ``async for``) and cancel
from any thread or event loop. Without it, iterating a handle runs rounds inline. ``RoundHost`` is
that shared part; ``cluster.gang.GangHost`` is the same interface over a gang of worker actors, each
of which runs a ``SessionHost`` on its replica (``workers.distributed.DistributedBackend.decode``).
"""

from __future__ import annotations

import asyncio
import itertools
import queue
import threading
import time
from collections import deque
from collections.abc import AsyncIterator, Iterator, Sequence
from dataclasses import dataclass, field

import torch

from cache_service.errors import ConfigError, HogwildError
from cache_service.planner import Mode
from cluster.events import Event, Started
from cluster.protocol import Decode, Prefill, Program, Request, Steps
from cluster.transcript import SessionResult, TranscriptBuilder
from workers.backend import DecodeGroup, LocalBackend, PrefillChunk, Replica
from workers.engine import HogwildEngine
from workers.sampling import SamplingParams, worker_generator

PREFILL_CHUNK = 256  # prompt tokens written per round, between decode steps
MAX_WAITING = 256


class HostBusyError(HogwildError):
    """The host's queue of waiting sessions is full; retry later."""


class SessionCancelled(HogwildError):
    """The session was cancelled before it finished."""


_END = object()  # closes a handle's event queue


class SessionHandle:
    """One submitted session: its events as they happen, its result, cancellation."""

    def __init__(self, host: RoundHost, session_id: int, program: Program) -> None:
        self.host, self.id, self.program = host, session_id, program
        self.builder = TranscriptBuilder(program.problem, time.perf_counter())
        self._queue: queue.Queue = queue.Queue()
        self._error: BaseException | None = None
        self.done = threading.Event()

    def events(self) -> Iterator[Event]:
        """Events until the session ends; raises what ended it abnormally (an error, a cancel).
        Events are delivered once: a second iterator continues where the first stopped."""
        while True:
            item = self._next()
            if item is _END:
                self._finish()
                return
            yield item

    async def aevents(self) -> AsyncIterator[Event]:
        """``events`` for asyncio (needs the host's thread: ``host.start()``)."""
        if self.host.inline:
            raise HogwildError("aevents() needs the host's thread; call host.start() first")
        while True:
            item = await asyncio.to_thread(self._queue.get)
            if item is _END:
                self._finish()
                return
            yield item

    def poll(self) -> list[Event]:
        """The events that arrived since the last call, without waiting or running rounds."""
        out = []
        while True:
            try:
                item = self._queue.get_nowait()
            except queue.Empty:
                return out
            if item is _END:
                self._queue.put(_END)  # keep the end for events()/result()
                return out
            out.append(item)

    def result(self) -> SessionResult:
        """Wait for the end; the session's result (raises what ended it abnormally)."""
        for _ in self.events():
            pass
        return self.builder.result()

    def cancel(self) -> None:
        """Stop the session (at the next round); its blocks are freed, its events end with ``SessionCancelled``."""
        self.host.cancel(self)

    def _next(self):
        while self.host.inline and self._queue.empty():
            if not self.host.step() and self._queue.empty():
                raise HogwildError(f"session {self.id} is not running on its host; submit it again")
        return self._queue.get()

    def _finish(self) -> None:
        self._queue.put(_END)  # the end stays for later readers (result(), poll())
        if self._error is not None:
            raise self._error

    # ---- called by the host ------------------------------------------------------------------
    def _emit(self, event: Event) -> None:
        self.builder.add(event, time.perf_counter())
        self._queue.put(event)

    def _end(self, error: BaseException | None = None) -> None:
        self._error = error
        self.done.set()
        self._queue.put(_END)


class _Blocks:
    """A session's view of the engine's block bookkeeping; remembers its blocks to free them."""

    def __init__(self, engine: HogwildEngine) -> None:
        self.engine, self.owned = engine, []

    def new_block(self, reserve: int = 0) -> int:
        block = self.engine.new_block(reserve)
        self.owned.append(block)
        return block

    def length(self, block: int) -> int:
        return self.engine.length(block)

    def commit(self, step_block: int, into: int) -> None:
        self.engine.commit(step_block, into)

    def free(self) -> None:
        for block in self.owned:
            self.engine.free(block)
        self.owned = []


@dataclass(eq=False)
class _Live:
    """An admitted session: its program, blocks, sampling state and pending request."""

    handle: SessionHandle
    steps: Steps
    blocks: _Blocks
    params: SamplingParams
    mode: Mode
    pages: int
    generators: list[torch.Generator] = field(default_factory=list)
    pending: Request | None = None
    written: int = 0  # tokens of a pending Prefill already written


@dataclass(eq=False)
class _Waiting:
    handle: SessionHandle
    params: SamplingParams
    mode: Mode
    pages: int


class RoundHost:
    """Submissions, cancellations and a thread that runs rounds: what every host shares.
    Subclasses define ``pool_pages``/``page_size`` (for the worst-case check), ``step`` (one round)
    and ``_end_all`` (end every session when closing)."""

    pool_pages: int
    page_size: int

    def __init__(self, max_waiting: int) -> None:
        if max_waiting < 0:
            raise ConfigError(f"max_waiting must be >= 0, got {max_waiting}")
        self.max_waiting = max_waiting
        self._ids = itertools.count()
        self._round = threading.Lock()  # one round at a time (inline handles on several threads)
        self._lock = threading.Lock()  # guards the inbox (submissions, cancellations)
        self._wake = threading.Condition(self._lock)
        self._inbox: list[_Waiting] = []
        self._cancels: list[SessionHandle] = []
        self._thread: threading.Thread | None = None
        self._closed = False

    def submit(self, program: Program, sampling: SamplingParams | None = None,
               mode: Mode | str = Mode.INSTANT) -> SessionHandle:
        """Queue a session; ``HostBusyError`` when too many wait, ``ConfigError`` when its worst
        case can never fit this host's KV pool."""
        pages = program.worst_case_pages(self.page_size)
        if pages > self.pool_pages:
            raise ConfigError(
                f"this session may need {pages} KV pages of {self.page_size} tokens, the pool has "
                f"{self.pool_pages}; lower max_steps or workers, or give the engine a larger pool"
            )
        with self._wake:
            if self._closed:
                raise HogwildError("the session host is closed; start a new one")
            if self._waiting_count() + len(self._inbox) >= self.max_waiting:
                raise HostBusyError(f"the host has {self.max_waiting} sessions waiting already; retry later")
            handle = SessionHandle(self, next(self._ids), program)
            self._inbox.append(_Waiting(handle, sampling or SamplingParams(), Mode.parse(mode), pages))
            self._wake.notify()
        return handle

    def cancel(self, handle: SessionHandle) -> None:
        with self._wake:
            self._cancels.append(handle)
            self._wake.notify()

    @property
    def inline(self) -> bool:
        """Whether handles run rounds themselves (no background thread)."""
        return self._thread is None

    @property
    def closed(self) -> bool:
        """Whether the host no longer takes sessions (closed, or its gang failed for good)."""
        return self._closed

    def start(self) -> RoundHost:
        """Run rounds on a background thread until ``close``."""
        if self._thread is None:
            self._thread = threading.Thread(target=self._serve, name="hogwild-host", daemon=True)
            self._thread.start()
        return self

    def close(self) -> None:
        """Stop the thread; sessions still running or waiting end with ``SessionCancelled``."""
        with self._wake:
            self._closed = True
            self._wake.notify()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join()
        self._thread = None
        with self._round:
            self._end_all(SessionCancelled("the session host was closed"))

    def __enter__(self) -> RoundHost:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def step(self) -> bool:
        raise NotImplementedError

    def _end_all(self, error: BaseException) -> None:
        raise NotImplementedError

    def _waiting_count(self) -> int:
        return 0

    def _busy(self) -> bool:
        """Whether a round has work without anything new arriving."""
        return False

    def _serve(self) -> None:
        while True:
            with self._wake:
                while not self._closed and not (self._inbox or self._cancels or self._busy()):
                    self._wake.wait()
                if self._closed:
                    return
            self.step()

    def _take_inbox(self) -> tuple[list[_Waiting], list[SessionHandle]]:
        with self._lock:
            arrived, cancels = self._inbox, self._cancels
            self._inbox, self._cancels = [], []
        return arrived, cancels


class SessionHost(RoundHost):
    """Runs any number of sessions on one engine, or one replica of a gang (module docstring)."""

    def __init__(self, replica: HogwildEngine | Replica, *, prefill_chunk: int = PREFILL_CHUNK,
                 max_waiting: int = MAX_WAITING, prefix_cache: bool = True) -> None:
        super().__init__(max_waiting)
        if prefill_chunk < 1:
            raise ConfigError(f"prefill_chunk must be >= 1, got {prefill_chunk}")
        self.replica = LocalBackend(replica) if isinstance(replica, HogwildEngine) else replica
        self.engine = self.replica.engine
        self.pool_pages, self.page_size = self.engine.store.pages, self.engine.store.page_size
        self.prefill_chunk = prefill_chunk
        self.prefix_cache = prefix_cache
        self.live: list[_Live] = []
        self.waiting: deque[_Waiting] = deque()
        self.claimed = 0  # pool pages the live sessions may hold at worst

    def step(self) -> bool:
        """One round; False when there was nothing to do."""
        with self._round:
            arrived, cancels = self._take_inbox()
            self.waiting.extend(arrived)
            for handle in cancels:
                self._cancel(handle)
            self._admit()
            return self._forward()

    def _busy(self) -> bool:
        """Live sessions, or waiting ones: when the last live session ends, the next round admits them."""
        return bool(self.live or self.waiting)

    def _waiting_count(self) -> int:
        return len(self.waiting)

    def adopt(self, program: Program, state: dict, blocks: Sequence[int], params: SamplingParams,
              mode: Mode | str, rng: dict[int, bytes]) -> SessionHandle:
        """Take over a session restored from a snapshot (``cluster.gang`` after a recovery): its
        ``blocks`` are in the engine already, ``state`` continues its program (``Program.resume``),
        ``rng`` holds each worker's generator state. Admitted at once (its worst case claimed)."""
        handle = SessionHandle(self, next(self._ids), program)
        config = program.config  # the handle's transcript starts here (the text before is not known)
        handle.builder.add(Started(config.names, program.layout.name, len(program.prompt_ids), config.max_steps),
                           time.perf_counter())
        owned = _Blocks(self.engine)
        owned.owned = list(blocks)
        generators = [worker_generator(params, w) for w in range(program.config.workers)]
        for worker, blob in rng.items():
            generators[worker].set_state(torch.frombuffer(bytearray(blob), dtype=torch.uint8))
        pages = program.worst_case_pages(self.page_size)
        live = _Live(handle, program.resume(owned, state), owned, params, Mode.parse(mode), pages, generators)
        self.claimed += pages
        self.live.append(live)
        self._advance(live, None)
        return handle

    def _cancel(self, handle: SessionHandle) -> None:
        for entry in [e for e in [*self.live, *self.waiting] if e.handle is handle]:
            self._drop(entry, SessionCancelled(f"session {handle.id} was cancelled"))

    def _end_all(self, error: BaseException) -> None:
        arrived, _ = self._take_inbox()
        for entry in [*self.live, *self.waiting, *arrived]:
            self._drop(entry, error)
        self.waiting.clear()

    def _admit(self) -> None:
        """Admit waiting sessions in order while their worst case fits what no live session claims."""
        while self.waiting and self.claimed + self.waiting[0].pages <= self.pool_pages:
            w = self.waiting.popleft()
            self.claimed += w.pages
            workers = w.handle.program.config.workers
            blocks = _Blocks(self.engine)
            live = _Live(w.handle, w.handle.program.start(blocks), blocks, w.params, w.mode, w.pages,
                         [worker_generator(w.params, i) for i in range(workers)])
            self.live.append(live)
            self._advance(live, None)

    def _forward(self) -> bool:
        """ONE forward: a chunk of every session being prefilled, oldest first, up to
        ``prefill_chunk`` tokens in all, and a decode step of every session waiting for one."""
        chunks, budget, cold = [], self.prefill_chunk, set()
        for live in list(self.live):
            if budget and isinstance(live.pending, Prefill) and self._start_prompt(live, cold) \
                    and isinstance(live.pending, Prefill):  # (a prompt cached whole has moved on)
                n = min(budget, len(live.pending.tokens) - live.written)
                chunks.append((live, n))
                budget -= n
        batch = [s for s in self.live if isinstance(s.pending, Decode)]
        if not chunks and not batch:
            return False
        prefills = [PrefillChunk(live.pending.block, live.pending.tokens[live.written : live.written + n],
                                 live.pending.context) for live, n in chunks]
        groups = [DecodeGroup(s.pending.rows, s.pending.workers, s.mode, s.params,
                              [s.generators[w] for w in s.pending.workers], s.pending.greedy, s.pending.suppress,
                              s.pending.recent)
                  for s in batch]
        tokens: list[list[list[int]]] = []
        if self._guard([live for live, _ in chunks] + batch,
                       lambda: tokens.append(self.replica.decode(groups, prefills))):
            for live, n in chunks:
                live.written += n
                if self.prefix_cache and not live.pending.context:
                    self.engine.store.remember_prefix(live.pending.block, live.pending.tokens[: live.written])
                if live.written == len(live.pending.tokens):
                    live.written = 0
                    self._advance(live, None)
            for live, sampled in zip(batch, tokens[0]):
                self._advance(live, sampled)
        return True

    def _advance(self, live: _Live, reply: Sequence[int] | None) -> None:
        """Hand ``reply`` to the program and run it to its next request (or its end)."""
        try:
            item = live.steps.send(reply)
            while not isinstance(item, (Prefill, Decode)):
                live.handle._emit(item)
                item = live.steps.send(None)
            live.pending = item
        except StopIteration:
            self._drop(live, None)
        except HogwildError as err:
            self._drop(live, err)

    def _start_prompt(self, live: _Live, cold: set[tuple[int, ...]]) -> bool:
        """Before a prompt's first chunk (a prefill with no context): start its block with the cached
        pages of its prefix (``Replica.share_prefix``), done at once when they hold all of it.
        ``cold``: the first pages of prompts that start this round with nothing cached; a prompt
        that begins with one of them waits a round to share what that one writes. False: it waits."""
        prompt = live.pending
        if not self.prefix_cache or prompt.context or live.written or self.engine.length(prompt.block):
            return True
        head = tuple(prompt.tokens[: self.page_size])
        if head in cold:
            return False
        live.written = self.replica.share_prefix(prompt.block, prompt.tokens)
        if not live.written:
            cold.add(head)
        elif live.written == len(prompt.tokens):
            live.written = 0
            self._advance(live, None)
        return live in self.live

    def _guard(self, sessions: list[_Live], call) -> bool:
        """Run a replica call for ``sessions``; if it raises, those sessions end with the error."""
        try:
            call()
            return True
        except Exception as err:  # noqa: BLE001 - a failed forward ends its sessions, not the host
            for live in sessions:
                self._drop(live, err)
            return False

    def _drop(self, entry: _Live | _Waiting, error: BaseException | None) -> None:
        """End a session: free its blocks and claim, close its handle."""
        if isinstance(entry, _Live):
            if entry not in self.live:
                return
            self.live.remove(entry)
            entry.blocks.free()
            entry.steps.close()
            self.claimed -= entry.pages
        elif entry in self.waiting:
            self.waiting.remove(entry)
        if not entry.handle.done.is_set():
            entry.handle._end(error)

    # ---- statistics --------------------------------------------------------------------------
    def stats(self) -> dict:
        store = self.engine.store
        return {"live": len(self.live), "waiting": len(self.waiting), "claimed_pages": self.claimed,
                "used_pages": store.used_pages, "pages": store.pages, "page_size": store.page_size}

