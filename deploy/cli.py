"""The ``hogwild`` console script: ``cluster.cli`` plus the commands of this layer (``serve``).

``hogwild serve [--model default] [--host 127.0.0.1] [--port 8000] [--workers 2] ...`` starts a
local Ray (explicit CPUs), runs the Serve application of ``deploy.serve_app`` on it, prints the URL
and serves until Ctrl-C.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

from cache_service.errors import ConfigError
from cluster.cli import Command, main as cluster_main
from cluster.protocol import MAX_WORKERS

SERVE_APP = "hogwild"


def _add_serve(commands) -> None:
    p = commands.add_parser("serve", help="serve the OpenAI-compatible HTTP API and the live page on Ray Serve")
    p.add_argument("--model", default="default", help="'default' (SmolLM2-135M-Instruct) or a model path")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1)")
    p.add_argument("--port", type=int, default=8000, help="port to listen on (default 8000)")
    p.add_argument("--workers", type=int, default=2, help="workers per session when a request does not say")
    p.add_argument("--max-workers", type=int, default=MAX_WORKERS, help="most workers a request may ask for")
    p.add_argument("--max-steps", type=int, default=256, help="default decode-step budget per session")
    p.add_argument("--max-waiting", type=int, default=64, help="sessions queued per replica before 429")
    p.add_argument("--kv-tokens", type=int, default=None, help="KV pool size in tokens (default: the device's)")
    p.add_argument("--actors", type=int, default=0, help="worker actors per replica (0: one engine in the replica)")
    p.add_argument("--replicas", type=int, default=1, help="Serve replicas (each loads the model)")
    p.add_argument("--max-ongoing-requests", type=int, default=64, help="concurrent requests per replica")
    p.add_argument("--num-cpus", type=int, default=None, help="CPUs of the local Ray (default: this machine's)")
    p.add_argument("--threads", type=int, default=None, help="torch threads per replica")
    p.add_argument("--api-key", default=None, help="require 'Authorization: Bearer KEY' (default: $HOGWILD_API_KEY)")
    p.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help=argparse.SUPPRESS)


def _serve(args: argparse.Namespace) -> int:
    from deploy.config import ServeConfig

    if not 0 < args.port < 65536:
        raise ConfigError(f"--port must be in 1..65535, got {args.port}")
    for name in ("replicas", "max_ongoing_requests"):
        if getattr(args, name) < 1:
            raise ConfigError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    config = ServeConfig(model=args.model, workers=args.workers, max_workers=args.max_workers,
                         max_steps=args.max_steps, max_steps_limit=max(args.max_steps, 4096),
                         max_waiting=args.max_waiting, kv_tokens=args.kv_tokens, actors=args.actors,
                         threads=args.threads, api_key=args.api_key)
    url = start(config, host=args.host, port=args.port, replicas=args.replicas,
                max_ongoing_requests=args.max_ongoing_requests, num_cpus=args.num_cpus)
    print(f"hogwild: serving {config.model} at {url}  (OpenAI API at {url}v1, Ctrl-C to stop)", flush=True)
    try:
        wait_for_interrupt()
    except KeyboardInterrupt:
        print("hogwild: stopping", file=sys.stderr)
    finally:
        stop()
    return 0


def wait_for_interrupt(poll_s: float = 0.5) -> None:
    """Block until Ctrl-C raises ``KeyboardInterrupt``. In short sleeps: the kernel may hand SIGINT
    to one of Ray's threads, which only flags it for the main thread, and a sleeping main thread
    sees the flag when its sleep ends (one long sleep missed it: a serve that ignored Ctrl-C)."""
    while True:
        time.sleep(poll_s)


def start(config, *, host: str = "127.0.0.1", port: int = 8000, replicas: int = 1,
          max_ongoing_requests: int = 64, num_cpus: int | None = None) -> str:
    """Start a local Ray (unless one is connected) and Serve on ``host:port``; deploy the app; its URL."""
    import ray
    from ray import serve

    from deploy.serve_app import HogwildDeployment, deployment_options

    if not ray.is_initialized():
        cpus = num_cpus or max(os.cpu_count() or 1, 2 + config.actors)
        ray.init(address="local", num_cpus=cpus, include_dashboard=False, log_to_driver=False,
                 logging_level="WARNING")
    serve.start(http_options={"host": host, "port": port}, logging_config={"log_level": "WARNING"})
    options = {**deployment_options(config), "num_replicas": replicas, "max_ongoing_requests": max_ongoing_requests}
    serve.run(HogwildDeployment.options(**options).bind(config), name=SERVE_APP, route_prefix="/")
    shown = "127.0.0.1" if host in ("0.0.0.0", "::") else host
    return f"http://{shown}:{port}/"


def stop() -> None:
    """Shut Serve and the local Ray down."""
    import ray
    from ray import serve

    serve.shutdown()
    ray.shutdown()


COMMANDS: dict[str, Command] = {"serve": (_add_serve, _serve)}


def main(argv: list[str] | None = None) -> int:
    return cluster_main(argv, COMMANDS)


if __name__ == "__main__":
    sys.exit(main())
