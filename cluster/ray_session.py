"""A session on a Ray cluster: placement group, worker actors, CacheService, rendezvous, teardown.

    with RaySession(RayConfig.split(workers=3, actors=2), spec) as session:
        for event in session.events(program):   # every actor runs the program in lockstep
            ...

One placement group per session: a bundle per worker actor (``GPU: 1`` when the session runs on
CUDA, else ``CPU``) plus a small CPU bundle for the CacheService; PACK by default, SPREAD for
multi-node. Resources are checked before anything starts, start-up waits have timeouts, collectives
time out after ``collective_timeout_s``, and a failure (an actor that dies, ranks that cannot meet,
an error raised in an actor) ends the session with an error naming the actor, after every actor and
the placement group are removed.
``cluster.gang`` runs many sessions on one long-lived set of these actors.
"""

from __future__ import annotations

import math
import os
import re
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import ray
from ray.exceptions import GetTimeoutError, RayActorError, RayError, RayTaskError
from ray.util.placement_group import PlacementGroup, placement_group, remove_placement_group
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

from cache_service.errors import ConfigError, HogwildError
from cache_service.service import CacheService
from cache_service.snapshot import read_file, write_file
from cluster.ray_connect import ClusterError, check_address
from workers.actor import EngineSpec, Program, WorkerActor
from workers.distributed import Placement
from workers.exchange import RendezvousError

STRATEGIES = ("PACK", "SPREAD", "STRICT_PACK", "STRICT_SPREAD")
DEVICES = ("auto", "cpu", "cuda")
SERVICE_CPUS = 0.1
FAILURE_GRACE_S = 3.0  # after a failure, how long to wait for the other actors' errors
SALVAGE_S = 10.0  # after a failure, how long to wait for the CacheService's last checkpoint


class ResourcesError(ClusterError):
    """The cluster lacks (or cannot free) the CPUs/GPUs a session asks for."""


class ActorFailedError(ClusterError):
    """A worker actor died or raised; the session was torn down. ``lost``: the ranks whose actor
    died (empty when an actor raised: replacing actors would not help)."""

    lost: tuple[int, ...] = ()


@dataclass(frozen=True)
class RayConfig:
    """Where a session runs: workers per actor (rank order), placement strategy, device, timeouts.
    ``address``: a Ray cluster (None: ``RAY_ADDRESS`` if set, else a local Ray with ``num_cpus``)."""

    workers_per_actor: tuple[int, ...]
    strategy: str = "PACK"
    device: str = "auto"
    address: str | None = None
    num_cpus: int | None = None
    cpus_per_actor: float = 1.0
    threads: int = 1
    start_timeout_s: float = 120.0
    rendezvous_timeout_s: float = 60.0
    collective_timeout_s: float = 600.0  # longest wait inside a collective (e.g. peers of a long prefill)
    chunk_s: float = 0.2

    def __post_init__(self) -> None:
        object.__setattr__(self, "workers_per_actor", tuple(int(n) for n in self.workers_per_actor))
        Placement(self.workers_per_actor, 0)  # validates the counts
        if self.strategy not in STRATEGIES:
            raise ConfigError(f"unknown placement strategy {self.strategy!r}; use one of {', '.join(STRATEGIES)}")
        if self.device not in DEVICES:
            raise ConfigError(f"unknown device {self.device!r}; use one of {', '.join(DEVICES)}")
        for name in ("cpus_per_actor", "start_timeout_s", "rendezvous_timeout_s", "collective_timeout_s", "chunk_s"):
            if not getattr(self, name) > 0:
                raise ConfigError(f"{name} must be > 0, got {getattr(self, name)}")

    @classmethod
    def split(cls, workers: int, actors: int, **options: Any) -> "RayConfig":
        """``workers`` over ``actors`` as evenly as possible, the first actors taking one more."""
        if not 1 <= actors <= workers:
            raise ConfigError(f"actors must be between 1 and the number of workers ({workers}), got {actors}")
        base, extra = divmod(workers, actors)
        return cls(tuple(base + (rank < extra) for rank in range(actors)), **options)

    @property
    def actors(self) -> int:
        return len(self.workers_per_actor)


