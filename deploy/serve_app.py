"""The Ray Serve application: one deployment that owns the model (or a gang of worker actors) and
one session host per replica, with the FastAPI app of ``deploy.app`` as its ingress.

    serve run deploy/serve.yaml                      # or: hogwild serve
    app = build_app({"model": "default", "workers": 2})   # the import path the YAML names

Replicas, ``max_ongoing_requests`` and autoscaling are Serve's deployment options (in the YAML or
``.options``); the model, workers per session and limits are the ``args`` (``ServeConfig``). With
``actors`` >= 1 each replica reserves one placement group bundle per worker actor (Serve's
``placement_group_bundles``) and starts its gang inside it (``deploy.gang``).
"""

from __future__ import annotations

from typing import Any

import ray
from ray import serve
from ray.serve import Application

from deploy.app import create_app
from deploy.backend import ServeBackend, gang_backend, local_backend
from deploy.config import ServeConfig
from deploy.gang import REPLICA_CPUS, gang_bundles

MAX_ONGOING_REQUESTS = 64  # streams per replica (sessions beyond what fits the pool queue in the host)


@serve.deployment(name="hogwild", max_ongoing_requests=MAX_ONGOING_REQUESTS, ray_actor_options={"num_cpus": 1},
                  health_check_period_s=10, graceful_shutdown_timeout_s=5)
@serve.ingress()
class HogwildDeployment:
    """A replica: the model and a started session host; its HTTP app is built over them."""

    def __init__(self, config: ServeConfig | dict[str, Any] | None = None) -> None:
        self.config = config if isinstance(config, ServeConfig) else ServeConfig.from_args(config)
        if self.config.actors:
            self.backend: ServeBackend = gang_backend(self.config, ray.util.get_current_placement_group())
        else:
            self.backend = local_backend(self.config)

    def __serve_build_asgi_app__(self):
        # Serve cancels the request of a client that left (the stream's generator is closed and its
        # session cancelled); polling the request's receive channel as well is not needed here
        return create_app(self.backend, watch_disconnect=False)

    def check_health(self) -> None:
        if not self.backend.alive:
            raise RuntimeError("the session host is closed (its gang failed); the replica must be replaced")

    def __del__(self) -> None:
        backend = getattr(self, "backend", None)
        if backend is not None:
            backend.close()


def deployment_options(config: ServeConfig, device: str = "cpu") -> dict[str, Any]:
    """Serve options the config implies: a gang's placement group bundles."""
    if not config.actors:
        return {}
    return {"placement_group_bundles": gang_bundles(config, device), "placement_group_strategy": "PACK",
            "ray_actor_options": {"num_cpus": REPLICA_CPUS}}


def build_app(args: dict[str, Any] | None = None) -> Application:
    """The application a Serve config's ``import_path`` names (``deploy.serve_app:build_app``)."""
    config = ServeConfig.from_args(args)
    device = config.device
    if device == "auto":
        device = "cuda" if ray.is_initialized() and ray.cluster_resources().get("GPU", 0) >= 1 else "cpu"
    return HogwildDeployment.options(**deployment_options(config, device)).bind(config)
