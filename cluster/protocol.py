"""The collaboration protocol: a deterministic program, driven from outside (sans-IO).

``Program(problem, config, codec, max_context).start(cache)`` is a generator of ``Event``s and
requests: ``Prefill`` (encode tokens into a block; answered with None) and ``Decode`` (one token for
each of some workers; answered with the sampled tokens, ``generator.send(tokens)``). Block
bookkeeping (``new_block``, ``length``, ``commit``) is called on ``cache`` directly. So one scheduler
can drive many programs and batch their requests (``cluster.host.SessionHost``); ``run(backend)``
drives one program on one ``Backend`` (``drive``). Every decision (step ends, commits, redundancy
checks, answers, the finisher) depends only on the config and the tokens handed back, and the
program holds no global state and is picklable: every actor of a distributed session can run the
same program in lockstep and take the same decisions.

A worker's step lives in its step block. A sampled token is written at the next decode step; when
it finishes a step, that decode step writes it, the step is committed (layouts that commit) and the
next step's prefix is written after it (the sample drawn after a step end is dropped).
"""

from __future__ import annotations

from collections.abc import Generator, Iterator, Sequence
from dataclasses import dataclass, field, fields, replace
from typing import TYPE_CHECKING, Protocol

from cache_service.errors import ConfigError
from cache_service.layout import View
from cluster.codec import Codec
from cluster.detect import find_answer, step_ended
from cluster.events import Check, Delta, Event, Finished, Probe, Started, StepDone, Tick
from cluster.layouts import SHARED_PARTS, BlockTable, Layout, get_layout, view
from cluster.prompts import NAMES, Templates

if TYPE_CHECKING:
    from workers.backend import Backend

MAX_WORKERS = len(NAMES)
CLAUSE_ENDS = tuple(".,;:!?)\n")  # a redundancy check waits for one of these ...
CHECK_SLACK = 16  # ... for at most this many tokens
RECENT_TOKENS = 256  # a worker's last sampled tokens, handed to the sampler (repetition penalty)


@dataclass(frozen=True)
class ProtocolConfig:
    """How workers collaborate. ``max_steps`` counts decode steps (one token per worker each);
    ``check_every`` inserts a redundancy check after that many sampled tokens (0: never);
    ``checkpoints`` (decode steps below ``max_steps``) also ask the finisher there, on a copy of the
    state, and report its answer as a ``Probe`` while the session goes on."""

    workers: int = 2
    layout: str | Layout = "combined"
    max_steps: int = 256
    max_step_tokens: int = 128
    check_every: int = 64
    answer_tokens: int = 16
    templates: Templates = field(default_factory=Templates)
    checkpoints: tuple[int, ...] = ()

    def __post_init__(self) -> None:
        if not 1 <= self.workers <= MAX_WORKERS:
            raise ConfigError(f"workers must be between 1 and {MAX_WORKERS}, got {self.workers}")
        for name in ("max_steps", "max_step_tokens", "answer_tokens"):
            if getattr(self, name) <= 0:
                raise ConfigError(f"{name} must be > 0, got {getattr(self, name)}")
        if self.check_every < 0:
            raise ConfigError(f"check_every must be >= 0 (0 switches checks off), got {self.check_every}")
        get_layout(self.layout)
        object.__setattr__(self, "checkpoints", _checkpoints(self.checkpoints, self.max_steps))

    @property
    def names(self) -> tuple[str, ...]:
        return NAMES[: self.workers]


def _checkpoints(steps: Sequence[int], max_steps: int) -> tuple[int, ...]:
    """Checkpoints sorted and unique; each must lie in 1..max_steps-1 (max_steps is the run's own end)."""
    out = tuple(sorted({int(s) for s in steps}))
    wrong = [s for s in out if not 0 < s < max_steps]
    if wrong:
        raise ConfigError(f"checkpoints must lie between 1 and max_steps - 1 ({max_steps - 1}), got {wrong}")
    return out


class BlockCache(Protocol):
    """The block bookkeeping a program calls directly (cheap, no forward pass)."""

    def new_block(self, reserve: int = 0) -> int: ...

    def length(self, block: int) -> int: ...

    def commit(self, step_block: int, into: int) -> None: ...


