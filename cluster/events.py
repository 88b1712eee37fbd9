"""What a running program reports: small frozen dataclasses, in the order things happen.

``worker`` is a worker's index; ``Started.workers`` maps it to a name. Every event converts to a
plain dict (``to_dict``, with a ``type`` key) for JSON, SSE or a Ray object stream.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass


@dataclass(frozen=True)
class _Event:
    def to_dict(self) -> dict:
        return {"type": type(self).__name__, **asdict(self)}


@dataclass(frozen=True)
class Started(_Event):
    """The prompt and layout blocks are in the cache; decoding begins."""

    workers: tuple[str, ...]
    layout: str
    prompt_tokens: int
    max_steps: int


@dataclass(frozen=True)
class Delta(_Event):
    """New text of a worker; ``forced`` text was inserted by the protocol, not sampled."""

    worker: int
    step: int
    text: str
    forced: bool = False


@dataclass(frozen=True)
class StepDone(_Event):
    """A worker finished a step; ``committed`` when it went into the common history."""

    worker: int
    step: int
    text: str
    tokens: int
    committed: bool


@dataclass(frozen=True)
class Check(_Event):
    """A redundancy check was inserted into a worker's stream after ``after_tokens`` sampled tokens."""

    worker: int
    step: int
    after_tokens: int


@dataclass(frozen=True)
class Tick(_Event):
    """One decode step is done (one token per worker); ``tokens`` sampled per worker so far."""

    step: int
    max_steps: int
    tokens: tuple[int, ...]


@dataclass(frozen=True)
class Finished(_Event):
    """The end: ``reason`` is ``answer`` (a worker wrote one), ``budget`` or ``context`` (the finisher asked)."""

    answer: str | None
    reason: str
    by: int
    steps: int


@dataclass(frozen=True)
class Probe(_Event):
    """The finisher's answer at a checkpoint (``ProtocolConfig.checkpoints``) after ``steps`` decode
    steps, asked on a copy of worker ``by``'s state; the session goes on. ``text`` is what it wrote."""

    steps: int
    answer: str | None
    by: int
    text: str


@dataclass(frozen=True)
class Recovered(_Event):
    """Lost worker actors were replaced and the session goes on; ``message`` says what happened
    (e.g. "worker actor 1 lost; recovered in 3.2 s")."""

    lost: tuple[int, ...]
    seconds: float
    attempt: int
    message: str


Event = Started | Delta | StepDone | Check | Tick | Finished | Probe | Recovered
