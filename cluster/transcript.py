"""A session's result, built from its events alone, and its Markdown and JSON exports."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field

from cluster.events import Check, Delta, Event, Finished, Started, StepDone, Tick


@dataclass(frozen=True)
class StepRecord:
    worker: str
    step: int
    text: str
    finished: bool  # False for a step still open when the session ended


@dataclass(frozen=True)
class WorkerResult:
    name: str
    text: str
    tokens: int  # sampled tokens (protocol text not counted)
    steps: int  # finished steps
    checks: int  # redundancy checks inserted


@dataclass(frozen=True)
class SessionResult:
    problem: str
    answer: str | None
    reason: str  # answer | budget | context
    layout: str
    workers: tuple[WorkerResult, ...]
    transcript: tuple[StepRecord, ...]  # reading order: finished steps as finished, then open ones
    steps: int  # decode steps
    timings: dict[str, float]

    @property
    def wall_s(self) -> float:
        return self.timings.get("wall_s", 0.0)

    def to_dict(self) -> dict:
        out = asdict(self)
        out["wall_s"] = self.wall_s
        return out

    def to_json(self, indent: int | None = 2) -> str:
        return json.dumps(self.to_dict(), indent=indent, ensure_ascii=False)

    def to_markdown(self) -> str:
        names = ", ".join(w.name for w in self.workers)
        lines = [
            "# Hogwild! session", "",
            f"**Problem:** {self.problem}", "",
            f"**Workers:** {names} · layout `{self.layout}` · {self.steps} decode steps · "
            f"{self.wall_s:.1f} s", "",
            f"**Answer:** {self.answer if self.answer is not None else '(none)'} ({self.reason})", "",
            "## Transcript", "",
        ]
        for record in self.transcript:
            mark = "" if record.finished else " *(unfinished)*"
            lines += [record.text.strip() + mark, ""]
        return "\n".join(lines).rstrip() + "\n"


@dataclass
class _Open:
    step: int = 1
    text: str = ""


@dataclass
class TranscriptBuilder:
    """Folds events into a ``SessionResult``; ``add`` takes each event with a clock reading."""

    problem: str
    started_at: float
    names: tuple[str, ...] = ()
    layout: str = ""
    texts: list[str] = field(default_factory=list)
    open: list[_Open] = field(default_factory=list)
    done: list[StepRecord] = field(default_factory=list)
    checks: list[int] = field(default_factory=list)
    tokens: tuple[int, ...] = ()
    steps: int = 0
    finished: Finished | None = None
    marks: dict[str, float] = field(default_factory=dict)

    def add(self, event: Event, now: float) -> None:
        if isinstance(event, Started):
            n = len(event.workers)
            self.names, self.layout = event.workers, event.layout
            self.texts, self.open, self.checks = [""] * n, [_Open() for _ in range(n)], [0] * n
            self.tokens = (0,) * n
            self.marks["started"] = now
        elif isinstance(event, Delta):
            self._append(event)
        elif isinstance(event, StepDone):
            self.done.append(StepRecord(self.names[event.worker], event.step, event.text, True))
            self.open[event.worker] = _Open(event.step + 1)
        elif isinstance(event, Check):
            self.checks[event.worker] += 1
        elif isinstance(event, Tick):
            self.steps, self.tokens = event.step, event.tokens
        elif isinstance(event, Finished):
            self.finished = event
            self.marks["finished"] = now

    def _append(self, delta: Delta) -> None:
        self.texts[delta.worker] += delta.text
        if self.open[delta.worker].step != delta.step:
            self.open[delta.worker] = _Open(delta.step)
        self.open[delta.worker].text += delta.text

    def result(self) -> SessionResult:
        end = self.finished or Finished(None, "cancelled", 0, self.steps)
        finished_steps = [sum(r.worker == name for r in self.done) for name in self.names]
        workers = tuple(WorkerResult(name, self.texts[i], self.tokens[i], finished_steps[i], self.checks[i])
                        for i, name in enumerate(self.names))
        still_open = tuple(StepRecord(self.names[i], o.step, o.text, False)
                           for i, o in enumerate(self.open) if o.text)
        return SessionResult(self.problem, end.answer, end.reason, self.layout, workers,
                             tuple(self.done) + still_open, self.steps, self._timings())

    def _timings(self) -> dict[str, float]:
        started = self.marks.get("started", self.started_at)
        ended = self.marks.get("finished", started)
        decode = ended - started
        total = sum(self.tokens)
        return {
            "prefill_s": round(started - self.started_at, 4),
            "decode_s": round(decode, 4),
            "wall_s": round(ended - self.started_at, 4),
            "tokens_per_s": round(total / decode, 2) if decode > 0 else 0.0,
        }