@dataclass(frozen=True)
class Prefill:
    """Request: encode ``tokens`` into ``block`` after the blocks of ``context``."""

    block: int
    tokens: tuple[int, ...]
    context: tuple[int, ...] = ()


@dataclass(frozen=True)
class Decode:
    """Request: write each row's tokens and sample one token per row (greedy when asked, never one
    of ``suppress``); answered with the tokens, in row order. ``recent[i]``: the last tokens row
    i's worker sampled (for a repetition penalty; empty for the finisher)."""

    rows: tuple[tuple[View, tuple[int, ...]], ...]
    workers: tuple[int, ...]
    greedy: bool = False
    suppress: tuple[int, ...] = ()
    recent: tuple[tuple[int, ...], ...] = ()


Request = Prefill | Decode
Steps = Generator[Event | Request, Sequence[int] | None, None]


def drive(steps: Steps, backend: Backend) -> Iterator[Event]:
    """Run one program on one backend: perform its requests, yield its events."""
    reply = None
    while True:
        try:
            item = steps.send(reply)
        except StopIteration:
            return
        reply = None
        if isinstance(item, Prefill):
            backend.prefill(item.block, item.tokens, item.context)
        elif isinstance(item, Decode):
            reply = backend.step(item.rows, item.workers, greedy=item.greedy, suppress=item.suppress,
                                 recent=item.recent)
        else:
            yield item


def check_problem(problem: str) -> str:
    """The problem text, stripped; an empty one is a ``ConfigError``."""
    if not isinstance(problem, str) or not problem.strip():
        raise ConfigError("the problem is empty; give the question the workers should solve")
    return problem.strip()


