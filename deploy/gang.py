"""A gang of worker actors for a Serve replica, started inside the replica's placement group.

Serve reserves a multi-device replica's resources with ``placement_group_bundles`` (one group per
replica, the replica itself in bundle 0). ``gang_bundles`` is what the deployment asks for: the
replica's bundle, one bundle per worker actor, and the cache service's. ``start_gang`` starts a
``cluster.gang.GangHost`` in that group (``group=``: its actors take bundles 1..actors, its cache
service the last; the group stays Serve's) instead of reserving a second placement group; a lost
actor is replaced in the same bundles. Outside Serve (no group) the gang reserves its own as usual.
"""

from __future__ import annotations

from ray.util.placement_group import PlacementGroup

from cache_service.errors import ConfigError
from cache_service.kv_store import PoolConfig
from cluster.gang import GangHost
from cluster.host import RoundHost
from cluster.ray_session import SERVICE_CPUS, RayConfig
from workers.actor import EngineSpec, ModelSpec
from deploy.config import ServeConfig

REPLICA_CPUS = 1.0  # the replica's own bundle: HTTP handling and the gang's driver


def gang_bundles(config: ServeConfig, device: str) -> list[dict[str, float]]:
    """The replica's bundle, one per worker actor (a GPU each on CUDA), the cache service's."""
    worker = {"GPU": 1.0} if device == "cuda" else {"CPU": 1.0}
    return [{"CPU": REPLICA_CPUS}] + [dict(worker) for _ in range(config.actors)] + [{"CPU": SERVICE_CPUS}]


def start_gang(config: ServeConfig, group: PlacementGroup | None = None) -> RoundHost:
    """A started gang host of ``config.actors`` actors, in ``group`` when given."""
    if config.actors < 1:
        raise ConfigError("a gang needs actors >= 1")
    ray_config = RayConfig((1,) * config.actors, device=config.device, threads=config.threads or 1)
    spec = EngineSpec(ModelSpec(config.model), pool=PoolConfig(tokens=config.kv_tokens, page_size=config.kv_page_size))
    if group is not None and len(group.bundle_specs) != config.actors + 2:
        raise ConfigError(f"the replica's placement group has {len(group.bundle_specs)} bundles, a gang of "
                          f"{config.actors} actors needs {config.actors + 2} (see deploy.gang.gang_bundles)")
    return GangHost(ray_config, spec, max_waiting=config.max_waiting, group=group).start()
