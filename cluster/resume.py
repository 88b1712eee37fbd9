"""Saving a running session to a file and continuing it later, in another process (issue 13).

    session = SavedSession.new(problem, config, save_to="s.hwkv", every=16)   # rewritten every 16 steps
    for event in session.events(): ...
    session = SavedSession.resume("s.hwkv")                  # continues where the file was written
    result = session.result()                                # equals an uninterrupted run's

A session file is a cache snapshot (``cache_service.snapshot``: a msgpack header and raw tensor
bytes, never pickle): every block of the cache (prompt, committed history, each worker's unfinished
step) and, in its metadata, the session (problem and config), the ``RunState`` (decode steps done,
the protocol's run state, each worker's sampling RNG state) and the events reported so far (the
transcript is rebuilt from them). A file is written while the run waits for a decode step's tokens,
so the resumed run makes that request again and goes on exactly as the saved one would have.
``SavedSession`` runs in this process; ``RaySavedSession`` on Ray worker actors (``--actors``),
saving from the gang's checkpoints in the CacheService; each resumes the other's files.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from dataclasses import asdict, fields
from pathlib import Path
from typing import Any

import torch

import cluster.events as events_module
from cache_service.errors import ConfigError
from cache_service.kv_store import PoolConfig
from cache_service.service import RunState
from cache_service.snapshot import KVSnapshot, SnapshotError, capture, read_file, restore
from cluster.codec import codec_for
from cluster.events import Event
from cluster.layouts import Layout
from cluster.protocol import Decode, Prefill, Program, ProtocolConfig, check_problem
from cluster.prompts import Templates
from cluster.session import EventStream, SessionConfig, open_model, open_model_info
from cluster.transcript import TranscriptBuilder
from workers.backend import LocalBackend
from workers.engine import HogwildEngine
from workers.model import LoadedModel
from workers.sampling import SamplingParams

KIND = "hogwild-session"
PROTOCOL_FIELDS = ("workers", "layout", "max_steps", "max_step_tokens", "check_every", "answer_tokens",
                   "checkpoints")


class SavedSession(EventStream):
    """A session in this process that saves itself every ``every`` decode steps (when ``save_to``)."""

    def __init__(self, program: Program, config: SessionConfig, lm: LoadedModel, *, save_to: str | Path | None,
                 every: int, past: list[Event] | None = None, snapshot: KVSnapshot | None = None) -> None:
        _check_every(save_to, every)
        self.program, self.config, self.lm = program, config, lm
        self.save_to, self.every = (Path(save_to) if save_to else None), every
        self.past = list(past or [])
        engine = HogwildEngine(lm, mode=config.mode, pool=config.pool)
        self.backend = LocalBackend(engine, config.sampling, config.protocol.workers)
        self.run = program.open_run(self.backend)
        if snapshot is None:
            self.steps = self.run.events()
        else:
            restore(engine.store, snapshot)
            state = RunState.from_dict(snapshot.meta["run"])
            for worker, blob in state.rng.items():
                self.backend.generators[worker].set_state(torch.frombuffer(bytearray(blob), dtype=torch.uint8))
            self.steps = self.run.resume(state.protocol)
        self.resumed_at = state.steps if snapshot is not None else 0  # decode steps done before
        self.builder = TranscriptBuilder(program.problem, time.perf_counter())
        self._stream = None
        self._saved_at = self.resumed_at

    @classmethod
    def new(cls, problem: str, config: SessionConfig, *, save_to: str | Path, every: int,
            lm: LoadedModel | None = None) -> "SavedSession":
        check_problem(problem)  # before the (slow) model load
        _check_every(save_to, every)
        _check_saveable(config)
        lm = lm or open_model(config.model)
        program = Program(problem, config.protocol, codec_for(lm.info.tokenizer, lm.info.config.vocab_size),
                          lm.info.max_context)
        return cls(program, config, lm, save_to=save_to, every=every)

    @classmethod
    def resume(cls, path: str | Path, *, save_to: str | Path | None = None, every: int = 16,
               lm: LoadedModel | None = None) -> "SavedSession":
        """The session saved in ``path``, continuing (and saving on into ``save_to``, if given)."""
        _check_every(save_to, every)
        snapshot = KVSnapshot.load(path)
        meta = snapshot.meta
        if meta.get("kind") != KIND or "run" not in meta:
            raise SnapshotError(f"{path} is not a saved session; give a file written by `hogwild run --save`")
        problem, config = meta["problem"], config_from(meta["config"])
        lm = lm or open_model(config.model)
        program = Program(problem, config.protocol, codec_for(lm.info.tokenizer, lm.info.config.vocab_size),
                          lm.info.max_context)
        past = [event_from(d) for d in meta["events"]]
        return cls(program, config, lm, save_to=save_to, every=every, past=past, snapshot=snapshot)

    def _run(self) -> Iterator[Event]:
        for event in self.past:  # what the saved run reported: the view and transcript see it again
            self.builder.add(event, time.perf_counter())
            yield event
        reply = None
        while True:
            try:
                item = self.steps.send(reply)
            except StopIteration:
                return
            reply = None
            if isinstance(item, Prefill):
                self.backend.prefill(item.block, item.tokens, item.context)
            elif isinstance(item, Decode):
                self._maybe_save()
                reply = self.backend.step(item.rows, item.workers, greedy=item.greedy, suppress=item.suppress,
                                          recent=item.recent)
            else:
                self.builder.add(item, time.perf_counter())
                self.past.append(item)
                yield item

    def _maybe_save(self) -> None:
        steps = self.run.steps
        if self.save_to is None or not self.run.boundary or steps == self._saved_at or steps % self.every:
            return
        self.save(self.save_to)
        self._saved_at = steps

    def save(self, path: str | Path) -> Path:
        """Write the session as it is now (while its run waits for a decode step)."""
        store = self.backend.engine.store
        rng = {w: g.get_state().numpy().tobytes() for w, g in enumerate(self.backend.generators)}
        state = RunState(self.run.steps, self.run.state(), rng)
        meta = {"kind": KIND, "problem": self.program.problem, "config": config_meta(self.config),
                "run": state.to_dict(), "events": [event.to_dict() for event in self.past]}
        return KVSnapshot(capture(store), max(store.blocks, default=-1) + 1, meta).save(path)


class RaySavedSession(EventStream):
    """``SavedSession`` on a gang of Ray worker actors (``hogwild run --actors N --save/--resume``).
    The gang checkpoints its session to the CacheService every call; every ``every`` decode steps
    the latest checkpoint is written to ``save_to`` as a session file (the same format as
    ``SavedSession``'s, so either kind resumes the other's files). ``resume`` continues a session
    file on a new gang. ``options``: ``RayConfig`` fields (strategy, address, ...)."""

    def __init__(self, program: Program, config: SessionConfig, actors: int, *, save_to: str | Path | None,
                 every: int, past: list[Event] | None = None, snapshot: bytes | None = None,
                 saved: dict | None = None, options: dict | None = None, model: Any = None) -> None:
        _check_every(save_to, every)
        self.model = model  # what the actors load (a ``ModelSpec``; default: the config's model by name)
        self.program, self.config, self.actors, self.options = program, config, actors, dict(options or {})
        self.save_to, self.every = (Path(save_to) if save_to else None), every
        self.past = list(past or [])  # the session's events (not ``Recovered``): what a file replays
        self.snapshot, self.saved = snapshot, saved
        self.resumed_at = RunState.from_dict(saved["run"]).steps if saved else 0
        self.builder = TranscriptBuilder(program.problem, time.perf_counter())
        self._stream = None

    @classmethod
    def new(cls, problem: str, config: SessionConfig, actors: int, *, save_to: str | Path | None, every: int,
            lm: LoadedModel | None = None, model: Any = None, **options: Any) -> "RaySavedSession":
        check_problem(problem)
        _check_every(save_to, every)
        _check_saveable(config)
        return cls(_program(problem, config, lm), config, actors, save_to=save_to, every=every, options=options,
                   model=model)

    @classmethod
    def resume(cls, path: str | Path, actors: int, *, save_to: str | Path | None = None, every: int = 16,
               lm: LoadedModel | None = None, model: Any = None, **options: Any) -> "RaySavedSession":
        """The session saved in ``path`` continued on ``actors`` new worker actors."""
        _check_every(save_to, every)
        blob = read_file(path)
        snapshot = KVSnapshot.from_bytes(blob)
        meta = _session_meta(snapshot, path)
        config = config_from(meta["config"])
        past = [event_from(d) for d in meta["events"]]
        saved = {"run": meta["run"], "blocks": sorted(snapshot.blocks), "events": len(past)}
        return cls(_program(meta["problem"], config, lm), config, actors, save_to=save_to, every=every, past=past,
                   snapshot=blob, saved=saved, options=options, model=model)

    def close(self) -> None:
        """Stop the session (its gang is removed); a saved file stays."""
        if self._stream is not None:
            self._stream.close()

    def _run(self) -> Iterator[Event]:
        from cluster.gang import GangHost
        from cluster.ray_session import RayConfig
        from workers.actor import EngineSpec, ModelSpec

        for event in self.past:
            self.builder.add(event, time.perf_counter())
            yield event
        config = self.config
        ray_config = RayConfig.split(config.protocol.workers, self.actors, **self.options)
        spec = EngineSpec(self.model or ModelSpec(config.model), sampling=config.sampling, pool=config.pool)
        with GangHost(ray_config, spec, checkpoint_every=1) as host:
            if self.snapshot is None:
                handle = host.submit(self.program, config.sampling, config.mode)
            else:
                handle = host.resume(self.program, config.sampling, config.mode, self.snapshot, self.saved,
                                     self.past)
            saved_at = self.resumed_at
            for event in handle.events():
                self.builder.add(event, time.perf_counter())
                if not isinstance(event, events_module.Recovered):
                    self.past.append(event)
                yield event
                if isinstance(event, events_module.Tick) and self.save_to and event.step - saved_at >= self.every:
                    saved_at = self._save(host, handle.id, saved_at)

    def _save(self, host: Any, session_id: int, saved_at: int) -> int:
        """Write the gang's last checkpoint of the session; the decode steps it holds."""
        checkpoint = host.checkpoint()
        saved = None if checkpoint is None else checkpoint.meta.get("sessions", {}).get(str(session_id))
        if saved is None or saved["events"] > len(self.past):
            return saved_at  # none yet (e.g. the session is still prefilling)
        blocks = {b: checkpoint.blocks[b] for b in saved["blocks"]}
        meta = {"kind": KIND, "problem": self.program.problem, "config": config_meta(self.config),
                "run": saved["run"], "events": [event.to_dict() for event in self.past[: saved["events"]]]}
        KVSnapshot(blocks, checkpoint.next_block, meta).save(self.save_to)
        return RunState.from_dict(saved["run"]).steps


