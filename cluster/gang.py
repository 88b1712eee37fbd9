"""Many sessions on a long-lived gang of worker actors (DESIGN.md §7).

    with GangHost(RayConfig((1, 1)), spec) as host:      # placement group, actors, weights: once
        handle = host.submit(program, sampling, "instant")
        for event in handle.events(): ...

Every actor of the gang runs the same ``SessionHost`` on its replica in lockstep (SPMD): the same
admissions, the same rounds, one forward per round over all sessions' rows, whose workers are spread
over the actors (worker w on rank w % actors) and whose new K/V entries travel in one exchange per
layer. The driver never sits in the per-token loop: each call (``host_round``) hands every actor
the same submissions and cancellations, in one order, and runs up to ``rounds_per_call`` rounds;
rank 0's events come back and are dispatched to the handles. A lost actor or CacheService is
recovered (the sessions restored from the service's last checkpoint, see ``GangHost``); any other
failure ends every open session with the error (``cluster.ray_session`` names the actor) and
closes the gang.
"""

from __future__ import annotations

import os
import time
import uuid
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import ray
import torch

from cache_service.errors import ConfigError, HogwildError
from cache_service.planner import Mode
from cache_service.service import Checkpoint, RunState
from cache_service.snapshot import KVSnapshot, capture, read_file, restore
from cluster.events import Recovered
from cluster.host import MAX_WAITING, RoundHost, SessionHandle, SessionHost
from cluster.ray_connect import PROBE_TIMEOUT_S, Address, reach
from cluster.ray_session import ClusterError, RayConfig, RaySession
from workers.actor import EngineSpec, ModelSpec, WorkerActor
from workers.sampling import SamplingParams

ROUNDS_PER_CALL = 8
MAX_RECOVERIES = 3  # recoveries per gang host before its sessions end with the error
CHECKPOINT_EVERY = 4  # calls (of up to ROUNDS_PER_CALL decode steps) between checkpoints
SNAPSHOT_EVERY_S = 10.0  # least seconds between checkpoint files (with a snapshot directory)
EMPTY_SNAPSHOT = KVSnapshot({}, 0, {"kind": "gang", "sessions": {}}).to_bytes()


class _Tracked:
    """A program whose run the host started is kept (``run``), so a checkpoint can save its state."""

    def __init__(self, program: Any) -> None:
        self.program, self.run = program, None

    def start(self, cache: Any) -> Any:
        self.run = self.program.open_run(cache)
        return self.run.events()

    def resume(self, cache: Any, state: dict) -> Any:
        self.run = self.program.open_run(cache)
        return self.run.resume(state)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.program, name)


class _Recording:
    """The engine as a session host sees it, with commits going through the backend (so rank 0
    records them for the CacheService); everything else is the engine's."""

    def __init__(self, backend: Any) -> None:
        self.backend = backend

    def commit(self, step_block: int, into: int) -> None:
        self.backend.commit(step_block, into)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.backend.engine, name)


class _Replica:
    """A gang actor's replica for its session host: the backend's prefill and decode, ``_Recording``."""

    def __init__(self, backend: Any) -> None:
        self.backend, self.engine = backend, _Recording(backend)

    def prefill(self, block: int, tokens: Sequence[int], context: Sequence[int] = ()) -> None:
        self.backend.prefill(block, tokens, context)

    def decode(self, groups: Sequence[Any], prefills: Sequence[Any] = ()) -> list[list[int]]:
        return self.backend.decode(groups, prefills)

    def share_prefix(self, block: int, tokens: Sequence[int]) -> int:
        return self.backend.share_prefix(block, tokens)


