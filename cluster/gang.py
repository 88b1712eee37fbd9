"""Many sessions on a long-lived gang of worker actors (DESIGN.md §7).

    with GangHost(RayConfig((1, 1)), spec) as host:      # placement group, actors, weights: once
        handle = host.submit(program, sampling, "instant")
        for event in handle.events(): ...

Every actor of the gang runs the same ``SessionHost`` on its replica in lockstep (SPMD): the same
admissions, the same rounds, one forward per round over all sessions' rows, whose workers are spread
over the actors (worker w on rank w % actors) and whose new K/V entries travel in one exchange per
layer. The driver never sits in the per-token loop: each call (``host_round``) hands every actor
the same submissions and cancellations, in one order, and runs up to ``rounds_per_call`` rounds;
rank 0's events come back and are dispatched to the handles. A lost actor is recovered (a new
gang replays the open sessions, see ``GangHost``); any other failure ends every open session with
the error (``cluster.ray_session`` names the actor) and closes the gang.
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterator, Sequence
from typing import Any

import ray

from cache_service.errors import ConfigError, HogwildError
from cache_service.planner import Mode
from cluster.events import Recovered
from cluster.host import MAX_WAITING, RoundHost, SessionHandle, SessionHost
from cluster.ray_connect import PROBE_TIMEOUT_S, Address, reach
from cluster.ray_session import ClusterError, RayConfig, RaySession
from workers.actor import EngineSpec, ModelSpec, WorkerActor

ROUNDS_PER_CALL = 8
MAX_RECOVERIES = 3  # lost-actor recoveries per gang host before its sessions end with the error


class GangWorker(WorkerActor):
    """A worker actor that also runs a session host over its replica (driven by ``GangHost``)."""

    def host_round(self, commands: Sequence[tuple], rounds: int) -> dict:
        """Apply ``("submit", id, program, sampling, mode)`` / ``("cancel", id)`` in order, then run up
        to ``rounds`` host rounds (fewer when idle). Rank 0 returns ``events`` [(id, event)],
        ``ended`` [(id, error or None)] and ``waiting`` (sessions not admitted yet)."""
        if getattr(self, "host", None) is None:
            self.engine.clear(Mode.INSTANT)  # the engine's own mode is unused: rows carry their session's
            self.backend.recorder = None  # the CacheService mirrors one session; a gang's are not saved yet
            self.host, self.handles = SessionHost(self.backend, max_waiting=1 << 30), {}
        ended: list[tuple[int, BaseException | None]] = []
        for command in commands:
            if command[0] == "submit":
                _, session_id, program, sampling, mode = command
                try:
                    self.handles[session_id] = self.host.submit(program, sampling, mode)
                except HogwildError as err:
                    ended.append((session_id, err))
            elif command[1] in self.handles:
                self.host.cancel(self.handles[command[1]])
        for _ in range(rounds):
            if not self.host.step():
                break
        events = [(sid, event) for sid, handle in self.handles.items() for event in handle.poll()]
        for sid in [sid for sid, handle in self.handles.items() if handle.done.is_set()]:
            ended.append((sid, self.handles.pop(sid)._error))
        if self.placement.rank != 0:
            return {"events": [], "ended": [], "waiting": 0}
        return {"events": events, "ended": ended, "waiting": len(self.host.waiting)}


class GangHost(RoundHost):
    """Runs any number of sessions on one gang of worker actors (see the module docstring).

    A lost worker actor (it died: preempted node, OOM kill, GPU fault) is recovered: the gang is
    torn down (collective, actors, placement group), a new one is started (its bundles reserved
    again) and every open session is replayed from its program on it. Programs are deterministic
    and each session's sampling RNG depends only on (seed, worker), so a replay produces the same
    events; the ones already delivered are dropped and the sessions go on where they were, after a
    ``Recovered`` event. At most ``max_recoveries`` times per host, then the sessions end with the
    error. (Replay recomputes each session's tokens so far; restoring caches from the CacheService
    instead is not built.)"""

    def __init__(self, config: RayConfig, spec: EngineSpec, *, rounds_per_call: int = ROUNDS_PER_CALL,
                 max_waiting: int = MAX_WAITING, max_recoveries: int = MAX_RECOVERIES) -> None:
        super().__init__(max_waiting)
        if rounds_per_call < 1:
            raise ConfigError(f"rounds_per_call must be >= 1, got {rounds_per_call}")
        if max_recoveries < 0:
            raise ConfigError(f"max_recoveries must be >= 0, got {max_recoveries}")
        self.config, self.spec = config, spec
        self.rounds_per_call, self.max_recoveries = rounds_per_call, max_recoveries
        self.session = RaySession(config, spec, actor_class=GangWorker).start()
        self.pool_pages, self.page_size = self.session.agree("pool_pages")
        self.open: dict[int, SessionHandle] = {}
        self.remote_waiting = 0
        self.recoveries = 0
        self._submits: dict[int, tuple] = {}  # open sessions' submit commands, in order (for a replay)
        self._cancelled: set[int] = set()
        self._delivered: dict[int, int] = {}  # events handed to each open session's handle
        self._skip: dict[int, int] = {}  # replayed events still to drop
        self._replay: list[tuple] = []  # commands for the next call after a recovery

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
            try:
                report = self.session.call("host_round", commands, self.rounds_per_call)[0]
            except HogwildError as err:  # an actor failed: the gang is gone
                if self._recover(err):
                    return True
                self._end_all(err)
                self._closed = True
                return False
            self._dispatch(report)
            return True

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

    def _recover(self, error: HogwildError) -> bool:
        """Replace a gang that lost actors and queue the open sessions' replay; False when the
        error is not a lost actor, or the retries are spent, or the new gang cannot start."""
        lost = getattr(error, "lost", ())
        if not lost:
            return False
        start = time.monotonic()
        self.session.close()
        while True:
            if self.recoveries >= self.max_recoveries:
                error.add_note(f"gave up after {self.recoveries} recoveries (max_recoveries)")
                return False
            self.recoveries += 1
            try:
                self.session = RaySession(self.config, self.spec, actor_class=GangWorker).start()
                if tuple(self.session.agree("pool_pages")) != (self.pool_pages, self.page_size):
                    raise ClusterError("the replacement actors have another KV pool size; the gang cannot resume")
                break
            except HogwildError as err:  # the new gang did not start: try again while attempts are left
                self.session.close()
                error.add_note(f"recovery {self.recoveries} failed: {err}")
        self._replay = [self._submits[sid] for sid in self.open if sid in self._submits]
        self._replay += [("cancel", sid) for sid in self.open if sid in self._cancelled]
        self._skip = dict(self._delivered)
        seconds = time.monotonic() - start
        ranks = " and ".join(map(str, lost))
        message = (f"worker actor{'s' if len(lost) > 1 else ''} {ranks} lost; recovered in {seconds:.1f} s "
                   f"(attempt {self.recoveries} of {self.max_recoveries}; the sessions replay to where they were)")
        for handle in self.open.values():
            handle._emit(Recovered(tuple(lost), round(seconds, 3), self.recoveries, message))
        return True

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