# ---- cluster checks ------------------------------------------------------------------------------
def connect(config: RayConfig) -> bool:
    """Connect to Ray (or start a local one); True when this call started it."""
    if ray.is_initialized():
        return False
    address = config.address or os.environ.get("RAY_ADDRESS")
    if address:
        source = "--ray-address" if config.address else "RAY_ADDRESS"
        check_address(address, source)  # unreachable, or a token the cluster refuses: one line, in seconds
        try:
            ray.init(address=address, log_to_driver=False, logging_level="WARNING")
        except (ConnectionError, RuntimeError, RayError) as err:
            reason = str(err).strip().splitlines()[0][:300] if str(err).strip() else type(err).__name__
            raise ClusterError(f"could not join the Ray cluster at {address} (from {source}): {reason}; "
                               "check the address and that this client's Ray matches the cluster's") from None
    else:  # a local Ray fits the session even on a machine with fewer cores than actors
        wanted = math.ceil(config.actors * config.cpus_per_actor + SERVICE_CPUS)
        ray.init(address="local", num_cpus=config.num_cpus or max(os.cpu_count() or 1, wanted),
                 include_dashboard=False, log_to_driver=False, logging_level="WARNING")
    return True


def resolve_device(config: RayConfig) -> str:
    """``cuda`` when asked, or when ``auto`` and the cluster has GPUs; else ``cpu``."""
    if config.device != "auto":
        return config.device
    return "cuda" if ray.cluster_resources().get("GPU", 0) >= 1 else "cpu"


def bundles(config: RayConfig, device: str) -> list[dict[str, float]]:
    """One bundle per worker actor, then the CacheService's."""
    worker = {"GPU": 1.0} if device == "cuda" else {"CPU": config.cpus_per_actor}
    return [dict(worker) for _ in range(config.actors)] + [{"CPU": SERVICE_CPUS}]


def check_resources(wanted: list[dict[str, float]]) -> None:
    """Raise ``ResourcesError`` naming what the cluster lacks in total (before anything waits)."""
    total = ray.cluster_resources()
    need: dict[str, float] = {}
    for bundle in wanted:
        for name, amount in bundle.items():
            need[name] = need.get(name, 0.0) + amount
    missing = [f"{amount:g} {name} (the cluster has {total.get(name, 0):g})"
               for name, amount in need.items() if total.get(name, 0) + 1e-9 < amount]
    if missing:
        raise ResourcesError(
            f"the session needs {', '.join(missing)}: {len(wanted) - 1} worker actors plus "
            f"{SERVICE_CPUS} CPU for the cache service; use fewer actors (--actors) or add nodes"
        )