class GangWorker(WorkerActor):
    """A worker actor that also runs a session host over its replica (driven by ``GangHost``)."""

    def host_round(self, commands: Sequence[tuple], rounds: int, checkpoint: bool = False,
                   snapshot: bytes | None = None) -> dict:
        """Optionally restore the cache from ``snapshot`` (a new gang, or a lost CacheService), or
        checkpoint the state before this call (to the CacheService, through rank 0); apply
        ``("submit", id, program, sampling, mode)`` / ``("resume", id, program, sampling, mode,
        saved)`` / ``("cancel", id)`` in order, then run up to ``rounds`` host rounds (fewer when
        idle). Rank 0 returns ``events`` [(id, event)], ``ended`` [(id, error or None)], ``waiting``
        (sessions not admitted yet) and ``service_lost`` (why the CacheService is gone, or None)."""
        if getattr(self, "host", None) is None or snapshot is not None:
            self._new_host(snapshot)
        elif checkpoint:
            self._checkpoint()
        ended: list[tuple[int, BaseException | None]] = []
        for command in commands:
            if command[0] in ("submit", "resume"):
                try:
                    self.handles[command[1]] = self._open(command)
                except HogwildError as err:
                    ended.append((command[1], err))
            elif command[1] in self.handles:
                self.host.cancel(self.handles[command[1]])
        if snapshot is not None:  # blocks of sessions that were not resumed (ended since): free them
            owned = {b for live in self.host.live for b in live.blocks.owned}
            for block in [b for b in self.engine.store.blocks if b not in owned]:
                self.engine.free(block)
        for _ in range(rounds):
            if not self.host.step():
                break
        events = [(sid, event) for sid, handle in self.handles.items() for event in handle.poll()]
        for sid, _ in events:
            self.emitted[sid] = self.emitted.get(sid, 0) + 1
        for sid in [sid for sid, handle in self.handles.items() if handle.done.is_set()]:
            ended.append((sid, self.handles.pop(sid)._error))
            self.emitted.pop(sid, None)
        if self.placement.rank != 0:
            return {"events": [], "ended": [], "waiting": 0, "service_lost": None}
        self._flush()
        lost = self.recorder.poll() if self.recorder is not None else None
        return {"events": events, "ended": ended, "waiting": len(self.host.waiting), "service_lost": lost}

    def _new_host(self, snapshot: bytes | None) -> None:
        """A fresh session host; its cache restored from ``snapshot`` (when given), which the
        CacheService holds too (so every restored block is mirrored)."""
        self.engine.clear(Mode.INSTANT)  # the engine's own mode is unused: rows carry their session's
        self.host, self.handles, self.emitted = SessionHost(_Replica(self.backend), max_waiting=1 << 30), {}, {}
        self.backend.mirrored = set()
        if snapshot is not None:
            restore(self.engine.store, KVSnapshot.from_bytes(snapshot))
            if self.recorder is not None:
                self.backend.mirrored = set(self.engine.store.blocks)

    def _open(self, command: tuple) -> SessionHandle:
        program, sampling, mode = _Tracked(command[2]), command[3], command[4]
        if command[0] == "submit":
            return self.host.submit(program, sampling, mode)
        saved = command[5]
        run = RunState.from_dict(saved["run"])
        self.emitted[command[1]] = int(saved["events"])
        return self.host.adopt(program, run.protocol, saved["blocks"], sampling, mode, run.rng)

    def _checkpoint(self) -> None:
        """Rank 0 pushes a ``Checkpoint`` of every session waiting for a decode step's tokens (its
        blocks, run state, generators and events so far), in order with its other records. Every
        rank takes part: the generators of a session's worker w advance on rank w % world only."""
        by_handle = {h: sid for sid, h in self.handles.items()}
        lives = [live for live in self.host.live if live.handle in by_handle
                 and live.handle.program.run is not None and live.handle.program.run.boundary]
        rngs = self._generator_states(lives)  # not at a boundary: prefilling, or asking the finisher
        if self.placement.rank != 0 or self.recorder is None or self.recorder.lost is not None:
            return
        store, sessions, blocks = self.engine.store, {}, {}
        for live, rng in zip(lives, rngs):
            run, sid = live.handle.program.run, by_handle[live.handle]
            sessions[str(sid)] = {"run": RunState(run.steps, run.state(), rng).to_dict(),
                                  "blocks": list(live.blocks.owned), "events": self.emitted.get(sid, 0)}
            blocks.update({b: (store.block(b).length, store.block(b).reserved) for b in live.blocks.owned})
        live_blocks = capture(store, [b for b in blocks if b not in self.backend.mirrored])
        self.recorder.record(Checkpoint(blocks, live_blocks, sorted(store.blocks), max(store.blocks, default=-1) + 1,
                                        {"kind": "gang", "sessions": sessions}))
        self.backend.mirrored.update(live_blocks)  # the service mirrors them from this record on
        self._flush()

    def _generator_states(self, lives: list) -> list[dict[int, bytes]]:
        """Each session's worker generators' states, each from the rank that samples it (one gather)."""
        pairs = [(i, w) for i, live in enumerate(lives) for w in range(len(live.generators))]
        if not pairs:
            return [{} for _ in lives]
        world, rank = self.placement.world, self.placement.rank
        mine = torch.zeros(len(pairs), torch.Generator().get_state().numel(), dtype=torch.uint8)
        for k, (i, w) in enumerate(pairs):
            if w % world == rank:
                mine[k] = lives[i].generators[w].get_state()
        everything = self.collective.gather_rows(mine.to(self.device), [len(pairs)] * world).cpu()
        out: list[dict[int, bytes]] = [{} for _ in lives]
        for k, (i, w) in enumerate(pairs):
            out[i][w] = everything[(w % world) * len(pairs) + k].numpy().tobytes()
        return out


