"""A gang of worker actors for a Serve replica, started inside the replica's placement group.

Serve reserves a multi-device replica's resources with ``placement_group_bundles`` (one group per
replica, the replica itself in bundle 0). ``gang_bundles`` is what the deployment asks for: the
replica's bundle, one bundle per worker actor, and the cache service's. ``start_gang`` starts a
``cluster.gang.GangHost`` whose actors take bundles 1..actors and whose cache service takes the
last, instead of reserving a second placement group; outside Serve (no group) the gang reserves
its own as usual.
"""

from __future__ import annotations

from typing import Any

from ray.util.placement_group import PlacementGroup
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

from cache_service.errors import ConfigError
from cache_service.kv_store import PoolConfig
from cluster.gang import ROUNDS_PER_CALL, GangHost, GangWorker
from cluster.host import RoundHost
from cluster.ray_session import SERVICE_CPUS, RayConfig, RaySession
from workers.actor import EngineSpec, ModelSpec
from deploy.config import ServeConfig

REPLICA_CPUS = 1.0  # the replica's own bundle: HTTP handling and the gang's driver


def gang_bundles(config: ServeConfig, device: str) -> list[dict[str, float]]:
    """The replica's bundle, one per worker actor (a GPU each on CUDA), the cache service's."""
    worker = {"GPU": 1.0} if device == "cuda" else {"CPU": 1.0}
    return [{"CPU": REPLICA_CPUS}] + [dict(worker) for _ in range(config.actors)] + [{"CPU": SERVICE_CPUS}]


class _GroupSession(RaySession):
    """A ``RaySession`` in a placement group reserved by someone else (Serve): bundle 0 is theirs,
    the actors take 1..actors, the cache service the next; the group is left to its owner."""

    def __init__(self, config: RayConfig, spec: EngineSpec, group: PlacementGroup, **options: Any) -> None:
        super().__init__(config, spec, **options)
        self.given = group

    def _reserve(self, device: str) -> None:
        need = self.config.actors + 2
        if len(self.given.bundle_specs) < need:
            raise ConfigError(f"the replica's placement group has {len(self.given.bundle_specs)} bundles, a gang of "
                              f"{self.config.actors} actors needs {need} (see deploy.gang.gang_bundles)")
        self.group = self.given

    def _bundle(self, index: int) -> PlacementGroupSchedulingStrategy:
        return PlacementGroupSchedulingStrategy(placement_group=self.group, placement_group_bundle_index=index + 1)

    def close(self) -> None:
        self.group = None  # Serve removes its group with the replica
        super().close()


class _GroupGangHost(GangHost):
    """``GangHost`` over a ``_GroupSession``. ``GangHost.__init__`` reserves a group of its own and
    has no hook for the session it starts, so its body is mirrored here (keep in step with it; the
    Serve end-to-end test runs this path). No recovery in place (``GangHost`` would start a plain
    ``RaySession`` with a group of its own): a lost actor ends the open sessions with the error and
    closes the host, the replica's health check fails and Serve replaces the replica."""

    def __init__(self, config: RayConfig, spec: EngineSpec, group: PlacementGroup, *, max_waiting: int) -> None:
        RoundHost.__init__(self, max_waiting)
        self.config, self.spec = config, spec
        self.rounds_per_call, self.max_recoveries = ROUNDS_PER_CALL, 0
        self.session = _GroupSession(config, spec, group, actor_class=GangWorker).start()
        self.pool_pages, self.page_size = self.session.agree("pool_pages")
        self.open = {}
        self.remote_waiting = 0
        self.recoveries = 0
        self._submits, self._cancelled, self._delivered, self._skip, self._replay = {}, set(), {}, {}, []


def start_gang(config: ServeConfig, group: PlacementGroup | None = None) -> RoundHost:
    """A started gang host of ``config.actors`` actors, in ``group`` when given."""
    if config.actors < 1:
        raise ConfigError("a gang needs actors >= 1")
    ray_config = RayConfig((1,) * config.actors, device=config.device, threads=config.threads or 1)
    spec = EngineSpec(ModelSpec(config.model), pool=PoolConfig(tokens=config.kv_tokens, page_size=config.kv_page_size))
    if group is None:
        return GangHost(ray_config, spec, max_waiting=config.max_waiting).start()
    return _GroupGangHost(ray_config, spec, group, max_waiting=config.max_waiting).start()