# ---- the session ---------------------------------------------------------------------------------
class RaySession:
    """Actors of one session; use as a context manager (``close`` tears everything down)."""

    def __init__(self, config: RayConfig, spec: EngineSpec, *, snapshot: str | Path | None = None,
                 actor_class: type = WorkerActor, salvage: bool = False,
                 group: PlacementGroup | None = None) -> None:
        self.config, self.spec, self.snapshot = config, spec, snapshot
        # a group reserved by its owner (e.g. a Serve replica's): the session takes its last
        # actors + 1 bundles (the actors', then the service's) and leaves the group to the owner
        self.given, self._first_bundle = group, 0
        self.actor_class = actor_class
        self.salvage = salvage  # on a failure, keep the CacheService's last checkpoint (``salvaged``)
        self.salvaged: bytes | None = None
        self.actors: list[Any] = []
        self.service: Any = None
        self.identities: list[dict] = []
        self.group: PlacementGroup | None = None
        self._owns_ray = False

    def __enter__(self) -> "RaySession":
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.close()

    def start(self) -> "RaySession":
        """Reserve resources, start and connect the actors (and restore a snapshot); torn down on error."""
        try:
            self._owns_ray = connect(self.config)
            device = resolve_device(self.config)
            self._reserve(device)
            self._spawn(device)
            self._rendezvous()
            if self.snapshot is not None:
                self.restore(self.snapshot)
        except BaseException:
            self.close()
            raise
        return self

    def _reserve(self, device: str) -> None:
        if self.given is not None:
            have, need = len(self.given.bundle_specs), self.config.actors + 1
            if have < need:
                raise ConfigError(f"the given placement group has {have} bundles; {self.config.actors} worker "
                                  f"actors and the cache service need {need} (one per actor, then the service's)")
            self.group, self._first_bundle = self.given, have - need
            return
        wanted = bundles(self.config, device)
        check_resources(wanted)
        self.group = placement_group(wanted, strategy=self.config.strategy)
        try:
            ray.get(self.group.ready(), timeout=self.config.start_timeout_s)
        except GetTimeoutError:
            raise ResourcesError(
                f"the placement group {wanted} ({self.config.strategy}) was not ready within "
                f"{self.config.start_timeout_s:.0f}s: the cluster has the resources but they are in use "
                f"(available now: {_resources(ray.available_resources())}), or no single node fits a STRICT "
                "strategy; free them or use fewer actors"
            ) from None

    def _spawn(self, device: str) -> None:
        self.service = self._new_service()
        resources = {"num_gpus": 1, "num_cpus": 0} if device == "cuda" else {"num_cpus": self.config.cpus_per_actor}
        worker_cls = ray.remote(self.actor_class)
        for rank in range(self.config.actors):
            placement = Placement(self.config.workers_per_actor, rank)
            actor = worker_cls.options(max_restarts=0, scheduling_strategy=self._bundle(rank), **resources)
            self.actors.append(actor.remote(self.spec, placement, device, self.config.threads))
        try:
            self.identities = self._gather([a.identity.remote() for a in self.actors],
                                           self.config.start_timeout_s, "start")
            ray.get(self.service.ping.remote(), timeout=self.config.start_timeout_s)
        except GetTimeoutError:
            raise ClusterError(f"the actors did not start within {self.config.start_timeout_s:.0f}s (loading "
                               "the model on every actor); raise start_timeout_s or check the nodes") from None
        if device == "cuda":
            check_one_rank_per_gpu(self.identities)

    def _rendezvous(self) -> None:
        timeout, address = self.config.rendezvous_timeout_s, "?"
        try:
            address = self._gather([self.actors[0].pick_address.remote()], timeout, "rendezvous")[0]
            refs = [a.connect.remote(address, self.config.collective_timeout_s, self.service) for a in self.actors]
            self._gather(refs, timeout, "rendezvous")
        except GetTimeoutError:
            raise RendezvousError(
                f"the {self.config.actors} worker actors did not meet at tcp://{address} within {timeout:.0f}s; "
                "check that every node reaches that address and port"
            ) from None

    def restore(self, path: str | Path, mode: str | None = None) -> None:
        """Rebuild every actor's cache (and the service's) from a snapshot file (optionally in
        another mode): resuming a saved session, or recovering after actors were replaced."""
        ref = ray.put(read_file(path))
        self._ask_service("load", ref)
        self.call("reset", mode, ref)

    def _new_service(self) -> Any:
        service_cls = ray.remote(CacheService).options(
            num_cpus=SERVICE_CPUS, scheduling_strategy=self._bundle(self.config.actors))
        return service_cls.remote()

    def replace_service(self) -> None:
        """A new, empty CacheService in the old one's bundle (the old one was lost, or is killed now)."""
        try:
            ray.kill(self.service, no_restart=True)
        except (RayError, ValueError):
            pass  # already gone
        self.service = self._new_service()
        try:
            ray.get(self.service.ping.remote(), timeout=self.config.start_timeout_s)
        except GetTimeoutError:
            raise ClusterError(f"a new cache service did not start within {self.config.start_timeout_s:.0f}s; "
                               "check the node of the session's placement group") from None

    def configure_service(self, path: str | None, every_s: float) -> None:
        """Have the CacheService write its checkpoints to ``path`` (see ``CacheService.configure``)."""
        self.ask_service("configure", path, every_s)

    def ask_service(self, method: str, *args: Any) -> Any:
        """A CacheService call (waits up to ``start_timeout_s``); its own errors raised as themselves."""
        return self._ask_service(method, *args)

    def _salvage(self) -> None:
        """Keep the CacheService's last checkpoint before the session is torn down after a failure."""
        if not self.salvage or self.service is None:
            return
        try:
            self.salvaged = ray.get(self.service.checkpoint_blob.remote(), timeout=SALVAGE_S)
        except RayError:
            self.salvaged = None

    def _ask_service(self, method: str, *args: Any) -> Any:
        """A CacheService call; its own errors (e.g. a bad snapshot) are raised as themselves."""
        try:
            return ray.get(getattr(self.service, method).remote(*args), timeout=self.config.start_timeout_s)
        except RayTaskError as err:
            if isinstance(err.cause, HogwildError):
                raise err.cause from None
            raise

    def _bundle(self, index: int) -> PlacementGroupSchedulingStrategy:
        return PlacementGroupSchedulingStrategy(placement_group=self.group,
                                                placement_group_bundle_index=self._first_bundle + index)

    # ---- lockstep calls ----------------------------------------------------------------------
    def call(self, method: str, *args: Any, timeout_s: float | None = None, **kwargs: Any) -> list:
        """Call ``method`` on every actor with the same arguments; results in rank order."""
        if not self.actors:
            raise ClusterError("the Ray session is not running (not started, closed, or stopped by a failure); "
                               "start a new one")
        refs = [getattr(a, method).remote(*args, **kwargs) for a in self.actors]
        return self._gather(refs, timeout_s, method)

    def agree(self, method: str, *args: Any, **kwargs: Any) -> Any:
        """``call`` for methods every actor must answer alike (block ids, tokens): the answer."""
        results = self.call(method, *args, **kwargs)
        if any(r != results[0] for r in results[1:]):
            raise ClusterError(f"the actors disagree on {method}: {results}; they are out of lockstep")
        return results[0]

    def forward(self, rows: Sequence, workers: Sequence[int], all_logits: bool = False) -> dict:
        """Teacher-forced step on every actor; logits of every row, by worker."""
        merged: dict = {}
        for part in self.call("forward", rows, workers, all_logits):
            merged.update(part)
        return merged

    def events(self, program: Program) -> Iterator[Any]:
        """Run ``program`` on every actor; rank 0's events as they stream back in chunks."""
        generators = {a.run.remote(program, self.config.chunk_s): rank for rank, a in enumerate(self.actors)}
        while generators:
            ready, _ = ray.wait(list(generators), num_returns=1, timeout=1.0)
            for generator in ready:
                others = {g: r for g, r in generators.items() if g is not generator}
                chunk = self._next_chunk(generator, generators[generator], others)
                if chunk is None:
                    del generators[generator]
                else:
                    yield from chunk

    def _next_chunk(self, generator: Any, rank: int, others: dict) -> list | None:
        """The next chunk a rank streamed, or None when its run ended."""
        try:
            return self._get(next(generator), rank, others, "run")
        except StopIteration:
            return None
        except RayError as err:
            raise self._failure({rank: err, **self._other_errors(others)}, "run")

    def save(self, path: str | Path, meta: dict | None = None) -> Path:
        """Snapshot the cache (between calls): the service's mirrored blocks + rank 0's live ones."""
        state = self._gather([self.actors[0].live_state.remote()], None, "save")[0]
        info = {"model": self._model_name(), "mode": state["mode"],
                "workers_per_actor": list(self.config.workers_per_actor), **(meta or {})}
        blob = self._ask_service("snapshot", state["live"], state["spans"], state["next_block"], info)
        return write_file(path, blob)

    def exchange_stats(self, reset: bool = False) -> list[dict]:
        return self.call("exchange_stats", reset)

    def close(self) -> None:
        """Kill the actors and the service, remove the placement group (and a Ray started here)."""
        for actor in [*self.actors, self.service]:
            if actor is not None:
                try:
                    ray.kill(actor, no_restart=True)
                except (RayError, ValueError):
                    pass  # already gone
        self.actors, self.service = [], None
        if self.group is not None and self.group is not self.given:
            remove_placement_group(self.group)
        self.group = None
        if self._owns_ray:
            ray.shutdown()
            self._owns_ray = False

    # ---- results and failures ----------------------------------------------------------------
    def _gather(self, refs: list, timeout_s: float | None, what: str) -> list:
        """Results of one ref per rank; the first failure is diagnosed across all ranks."""
        rank_of = {ref: rank for rank, ref in enumerate(refs)}
        deadline = None if timeout_s is None else time.monotonic() + timeout_s
        pending = list(refs)
        while pending:
            left = None if deadline is None else max(0.0, deadline - time.monotonic())
            ready, pending = ray.wait(pending, num_returns=1, timeout=left)
            if not ready:
                raise GetTimeoutError(f"{what} did not finish within {timeout_s}s")
            self._get(ready[0], rank_of[ready[0]], {r: rank_of[r] for r in pending}, what)
        return ray.get(refs)

    def _get(self, ref: Any, rank: int, others: dict, what: str) -> Any:
        try:
            return ray.get(ref)
        except RayError as err:
            raise self._failure({rank: err, **self._other_errors(others)}, what)

    @staticmethod
    def _other_errors(others: dict) -> dict[int, RayError]:
        """Errors of the other ranks' calls that arrive within a short grace period."""
        errors: dict[int, RayError] = {}
        if not others:
            return errors
        ready, _ = ray.wait(list(others), num_returns=len(others), timeout=FAILURE_GRACE_S)
        for waitable in ready:
            try:
                ray.get(next(waitable) if not isinstance(waitable, ray.ObjectRef) else waitable)
            except StopIteration:
                pass
            except RayError as err:
                errors[others[waitable]] = err
        return errors

    def _failure(self, errors: dict[int, RayError], what: str) -> HogwildError:
        """The error to raise for failed ranks. A HogwildError every rank raised (a bad request,
        refused alike everywhere) leaves the session usable; anything else tears it down first.
        Nothing is dropped: the message names every failed rank's reason, and the first rank's
        underlying exception is the error's ``__cause__``."""
        causes = {r: e.cause if isinstance(e, RayTaskError) else None for r, e in errors.items()}
        if len(errors) == len(self.actors) and all(isinstance(c, HogwildError) for c in causes.values()):
            return causes[min(causes)]
        self._salvage()
        self.close()
        dead = {r: e for r, e in errors.items() if isinstance(e, RayActorError)}
        failed = {r: e for r, e in errors.items() if r not in dead}
        first = min(dead or failed)
        if dead:
            by_reason: dict[str, list[int]] = {}
            for r, e in sorted(dead.items()):
                by_reason.setdefault(_reason(e), []).append(r)
            text = "; ".join(f"{' and '.join(map(self._describe, ranks))} died during {what}: {reason}"
                             for reason, ranks in by_reason.items())
            error: HogwildError = ActorFailedError(f"{text}{self._also(failed)}; the session was stopped and its "
                                                   "actors removed, start it again")
            error.lost = tuple(sorted(dead))
        elif isinstance(causes[first], HogwildError):
            error = causes[first]
            if len(failed) > 1:
                error.add_note(f"also{self._also(failed, skip=first)[1:]}")
        else:
            error = ActorFailedError(f"{self._describe(first)} failed during {what}: {_reason(errors[first])}"
                                     f"{self._also(failed, skip=first)}; the session was stopped and its actors removed")
        if error is not causes[first] and error.__cause__ is None:
            error.__cause__ = causes[first] or errors[first]
        return error

    @staticmethod
    def _also(failed: dict[int, RayError], skip: int | None = None) -> str:
        """``; rank 1 then failed: ...`` for the other ranks' errors (the cause of each kept)."""
        return "".join(f"; rank {r} also failed: {_reason(e)}" for r, e in sorted(failed.items()) if r != skip)

    def _describe(self, rank: int) -> str:
        ident = self.identities[rank] if rank < len(self.identities) else {}
        where = f", node {ident['node']}, pid {ident['pid']}" if ident else ""
        workers = list(Placement(self.config.workers_per_actor, rank).workers)
        return f"worker actor rank {rank} (workers {workers}{where})"

    def _model_name(self) -> str:
        source = self.spec.model.source
        return source if isinstance(source, str) else f"random-{source.model_type}"