class GangHost(RoundHost):
    """Runs any number of sessions on one gang of worker actors (see the module docstring).

    Recovery. Every ``checkpoint_every`` calls, rank 0 pushes a checkpoint of its sessions to the
    CacheService (in order with its records: the service holds a consistent cut, see
    ``cache_service.service.Checkpoint``); with ``snapshot_dir`` the service also writes it to a
    file there every ``snapshot_every_s`` seconds.

    * A lost worker actor (preempted node, OOM kill, GPU fault): the gang is torn down (collective,
      actors, placement group) and a new one started (its bundles reserved again); its cache and
      sessions are restored from the service's last checkpoint (K/V restored, not recomputed) and
      the steps since then are generated again. Sessions the checkpoint lacks (still prefilling,
      or asking the finisher) replay from their start. Programs are deterministic and each
      session's sampling RNG state is in the checkpoint, so the regenerated events equal the lost
      ones; those already delivered are dropped and the sessions go on after a ``Recovered`` event.
    * A lost CacheService: a new one is started in its bundle and restored from the last snapshot
      file (without ``snapshot_dir``: the sessions replay from their start); the actors roll back
      to it and go on the same way.

    At most ``max_recoveries`` times per host, then the sessions end with the error."""

    def __init__(self, config: RayConfig, spec: EngineSpec, *, rounds_per_call: int = ROUNDS_PER_CALL,
                 max_waiting: int = MAX_WAITING, max_recoveries: int = MAX_RECOVERIES,
                 checkpoint_every: int = CHECKPOINT_EVERY, snapshot_dir: str | Path | None = None,
                 snapshot_every_s: float = SNAPSHOT_EVERY_S, group: Any = None) -> None:
        super().__init__(max_waiting)
        self.group = group  # a placement group reserved by its owner (a Serve replica's), see RaySession
        if rounds_per_call < 1:
            raise ConfigError(f"rounds_per_call must be >= 1, got {rounds_per_call}")
        if max_recoveries < 0:
            raise ConfigError(f"max_recoveries must be >= 0, got {max_recoveries}")
        if checkpoint_every < 0:
            raise ConfigError(f"checkpoint_every must be >= 0 calls (0: never, recovery replays), "
                              f"got {checkpoint_every}")
        self.config, self.spec = config, spec
        self.rounds_per_call, self.max_recoveries = rounds_per_call, max_recoveries
        self.checkpoint_every, self.snapshot_every_s = checkpoint_every, snapshot_every_s
        self.snapshot_file = _snapshot_file(snapshot_dir)
        self.session = self._start_gang()
        self.pool_pages, self.page_size = self.session.agree("pool_pages")
        self.open: dict[int, SessionHandle] = {}
        self.remote_waiting = 0
        self.recoveries = 0
        self.calls = 0
        self._submits: dict[int, tuple] = {}  # open sessions' submit commands, in order (for a replay)
        self._cancelled: set[int] = set()
        self._delivered: dict[int, int] = {}  # events handed to each open session's handle
        self._skip: dict[int, int] = {}  # regenerated events still to drop
        self._replay: list[tuple] = []  # commands for the next call after a recovery
        self._snapshot: Any = None  # what the next call restores (an ObjectRef of snapshot bytes)

    def step(self) -> bool:
        """One call on every actor: the new commands, then up to ``rounds_per_call`` rounds."""
        with self._round:
            arrived, cancels = self._take_inbox()
            commands: list[tuple[Any, ...]] = [("submit", w.handle.id, w.handle.program, w.params, w.mode.value)
                                               for w in arrived]
            self._submits.update({c[1]: c for c in commands})
            commands += [("cancel", handle.id) for handle in cancels]
            self._cancelled.update(handle.id for handle in cancels)
            commands, self._replay = self._replay + commands, []
            self.open.update({w.handle.id: w.handle for w in arrived})
            if not self.open:
                return False
            self.calls += 1
            checkpoint = bool(self.checkpoint_every) and self.calls % self.checkpoint_every == 0
            snapshot, self._snapshot = self._snapshot, None
            try:
                report = self.session.call("host_round", commands, self.rounds_per_call, checkpoint, snapshot)[0]
            except HogwildError as err:  # an actor failed: the gang is gone
                if self._recover(err):
                    return True
                self._end_all(err)
                self._closed = True
                return False
            self._dispatch(report)
            if report.get("service_lost") and self.open and not self._replace_service(report["service_lost"]):
                self._closed = True
            return True

    def resume(self, program: Any, sampling: SamplingParams, mode: Mode | str, snapshot: bytes,
               saved: dict, past: Sequence[Any] = ()) -> SessionHandle:
        """Continue a saved session (``cluster.resume``) on this gang, which must not have run any
        session yet: its cache is restored from ``snapshot`` (the session's blocks) and its program
        from ``saved`` (``run``: a ``RunState`` dict, ``blocks``, ``events`` reported before, which
        are ``past``: the handle's result includes them; they are not delivered again)."""
        with self._round, self._lock:
            if self.open or self._inbox or self.calls:
                raise ConfigError("a saved session can only be resumed on a gang that has run no session yet")
            handle = SessionHandle(self, next(self._ids), program)
            for event in past:
                handle.builder.add(event, time.perf_counter())
            mode = Mode.parse(mode).value
            ref = ray.put(_as_gang(snapshot, {str(handle.id): saved}))
            self.session.ask_service("load", ref)
            self._snapshot = ref
            self._submits[handle.id] = ("submit", handle.id, program, sampling, mode)
            self._replay = [("resume", handle.id, program, sampling, mode, saved)]
            self._delivered[handle.id] = int(saved["events"])
            self.open[handle.id] = handle
        return handle

    def checkpoint(self) -> KVSnapshot | None:
        """The CacheService's last checkpoint of this gang's sessions (``meta["sessions"]``: by id,
        each one's ``run``, ``blocks`` and ``events``), or None when it has none yet."""
        blob = self.session.ask_service("checkpoint_blob")
        return None if blob is None else KVSnapshot.from_bytes(blob)

    def _dispatch(self, report: dict) -> None:
        for sid, event in report["events"]:
            if self._skip.get(sid):
                self._skip[sid] -= 1  # delivered before the recovery
                continue
            self._delivered[sid] = self._delivered.get(sid, 0) + 1
            self.open[sid]._emit(event)
        for sid, error in report["ended"]:
            self.open.pop(sid)._end(error)
            for table in (self._submits, self._delivered, self._skip):
                table.pop(sid, None)
            self._cancelled.discard(sid)
        self.remote_waiting = report["waiting"]

    # ---- recovery ----------------------------------------------------------------------------
    def _start_gang(self) -> RaySession:
        session = RaySession(self.config, self.spec, actor_class=GangWorker, salvage=True, group=self.group).start()
        if not self.checkpoint_every:  # nothing to restore from: the service need not mirror the sessions
            session.call("attach_service", None)
        elif self.snapshot_file is not None:
            session.configure_service(str(self.snapshot_file), self.snapshot_every_s)
        return session

    def _recover(self, error: HogwildError) -> bool:
        """Replace a gang that lost actors and queue the open sessions' restore; False when the
        error is not a lost actor, or the retries are spent, or the new gang cannot start."""
        lost = getattr(error, "lost", ())
        if not lost:
            return False
        start = time.monotonic()
        blob = self._last_checkpoint()
        self.session.close()
        while True:
            if self.recoveries >= self.max_recoveries:
                error.add_note(f"gave up after {self.recoveries} recoveries (max_recoveries)")
                return False
            self.recoveries += 1
            try:
                self.session = self._start_gang()
                if tuple(self.session.agree("pool_pages")) != (self.pool_pages, self.page_size):
                    raise ClusterError("the replacement actors have another KV pool size; the gang cannot resume")
                how = self._restore_from(blob)
                break
            except HogwildError as err:  # the new gang did not start: try again while attempts are left
                self.session.close()
                error.add_note(f"recovery {self.recoveries} failed: {err}")
        ranks = " and ".join(map(str, lost))
        self._announce(tuple(lost), f"worker actor{'s' if len(lost) > 1 else ''} {ranks} lost", start, how)
        return True

    def _replace_service(self, reason: str) -> bool:
        """A new CacheService, restored from the last snapshot file; the actors roll back to it."""
        start = time.monotonic()
        if self.recoveries >= self.max_recoveries:
            error = ClusterError(f"the cache service was lost ({reason}); gave up after {self.recoveries} "
                                 "recoveries (max_recoveries)")
            self._end_all(error)
            return False
        self.recoveries += 1
        blob = read_file(self.snapshot_file) if self.snapshot_file and self.snapshot_file.exists() else None
        try:
            self.session.replace_service()
            if self.snapshot_file is not None:
                self.session.configure_service(str(self.snapshot_file), self.snapshot_every_s)
            self.session.call("attach_service", self.session.service)
            how = self._restore_from(blob if blob is not None else EMPTY_SNAPSHOT)
        except HogwildError as err:
            self._end_all(err)
            return False
        self._announce((), "the cache service was lost", start, how)
        return True

    def _last_checkpoint(self) -> bytes | None:
        """The CacheService's last checkpoint (kept when the session failed), else the last file."""
        if self.session.salvaged is not None:
            return self.session.salvaged
        if self.snapshot_file is not None and self.snapshot_file.exists():
            return read_file(self.snapshot_file)
        return None

    def _restore_from(self, blob: bytes | None) -> str:
        """Queue the open sessions for the next call: resumed from ``blob``'s checkpoint where it has
        them, else replayed from their start; the new service adopts ``blob``. Says which."""
        saved: dict = {}
        if blob is not None:
            ref = ray.put(blob)
            saved = self.session.ask_service("load", ref).get("sessions", {})
            self._snapshot = ref
        self._replay, self._skip, resumed = [], {}, 0
        for sid in self.open:
            if sid not in self._submits:
                continue
            delivered, state = self._delivered.get(sid, 0), saved.get(str(sid))
            if state is not None and state["events"] <= delivered:
                self._replay.append(("resume", *self._submits[sid][1:], state))
                self._skip[sid] = delivered - state["events"]
                resumed += 1
            else:
                self._replay.append(self._submits[sid])
                self._skip[sid] = delivered
        self._replay += [("cancel", sid) for sid in self.open if sid in self._cancelled]
        replayed = len(self._skip) - resumed
        parts = [f"{resumed} restored from the cache service's checkpoint"] if resumed else []
        parts += [f"{replayed} replayed from the start"] if replayed else []
        return "; sessions: " + ", ".join(parts) if parts else ""

    def _announce(self, lost: tuple[int, ...], what: str, start: float, how: str) -> None:
        seconds = time.monotonic() - start
        message = (f"{what}; recovered in {seconds:.1f} s (attempt {self.recoveries} of {self.max_recoveries}"
                   f"{how})")
        for handle in self.open.values():
            handle._emit(Recovered(lost, round(seconds, 3), self.recoveries, message))

    def _busy(self) -> bool:
        return bool(self.open)

    def _waiting_count(self) -> int:
        return self.remote_waiting

    def _end_all(self, error: BaseException) -> None:
        arrived, _ = self._take_inbox()
        for handle in [*self.open.values(), *(w.handle for w in arrived)]:
            if not handle.done.is_set():
                handle._end(error)
        self.open.clear()
        self.session.close()