def _program(problem: str, config: SessionConfig, lm: LoadedModel | None) -> Program:
    """The session's program; only the tokenizer is needed here (the actors load the model)."""
    info = lm.info if lm is not None else open_model_info(config.model)
    return Program(problem, config.protocol, codec_for(info.tokenizer, info.config.vocab_size), info.max_context)


def _session_meta(snapshot: KVSnapshot, path: str | Path) -> dict:
    meta = snapshot.meta
    if meta.get("kind") != KIND or "run" not in meta:
        raise SnapshotError(f"{path} is not a saved session; give a file written by `hogwild run --save`")
    return meta


# ---- plain data for the file ---------------------------------------------------------------------
def _check_every(save_to: str | Path | None, every: int) -> None:
    if save_to is not None and every < 1:
        raise ConfigError(f"--save-every must be >= 1 decode steps, got {every}")


def _check_saveable(config: SessionConfig) -> None:
    protocol = config.protocol
    if isinstance(protocol.layout, Layout) or protocol.templates != Templates():
        raise ConfigError("only sessions with a layout by name and the default templates can be saved")


def config_meta(config: SessionConfig) -> dict:
    """A ``SessionConfig`` as msgpack-able data (layouts by name, default templates)."""
    _check_saveable(config)
    return {"protocol": {name: getattr(config.protocol, name) for name in PROTOCOL_FIELDS},
            "sampling": asdict(config.sampling), "model": config.model, "mode": config.mode,
            "pool": asdict(config.pool)}


def config_from(data: dict) -> SessionConfig:
    try:
        protocol = ProtocolConfig(**{**data["protocol"], "checkpoints": tuple(data["protocol"]["checkpoints"])})
        return SessionConfig(protocol=protocol, sampling=SamplingParams(**data["sampling"]), model=data["model"],
                             mode=data["mode"], pool=PoolConfig(**data["pool"]))
    except (KeyError, TypeError) as err:
        raise SnapshotError(f"the saved session's config is malformed ({err!r}); the file is damaged") from None


def event_from(data: dict) -> Event:
    """An event from its ``to_dict()`` (lists back to tuples where the field is a tuple)."""
    data = dict(data)
    cls: Any = getattr(events_module, str(data.pop("type", "")), None)
    if cls is None or not hasattr(cls, "to_dict"):
        raise SnapshotError(f"the saved session holds an unknown event {data!r}; the file is damaged")
    values = {f.name: (tuple(data[f.name]) if isinstance(data.get(f.name), list) else data.get(f.name))
              for f in fields(cls)}
    return cls(**values)