class Program:
    """One session's protocol: the prompt and fixed blocks as token ids, plus the rules."""

    def __init__(self, problem: str, config: ProtocolConfig, codec: Codec, max_context: int) -> None:
        self.problem = check_problem(problem)
        self.config = config
        self.codec = codec
        self.max_context = max_context
        self.layout = get_layout(config.layout)
        t = config.templates
        prompt = codec.render_chat(t.system_text(config.names, self.layout.name), self.problem)
        self.prompt_ids = codec.encode(prompt + (t.history_header if self.layout.commits else ""))
        parts = [p for p in self.layout.parts() if p != "step"]
        self.shared_ids = self._part_ids([p for p in parts if p in SHARED_PARTS], "")
        self.worker_ids = tuple(self._part_ids([p for p in parts if p not in SHARED_PARTS], name)
                                for name in config.names)
        self.check_ids = codec.encode(t.check)
        self.separator_ids = codec.encode(t.step_separator)
        self.finisher_ids = codec.encode(t.finisher)
        self.reserve = self._reserve()
        self._check_fits()

    def run(self, backend: Backend) -> Iterator[Event]:
        """Run the session on ``backend``; the events stream as they happen."""
        return drive(self.start(backend), backend)

    def start(self, cache: BlockCache) -> Steps:
        """The session as a generator of events and requests (see the module docstring)."""
        return _Run(self, cache).events()

    def open_run(self, cache: BlockCache) -> "_Run":
        """The run itself: ``events()`` is what ``start`` returns, ``state()`` saves it (issue 13)."""
        return _Run(self, cache)

    def resume(self, cache: BlockCache, state: dict) -> Steps:
        """``start`` continued from a ``_Run.state()`` on a cache restored with the run's blocks."""
        return _Run(self, cache).resume(state)

    def worst_case_pages(self, page_size: int) -> int:
        """Pool pages this session can ever hold at once (what a host admits it by): every token
        it can write, or what its views can hold, whichever is less, plus page rounding and the
        blocks' reservations. No view outgrows the context (``_fits``), and where every view shows
        every step (the prompt and all step blocks), they all fit in one context."""
        config = self.config
        fixed = len(self.prompt_ids) + sum(map(len, self.shared_ids.values()))
        fixed += sum(len(ids) for parts in self.worker_ids for ids in parts.values())
        longest = max(len(self.check_ids), len(self.separator_ids), len(self.prefix_ids(0, 10 ** 4)))
        written = config.workers * (config.max_steps + 1) * (longest + 1)
        written += len(self.finisher_ids) + config.answer_tokens
        views = self.max_context if "step" in self.layout.peer else config.workers * self.max_context
        tokens = fixed + min(written, views)
        blocks = 1 + len(self.shared_ids) + sum(len(parts) + 1 for parts in self.worker_ids)
        reserved = [len(self.prompt_ids) + config.max_steps] + [config.max_step_tokens + 16] * config.workers
        probes = len(config.checkpoints) * (2 * -(-self.probe_tokens // page_size) + 1)  # kept till the end
        return -(-tokens // page_size) + blocks + sum(-(-r // page_size) for r in reserved) + probes

    @property
    def probe_tokens(self) -> int:
        """Most tokens a checkpoint's probe block holds: a worker's unwritten input, the finisher, the answer."""
        longest = max(len(self.check_ids), len(self.separator_ids), len(self.prefix_ids(0, 10 ** 4)))
        return longest + 1 + len(self.finisher_ids) + self.config.answer_tokens

    def prefix_ids(self, worker: int, step: int) -> list[int]:
        return self.codec.encode(self.config.templates.prefix(self.config.names[worker], step))

    def _part_ids(self, parts: list[str], name: str) -> dict[str, list[int]]:
        texts = {p: self.config.templates.part_text(p, name) for p in parts}
        return {p: self.codec.encode(text) for p, text in texts.items() if text}

    def _reserve(self) -> int:
        """Room kept in every view beyond this step's input: the longest next inputs and the finisher."""
        longest = max(len(self.check_ids), len(self.separator_ids), len(self.prefix_ids(0, 10 ** 4)))
        return self.config.workers * (longest + 1) + len(self.finisher_ids) + self.config.answer_tokens

    def _check_fits(self) -> None:
        fixed = sum(map(len, self.shared_ids.values()))
        fixed += sum(len(ids) for parts in self.worker_ids for ids in parts.values())
        need = len(self.prompt_ids) + fixed + self.reserve
        if need > self.max_context:
            raise ConfigError(
                f"the prompt needs {need} tokens with the workspace headers, beyond the model's context "
                f"of {self.max_context}; shorten the problem or use fewer workers"
            )


def allocate_blocks(program: Program, cache: BlockCache) -> Generator[Prefill, None, BlockTable]:
    """Create the session's blocks: the prompt, the fixed layout texts (prefilled after the prompt)
    and an empty step block per worker (``table = yield from allocate_blocks(...)``)."""
    common = cache.new_block(len(program.prompt_ids) + program.config.max_steps)
    yield Prefill(common, tuple(program.prompt_ids))

    def prefilled(ids: list[int]) -> Generator[Prefill, None, int]:
        block = cache.new_block(len(ids))
        yield Prefill(block, tuple(ids), (common,))
        return block

    shared = {}
    for part, ids in program.shared_ids.items():
        shared[part] = yield from prefilled(ids)
    workers = []
    for parts in program.worker_ids:
        blocks = {}
        for part, ids in parts.items():
            blocks[part] = yield from prefilled(ids)
        blocks["step"] = cache.new_block(program.config.max_step_tokens + 16)
        workers.append(blocks)
    return BlockTable(common, shared, tuple(workers))


@dataclass
class _Worker:
    """Run state of one worker; ``ids`` is the current step including the token not yet written."""

    index: int
    view: View
    step: int = 0
    ids: list[int] = field(default_factory=list)
    feed: list[int] = field(default_factory=list)  # written at the next decode step
    text: str = ""  # decoded ids, without a trailing partial character
    opened: int = 0  # characters of ``text`` that the step prefix took (a step end is looked for after it)
    shown: int = 0  # characters of ``text`` already reported
    closing: bool = False  # the step ends once ``feed`` is written
    quiet: bool = False  # a probe's copy: reports no text
    sampled: int = 0
    step_sampled: int = 0
    since_check: int = 0
    recent: list[int] = field(default_factory=list)  # last RECENT_TOKENS sampled tokens kept in its text


class _Run:
    """One execution of a program (the mutable half of ``Program``)."""

    def __init__(self, program: Program, cache: BlockCache) -> None:
        self.p = program
        self.config = program.config
        self.templates = program.config.templates
        self.cache = cache
        self.table: BlockTable | None = None
        self.workers: list[_Worker] = []
        self.steps = 0  # decode steps done
        self.boundary = False  # waiting for a decode step's tokens (``state`` is valid)

    # ---- saving and resuming (additive: issue 13) ----------------------------------------------
    def state(self) -> dict:
        """Plain data (msgpack-able) to resume this run with ``Program.resume``; valid only while
        it waits for the tokens of a decode step (``boundary``): the request is made again."""
        if not self.boundary:
            raise ConfigError("a run can be saved only while it waits for a decode step's tokens")
        t = self.table
        names = [f.name for f in fields(_Worker) if f.name != "view"]
        return {"steps": self.steps,
                "table": {"common": t.common, "shared": dict(t.shared), "workers": [dict(w) for w in t.workers]},
                "workers": [{name: getattr(w, name) for name in names} for w in self.workers]}

    def resume(self, state: dict) -> Steps:
        """Continue a run saved by ``state`` on a cache that holds its blocks."""
        t = state["table"]
        self.table = BlockTable(int(t["common"]), {str(k): int(v) for k, v in t["shared"].items()},
                                tuple({str(k): int(v) for k, v in parts.items()} for parts in t["workers"]))
        self.workers = [_Worker(**{**w, "ids": list(w["ids"]), "feed": list(w["feed"]),
                                   "recent": list(w.get("recent", ())),
                                   "view": view(self.p.layout, self.table, int(w["index"]))})
                        for w in state["workers"]]
        yield from self._loop(int(state["steps"]))

    def events(self) -> Steps:
        self.table = yield from allocate_blocks(self.p, self.cache)
        self.workers = [_Worker(w, view(self.p.layout, self.table, w)) for w in range(self.config.workers)]
        yield Started(self.config.names, self.p.layout.name, len(self.p.prompt_ids), self.config.max_steps)
        for worker in self.workers:
            yield from self._begin_step(worker)
        yield from self._loop(0)

    def _loop(self, steps: int) -> Steps:
        """Decode steps from ``steps`` on, then the end (``resume`` enters here)."""
        reason = "budget"
        while steps < self.config.max_steps:
            if not self._fits():
                reason = "context"
                break
            self.steps = steps
            found = yield from self._decode_step()
            steps += 1
            yield Tick(steps, self.config.max_steps, tuple(w.sampled for w in self.workers))
            if found is not None:
                yield Finished(found[1], "answer", found[0], steps)
                return
            if steps in self.config.checkpoints:
                yield from self._probe(steps)
        yield from self._finish(reason, steps)

    # ---- decoding ----------------------------------------------------------------------------
    def _decode_step(self) -> Steps:
        """One token per worker; returns ``(worker, answer)`` of the first worker that answered."""
        rows = tuple((w.view, tuple(w.feed)) for w in self.workers)
        self.boundary = True  # suspended here, the run can be saved (``state``)
        tokens = yield Decode(rows, tuple(w.index for w in self.workers), suppress=tuple(self.p.codec.stop_ids),
                              recent=tuple(tuple(w.recent) for w in self.workers))
        self.boundary = False
        found = None
        for worker, token in zip(self.workers, tokens, strict=True):
            answer = yield from self._advance(worker, token)
            if found is None and answer is not None:
                found = (worker.index, answer)
        return found

    def _advance(self, w: _Worker, token: int) -> Iterator[Event]:
        """Take a worker's sampled token; returns its answer when the token completed one."""
        if w.closing:
            yield from self._close_step(w)
            return None
        before = len(w.text)
        w.ids.append(token)
        w.feed = [token]
        w.recent = [*w.recent[1 - RECENT_TOKENS :], token]
        w.sampled += 1
        w.step_sampled += 1
        w.since_check += 1
        yield from self._sync(w)
        answer = find_answer(w.text, self.templates.answer_re, since=before)
        if answer is not None:
            return answer
        if step_ended(w.text[w.opened:], self.templates.step_end_re):
            w.closing = True
        elif w.step_sampled >= self.config.max_step_tokens:
            w.closing = True
            yield from self._force(w, self.p.separator_ids)
        elif self._check_due(w):
            w.since_check = 0
            yield Check(w.index, w.step, w.sampled)
            yield from self._force(w, self.p.check_ids)
        return None

    def _check_due(self, w: _Worker) -> bool:
        """A check is due ``check_every`` tokens after the last, at a clause end (at most ``CHECK_SLACK`` later)."""
        every = self.config.check_every
        if not every or w.since_check < every:
            return False
        return w.text.rstrip(" ")[-1:] in CLAUSE_ENDS or w.since_check >= every + CHECK_SLACK

    def _close_step(self, w: _Worker) -> Iterator[Event]:
        if self.p.layout.commits:
            self.cache.commit(self.table.step(w.index), self.table.common)
        yield StepDone(w.index, w.step, w.text, len(w.ids), self.p.layout.commits)
        yield from self._begin_step(w)

    def _begin_step(self, w: _Worker) -> Iterator[Event]:
        w.step += 1
        w.ids, w.feed, w.text, w.shown = [], [], "", 0
        w.closing, w.step_sampled = False, 0
        yield from self._force(w, self.p.prefix_ids(w.index, w.step))
        w.opened = len(w.text)

    def _force(self, w: _Worker, ids: list[int]) -> Iterator[Event]:
        """Insert protocol text into a worker's stream (written at the next decode step)."""
        w.ids += ids
        w.feed += ids
        yield from self._sync(w, forced=True)

    def _sync(self, w: _Worker, forced: bool = False) -> Iterator[Event]:
        w.text = self.p.codec.decode(w.ids).rstrip("\ufffd")
        if len(w.text) > w.shown and not w.quiet:
            yield Delta(w.index, w.step, w.text[w.shown:], forced)
            w.shown = len(w.text)

    def _fits(self) -> bool:
        """Whether every view still has room for this step and the finisher."""
        blocks = {b for w in self.workers for b in w.view.blocks}
        lengths = {b: self.cache.length(b) for b in sorted(blocks)}
        need = sum(len(w.feed) for w in self.workers) + self.p.reserve
        return all(sum(lengths[b] for b in w.view.blocks) + need <= self.p.max_context for w in self.workers)

    # ---- the end -----------------------------------------------------------------------------
    def _finish(self, reason: str, steps: int) -> Steps:
        """Ask the first worker for the answer and decode a few greedy tokens."""
        w = self.workers[0]
        answer, _ = yield from self._ask(w)
        yield Finished(answer, reason, w.index, steps)

    def _probe(self, steps: int) -> Steps:
        """The finisher at a checkpoint, on a copy of the first worker: its unwritten input, the
        finisher and the answer go into a block of their own right after its step block (the same
        view positions a run ending here would write), so the session goes on untouched. Greedy
        decoding draws nothing from the workers' generators."""
        w = self.workers[0]
        block = self.cache.new_block(self.p.probe_tokens)
        copy = replace(w, view=View(w.view.blocks + (block,), block), ids=list(w.ids), feed=list(w.feed),
                       quiet=True)
        answer, written = yield from self._ask(copy)
        yield Probe(steps, answer, w.index, written)

    def _ask(self, w: _Worker) -> Steps:
        """Append the finisher to ``w``'s stream and decode up to ``answer_tokens`` greedy tokens;
        returns the answer (the pattern's, else the first line written) and the text written."""
        mark = len(w.text)
        yield from self._force(w, self.p.finisher_ids)
        asked = len(w.text)
        answer = None
        for _ in range(self.config.answer_tokens):
            token = (yield Decode(((w.view, tuple(w.feed)),), (w.index,), greedy=True))[0]
            if token in self.p.codec.stop_ids:
                break
            w.ids.append(token)
            w.feed = [token]
            yield from self._sync(w)
            answer = find_answer(w.text, self.templates.answer_re, since=mark)
            if answer is not None:
                break
        written = w.text[asked:]
        return (answer if answer is not None else _loose_answer(written)), written


def _loose_answer(text: str) -> str | None:
    """What the finisher wrote when it never closed the answer pattern: its first line."""
    line = text.strip().split("\n", 1)[0].strip()
    return line or None