def _as_gang(blob: bytes, sessions: dict) -> bytes:
    """A snapshot's blocks with a gang checkpoint's metadata (``sessions`` by id)."""
    snapshot = KVSnapshot.from_bytes(blob)
    return KVSnapshot(snapshot.blocks, snapshot.next_block, {"kind": "gang", "sessions": sessions}).to_bytes()


def _snapshot_file(directory: str | Path | None) -> Path | None:
    """A file of its own in ``directory`` for a gang's checkpoints (the directory is created)."""
    if directory is None:
        return None
    path = Path(directory)
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise ConfigError(f"cannot use the snapshot directory {path}: {err.strerror}; give a writable one") from None
    return path / f"gang-{os.getpid()}-{uuid.uuid4().hex[:8]}.hwkv"


class RayRunner:
    """What ``Session`` calls to run its program on Ray: ``runner(program, session_config)``, a gang
    of ``actors`` worker actors hosting this one session (started and removed around it).
    ``options``: further ``RayConfig`` fields (strategy, device, address, timeouts ...)."""

    def __init__(self, actors: int, **options: Any) -> None:
        if actors < 1:
            raise ConfigError(f"--actors must be >= 1, got {actors}")
        self.actors, self.options = actors, options
        address = options.get("address") or os.environ.get("RAY_ADDRESS")
        if address and not ray.is_initialized():  # fail before anything loads (connect checks it fully)
            source = "--ray-address" if options.get("address") else "RAY_ADDRESS"
            parsed = Address.parse(address, source)
            if parsed is not None:
                reach(parsed, source, PROBE_TIMEOUT_S)

    def __call__(self, program: Any, config: Any) -> Iterator[Any]:
        ray_config = RayConfig.split(config.protocol.workers, self.actors, **self.options)
        # "default" stays a name: every node resolves (and if needed pulls) its own copy
        spec = EngineSpec(ModelSpec(config.model), sampling=config.sampling, pool=config.pool)
        with GangHost(ray_config, spec) as host:
            yield from host.submit(program, config.sampling, config.mode).events()
