"""What the HTTP app serves from: one started session host, the model's codec, the settings.

    backend = local_backend(ServeConfig())          # the model and one engine in this process
    handle = backend.submit(problem, options)       # a cluster.host.SessionHandle
    backend.close()

``gang_backend`` is the same over a gang of worker actors (``deploy.gang``). The backend turns a
request's options into a session (``ProtocolConfig``, ``SamplingParams``, mode); every error the
client can fix is a ``ConfigError`` raised before the session is queued.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass
from pathlib import Path

import torch

from cache_service.errors import ConfigError
from cache_service.kv_store import PoolConfig
from cluster.codec import Codec, codec_for
from cluster.host import RoundHost, SessionCancelled, SessionHandle, SessionHost
from cluster.protocol import Program, ProtocolConfig
from cluster.session import open_model, open_model_info
from workers.engine import HogwildEngine
from workers.model import LoadedModel, ModelInfo
from workers.sampling import SamplingParams
from deploy.config import ServeConfig


@dataclass(frozen=True)
class SessionOptions:
    """One request's session settings (None: the server's default)."""

    workers: int | None = None
    layout: str | None = None
    mode: str | None = None
    max_steps: int | None = None
    check_every: int | None = None
    max_step_tokens: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    seed: int | None = None


class ServeBackend:
    """A started host plus what building a session needs (module docstring)."""

    def __init__(self, host: RoundHost, info: ModelInfo, config: ServeConfig) -> None:
        self.host, self.info, self.config = host, info, config
        self.codec: Codec = codec_for(info.tokenizer, info.config.vocab_size)
        self.model_id = config.served_name or Path(info.name).name  # a path's last part: SmolLM2-135M-Instruct
        self.cancelled = 0  # sessions the host ended cancelled because their client left
        self._leaving: list[SessionHandle] = []  # cancelled for their client, not ended yet
        self._leaving_lock = threading.Lock()

    def knows(self, model: str | None) -> bool:
        """Whether ``model`` names this endpoint's model (None: the client left it to the server)."""
        names = {self.model_id, self.info.name, "default"}
        names |= {self.config.model} if isinstance(self.config.model, str) else set()
        return model is None or model in names

    @property
    def alive(self) -> bool:
        """Whether the host still takes sessions (a gang whose actor failed closes itself)."""
        return not self.host.closed

    def program(self, problem: str, options: SessionOptions) -> Program:
        config = self.config
        if len(problem) > config.max_prompt_chars:
            raise ConfigError(f"the problem has {len(problem)} characters, this server takes at most "
                              f"{config.max_prompt_chars}; shorten it")
        workers = options.workers or config.workers
        if workers > config.max_workers:
            raise ConfigError(f"workers must be between 1 and {config.max_workers} on this server, got {workers}")
        steps = options.max_steps or config.max_steps
        if steps > config.max_steps_limit:
            raise ConfigError(f"the budget of {steps} decode steps is above this server's limit of "
                              f"{config.max_steps_limit}; ask for fewer (max_steps / max_tokens)")
        protocol = ProtocolConfig(
            workers=workers, layout=options.layout or config.layout, max_steps=steps,
            max_step_tokens=options.max_step_tokens or config.max_step_tokens,
            check_every=config.check_every if options.check_every is None else options.check_every)
        return Program(problem, protocol, self.codec, self.info.max_context)

    def sampling(self, options: SessionOptions) -> SamplingParams:
        config = self.config
        return SamplingParams(
            temperature=config.temperature if options.temperature is None else options.temperature,
            top_p=config.top_p if options.top_p is None else options.top_p,
            seed=options.seed or 0)

    def submit(self, problem: str, options: SessionOptions) -> SessionHandle:
        """Queue a session; ``ConfigError`` for what the client can fix, ``HostBusyError`` when full."""
        program = self.program(problem, options)
        return self.host.submit(program, self.sampling(options), options.mode or self.config.mode)

    def cancel(self, handle: SessionHandle) -> None:
        """Stop a session whose client left. ``stats`` counts it once the host has ended it
        cancelled; one that ended by itself before the cancel took effect is not counted."""
        with self._leaving_lock:
            self._leaving.append(handle)
        handle.cancel()

    def stats(self) -> dict:
        stats = getattr(self.host, "stats", None)
        return {**(stats() if stats else {}), "cancelled": self._count_cancelled()}

    def _count_cancelled(self) -> int:
        """Add the sessions cancelled for their client that have ended since the last look."""
        with self._leaving_lock:
            still = []
            for handle in self._leaving:
                if not handle.done.is_set():
                    still.append(handle)
                    continue
                try:
                    handle.result()  # it has ended: returns (or raises) at once
                except SessionCancelled:
                    self.cancelled += 1
                except Exception:  # noqa: BLE001 - it finished or failed on its own; not counted
                    pass
            self._leaving = still
            return self.cancelled

    def close(self) -> None:
        self.host.close()


def local_backend(config: ServeConfig, lm: LoadedModel | None = None) -> ServeBackend:
    """The model (``lm``, else ``config.model``) and one engine in this process, its host started."""
    if config.threads:
        torch.set_num_threads(config.threads)
    lm = lm if lm is not None else open_model(config.model)
    engine = HogwildEngine(lm, pool=PoolConfig(tokens=config.kv_tokens, page_size=config.kv_page_size))
    host = SessionHost(engine, max_waiting=config.max_waiting).start()
    return ServeBackend(host, lm.info, config)


def gang_backend(config: ServeConfig, group=None) -> ServeBackend:
    """A gang of ``config.actors`` worker actors (in placement group ``group``, else its own)."""
    from deploy.gang import start_gang

    info = open_model_info(config.model)
    return ServeBackend(start_gang(config, group), info, config)