def _resources(resources: dict[str, float]) -> str:
    return ", ".join(f"{v:g} {k}" for k, v in sorted(resources.items()) if k in ("CPU", "GPU")) or "none"


def _reason(err: BaseException) -> str:
    """The most telling line of a Ray error (for an actor whose ``__init__`` raised: that error)."""
    cause = getattr(err, "cause", None)
    if isinstance(cause, BaseException):
        return f"{type(cause).__name__}: {str(cause).strip().splitlines()[-1][:300] if str(cause).strip() else ''}"
    lines = [line.strip() for line in str(err).splitlines() if line.strip()]
    if getattr(err, "actor_init_failed", False):  # the creation task's traceback ends with its exception
        raised = [line for line in lines if re.match(r"^[\w.]+(Error|Exception): ", line)]
        if raised:
            name, _, message = raised[-1].partition(": ")
            return f"{name.rsplit('.', 1)[-1]} while starting: {message}"[:300].rstrip(".")
    telling = [line for line in lines if "actor is dead" in line or "Error" in line]
    return (telling or lines or [type(err).__name__])[-1][:300].rstrip(".")


def check_one_rank_per_gpu(identities: list[dict]) -> None:
    """NCCL cannot run two ranks on one GPU: refuse a placement that shares one."""
    seen: dict[tuple, int] = {}
    for ident in identities:
        for gpu in ident["gpus"] or ["none"]:
            key = (ident["node"], gpu)
            if key in seen:
                raise ClusterError(f"worker actor ranks {seen[key]} and {ident['rank']} share GPU {gpu} on node "
                                   f"{ident['node']}; NCCL needs one GPU per rank: give each actor a GPU")
            seen[key] = ident["rank"]


# ---- running programs ----------------------------------------------------------------------------
def run_program(program: Program, spec: EngineSpec, config: RayConfig) -> Iterator[Any]:
    """Start a session, stream the program's events, tear down (also when the caller stops early)."""
    with RaySession(config, spec) as session:
        yield from session.events(program)
