"""The compared methods, and how one (problem, method) runs on a session host.

- ``hogwild-N``: one session of N workers sharing the cache.
- ``single``: one session of one worker.
- ``independent-N``: N one-worker sessions (each with its own seed: they never see each other's
  tokens), answers combined by majority vote (``answers.majority``).

Every method runs once to the largest budget; the answers at the smaller budgets are the finisher's,
asked at those decode steps on a copy of the state (``ProtocolConfig.checkpoints``), so they equal a
run cut at each budget. A session that ended earlier (it wrote an answer, or its context filled)
gives its final answer at every later budget.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field
from typing import Any

from cache_service.errors import ConfigError, HogwildError
from cluster.codec import Codec
from cluster.evaluation.answers import majority, normalize, same
from cluster.evaluation.data import Problem
from cluster.evaluation.metrics import Readability, session_readability
from cluster.events import Delta, Event, Finished, Probe, Started, Tick
from cluster.host import RoundHost
from cluster.protocol import MAX_WORKERS, Program, ProtocolConfig
from workers.sampling import SamplingParams

KINDS = ("hogwild", "single", "independent")
MEMBER_SEED_STRIDE = 7919  # seed of independent member k: seed + k * stride


@dataclass(frozen=True)
class Method:
    kind: str
    workers: int

    @property
    def name(self) -> str:
        return "single" if self.kind == "single" else f"{self.kind}-{self.workers}"

    @property
    def sessions(self) -> int:
        """Sessions per problem."""
        return self.workers if self.kind == "independent" else 1

    @property
    def session_workers(self) -> int:
        """Workers per session."""
        return self.workers if self.kind == "hogwild" else 1


def parse_methods(kinds: list[str], workers: list[int]) -> list[Method]:
    """``hogwild``/``independent`` once per worker count, ``single`` once; unknown names are errors."""
    unknown = [k for k in kinds if k not in KINDS]
    if unknown:
        raise ConfigError(f"unknown methods {unknown}; use {', '.join(KINDS)}")
    wrong = [w for w in workers if not 2 <= w <= MAX_WORKERS]
    if wrong:
        raise ConfigError(f"--workers must lie between 2 and {MAX_WORKERS} (single is the 1-worker run), got {wrong}")
    methods = []
    for kind in dict.fromkeys(kinds):
        counts = [1] if kind == "single" else list(dict.fromkeys(workers))
        methods += [Method(kind, n) for n in counts]
    if not methods:
        raise ConfigError("no methods to run; give --methods hogwild single independent (any of them)")
    return methods


@dataclass(frozen=True)
class EvalSettings:
    """What every run of an evaluation shares (stored in the output folder; results depend on it)."""

    budgets: tuple[int, ...] = (64, 128, 256)
    model: str = "default"
    temperature: float = 0.6
    top_p: float = 0.95
    seed: int = 0
    layout: str = "combined"
    mode: str = "instant"
    max_step_tokens: int = 128
    check_every: int = 64
    answer_tokens: int = 16
    kv_tokens: int | None = field(default=None, compare=False)  # the pool: no effect on results
    repetition_penalty: float = 1.1

    def __post_init__(self) -> None:
        wrong = [b for b in self.budgets if not isinstance(b, int) or b <= 0]
        if wrong or not self.budgets:
            raise ConfigError(f"budgets must be decode steps > 0, got {list(self.budgets)}")
        object.__setattr__(self, "budgets", tuple(sorted(set(self.budgets))))
        self.protocol(1)  # every other setting checked now, before anything runs
        self.sampling(0)

    def protocol(self, workers: int) -> ProtocolConfig:
        return ProtocolConfig(workers=workers, layout=self.layout, max_steps=self.budgets[-1],
                              max_step_tokens=self.max_step_tokens, check_every=self.check_every,
                              answer_tokens=self.answer_tokens, checkpoints=self.budgets[:-1])

    def sampling(self, member: int) -> SamplingParams:
        return SamplingParams(temperature=self.temperature, top_p=self.top_p,
                              seed=self.seed + member * MEMBER_SEED_STRIDE, repetition_penalty=self.repetition_penalty)

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out.pop("kv_tokens")
        out["budgets"] = list(self.budgets)
        return out


@dataclass
class Trace:
    """What one session reported, read at the budgets."""

    events: list[Event] = field(default_factory=list)
    ticks: list[tuple[int, int]] = field(default_factory=list)  # (decode step, sampled tokens so far)
    probes: dict[int, tuple[str | None, float]] = field(default_factory=dict)  # step -> (answer, clock)
    finished: Finished | None = None
    started_at: float = 0.0
    ended_at: float = 0.0

    def add(self, event: Event, now: float) -> None:
        self.events.append(event)
        if isinstance(event, Started):
            self.started_at = now
        elif isinstance(event, Tick):
            self.ticks.append((event.step, sum(event.tokens)))
        elif isinstance(event, Probe):
            self.probes[event.steps] = (event.answer, now)
        elif isinstance(event, Finished):
            self.finished, self.ended_at = event, now

    def answer_at(self, budget: int) -> str | None:
        if budget in self.probes:
            return self.probes[budget][0]
        return self.finished.answer if self.finished and self.finished.steps <= budget else None

    def tokens_at(self, budget: int) -> int:
        return max([t for step, t in self.ticks if step <= budget], default=0)

    def clock_at(self, budget: int) -> float:
        return self.probes[budget][1] if budget in self.probes else self.ended_at


def run_problem(host: RoundHost, codec: Codec, max_context: int, problem: Problem, method: Method,
                settings: EvalSettings) -> dict[str, Any]:
    """Run ``method`` on ``problem`` on ``host`` (blocking; many calls may run at once): its result line."""
    record: dict[str, Any] = {"id": problem.id, "method": method.name, "kind": method.kind,
                              "workers": method.workers, "level": problem.level, "gold": problem.answer}
    submitted = time.perf_counter()
    try:
        config = settings.protocol(method.session_workers)
        handles = [host.submit(Program(problem.question, config, codec, max_context), settings.sampling(k),
                               settings.mode) for k in range(method.sessions)]
        traces = []
        for handle in handles:
            trace = Trace()
            for event in handle.events():
                trace.add(event, time.perf_counter())
            traces.append(trace)
    except HogwildError as err:
        return {**record, "error": f"{type(err).__name__}: {err}", "budgets": {}, "wall_s": 0.0}
    readable = Readability()
    for trace in traces:
        readable.add(session_readability(trace.events, config.workers, config.templates, config.names, config.layout))
    record["budgets"] = {str(b): _at_budget(traces, b, problem.answer, submitted) for b in settings.budgets}
    record.update(error=None, wall_s=round(max(t.ended_at for t in traces) - submitted, 3),
                  steps=[t.finished.steps for t in traces], reasons=[t.finished.reason for t in traces],
                  readability=asdict(readable), texts=[_texts(t) for t in traces])
    return record


def _at_budget(traces: list[Trace], budget: int, gold: str, submitted: float) -> dict[str, Any]:
    answers = [t.answer_at(budget) for t in traces]
    answer = answers[0] if len(answers) == 1 else majority(answers)
    out = {"answer": answer, "normalized": normalize(answer), "correct": same(answer, gold),
           "tokens": sum(t.tokens_at(budget) for t in traces),
           "wall_s": round(max(t.clock_at(budget) for t in traces) - submitted, 3)}
    if len(answers) > 1:
        out["votes"] = answers
    return out


def _texts(trace: Trace) -> list[str]:
    """Each worker's whole stream (forced text included), for reading the transcript."""
    started = next(e for e in trace.events if isinstance(e, Started))
    texts = [""] * len(started.workers)
    for event in trace.events:
        if isinstance(event, Delta):
            texts[event.worker] += event.text
    return texts
