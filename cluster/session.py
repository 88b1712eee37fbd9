"""The Python API: start a session for a problem, stream its events, get its result.

    session = Session("What is 2 + 3?", SessionConfig(protocol=ProtocolConfig(workers=2)))
    for event in session.events(): ...
    result = session.result()      # drains what is left; answer, texts, transcript, timings

Where the workers run is a parameter. By default the session is the one session of a
``SessionHost`` on a ``HogwildEngine`` in this process (the same scheduler that runs many sessions
at once); ``backend_factory(lm, config) -> Backend`` drives the program on another backend instead;
a ``runner`` (e.g. ``cluster.gang.RayRunner``) runs it elsewhere and streams its events
back, and then this process reads only the model's config and tokenizer, never its weights.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import TypeVar

from cache_service.errors import ConfigError
from cache_service.kv_store import PoolConfig
from cache_service.planner import Mode
from cluster.codec import codec_for
from cluster.events import Event
from cluster.host import SessionHost
from cluster.protocol import Program, ProtocolConfig, check_problem
from cluster.transcript import SessionResult, TranscriptBuilder
from workers.backend import Backend, LocalBackend
from workers.engine import HogwildEngine
from workers.model import LoadedModel, ModelInfo, load_model, load_model_info
from workers.model_store import resolve_model
from workers.sampling import SamplingParams


@dataclass(frozen=True)
class SessionConfig:
    """Everything a session needs: protocol, sampling, model (``default`` or a path), engine mode
    and the engine's KV pool."""

    protocol: ProtocolConfig = field(default_factory=ProtocolConfig)
    sampling: SamplingParams = field(
        default_factory=lambda: SamplingParams(temperature=0.6, top_p=0.95, repetition_penalty=1.1))
    model: str = "default"
    mode: str = "instant"
    pool: PoolConfig = field(default_factory=PoolConfig)

    def __post_init__(self) -> None:
        Mode.parse(self.mode)
        if not str(self.model).strip():
            raise ConfigError("the model is empty; give 'default' or a model path")


BackendFactory = Callable[[LoadedModel, SessionConfig], Backend]
Runner = Callable[[Program, SessionConfig], Iterator[Event]]


def local_backend(lm: LoadedModel, config: SessionConfig) -> Backend:
    """All workers on one engine in this process, driven directly (no host)."""
    engine = HogwildEngine(lm, mode=config.mode, pool=config.pool)
    return LocalBackend(engine, config.sampling, config.protocol.workers)


def open_model(name: str) -> LoadedModel:
    """Load ``default`` (pulled when missing) or a model path; failures become ``ConfigError``."""
    return _open(name, load_model)


def open_model_info(name: str) -> ModelInfo:
    """``open_model`` without the weights (config and tokenizer)."""
    return _open(name, load_model_info)


T = TypeVar("T")


def _open(name: str, loader: Callable[[str], T]) -> T:
    source = resolve_model(name)
    try:
        return loader(source)
    except (OSError, ValueError) as err:
        reason = str(err).strip().split("\n", 1)[0]
        raise ConfigError(f"cannot load model {name!r}: {reason}") from None


class EventStream:
    """One stream of a session's events, shared by all callers, and its result: subclasses give
    ``_run`` (the events) and ``builder`` (the transcript the result is read from)."""

    builder: TranscriptBuilder
    _stream: Iterator[Event] | None = None

    def events(self) -> Iterator[Event]:
        """The session's events as they happen (one stream per session, shared by all callers)."""
        if self._stream is None:
            self._stream = self._run()
        return self._stream

    def result(self) -> SessionResult:
        """Run to the end (if not yet done) and return the result."""
        for _ in self.events():
            pass
        return self.builder.result()

    def _run(self) -> Iterator[Event]:
        raise NotImplementedError


class Session(EventStream):
    """One problem solved by N workers; events stream once, the result is built from them."""

    def __init__(
        self,
        problem: str,
        config: SessionConfig | None = None,
        *,
        lm: LoadedModel | None = None,
        backend_factory: BackendFactory | None = None,
        runner: Runner | None = None,
    ) -> None:
        self.config = config or SessionConfig()
        check_problem(problem)  # before the (slow) model load
        if lm is None and runner is None:
            lm = open_model(self.config.model)
        self.lm = lm  # None when a runner hosts the model elsewhere
        info = lm.info if lm is not None else open_model_info(self.config.model)
        codec = codec_for(info.tokenizer, info.config.vocab_size)
        self.program = Program(problem, self.config.protocol, codec, info.max_context)
        self.backend_factory = backend_factory
        self.runner = runner
        self.builder = TranscriptBuilder(self.program.problem, time.perf_counter())

    def _run(self) -> Iterator[Event]:
        self.builder.started_at = time.perf_counter()
        if self.runner is not None:
            events = self.runner(self.program, self.config)
        elif self.backend_factory is not None:
            events = self.program.run(self.backend_factory(self.lm, self.config))
        else:
            host = SessionHost(HogwildEngine(self.lm, pool=self.config.pool))
            events = host.submit(self.program, self.config.sampling, self.config.mode).events()
        for event in events:
            self.builder.add(event, time.perf_counter())
            yield event
