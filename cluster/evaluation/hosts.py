"""Where problems run: one session host in this process, one per device on a Ray cluster, or one
per gang of worker actors on a Ray cluster.

``EvalWorker`` owns a model, an engine and a started ``SessionHost``; ``run`` solves one
(problem, method) and may be called from many threads at once, so that many sessions share each
forward. ``LocalExecutor`` runs items on one worker with a thread per item in flight;
``RayExecutor`` starts one ``EvalWorker`` actor per device (GPU, else CPU slot) and keeps
``concurrency`` items in flight on each. ``GangExecutor`` runs ``cluster.gang.GangHost`` hosts
from this process, each on a gang of N worker actors (a session's workers spread over its gang).
All yield result lines as they finish.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Iterator, Sequence
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from typing import Any

from cache_service.errors import ConfigError, HogwildError
from cache_service.kv_store import PoolConfig
from cluster.codec import codec_for
from cluster.evaluation.data import Problem
from cluster.evaluation.methods import EvalSettings, Method, run_problem
from cluster.host import SessionHost

Item = tuple[Problem, Method]


class EvalWorker:
    """A model on one device with a session host running many sessions at once."""

    def __init__(self, settings: EvalSettings) -> None:
        from cluster.session import open_model
        from workers.engine import HogwildEngine

        self.settings = settings
        lm = open_model(settings.model)
        self.codec = codec_for(lm.tokenizer, lm.config.vocab_size)
        self.max_context = lm.max_context
        self.host = SessionHost(HogwildEngine(lm, pool=PoolConfig(tokens=settings.kv_tokens))).start()

    def run(self, problem: Problem, method: Method) -> dict[str, Any]:
        return run_problem(self.host, self.codec, self.max_context, problem, method, self.settings)

    def close(self) -> None:
        self.host.close()


class LocalExecutor:
    """All items on one ``EvalWorker`` in this process."""

    def __init__(self, settings: EvalSettings, concurrency: int) -> None:
        self.worker = EvalWorker(settings)
        self.concurrency = concurrency
        self.where = f"1 session host in this process, {concurrency} problems in flight"

    def run(self, items: Sequence[Item]) -> Iterator[dict[str, Any]]:
        todo = deque(items)
        with ThreadPoolExecutor(self.concurrency, thread_name_prefix="hogwild-eval") as pool:
            running: set[Future] = set()
            try:
                while todo or running:
                    while todo and len(running) < self.concurrency:
                        running.add(pool.submit(self.worker.run, *todo.popleft()))
                    done, running = wait(running, return_when=FIRST_COMPLETED)
                    for future in done:
                        yield future.result()
            finally:
                todo.clear()
                self.worker.close()  # ends the sessions in flight, so their threads return


class RayExecutor:
    """One ``EvalWorker`` actor per device of the Ray cluster (or ``hosts`` of them)."""

    def __init__(self, settings: EvalSettings, concurrency: int, hosts: int = 0, address: str | None = None) -> None:
        import ray

        if not ray.is_initialized():
            ray.init(address=address, log_to_driver=False)
        gpus = int(ray.cluster_resources().get("GPU", 0))
        self.hosts = hosts or max(gpus, 1)
        resources = {"num_gpus": 1} if gpus else {"num_cpus": 1}
        actor = ray.remote(max_concurrency=concurrency + 1, **resources)(EvalWorker)
        self.actors = [actor.remote(settings) for _ in range(self.hosts)]
        self.concurrency = concurrency
        self.ray = ray
        self.where = (f"{self.hosts} Ray session host actor(s) ({'1 GPU' if gpus else '1 CPU'} each), "
                      f"{concurrency} problems in flight each")

    def run(self, items: Sequence[Item]) -> Iterator[dict[str, Any]]:
        todo, running = deque(items), {}
        try:
            while todo or running:
                for actor in self.actors:
                    while todo and sum(a is actor for a in running.values()) < self.concurrency:
                        running[actor.run.remote(*todo.popleft())] = actor
                done, _ = self.ray.wait(list(running), num_returns=1)
                for ref in done:
                    running.pop(ref)
                    yield self._get(ref)
        finally:
            for actor in self.actors:
                self.ray.kill(actor)

    def _get(self, ref) -> dict[str, Any]:
        from ray.exceptions import RayActorError, RayTaskError

        try:
            return self.ray.get(ref)
        except RayTaskError as err:
            cause = err.cause if isinstance(err.cause, HogwildError) else None
            raise (cause or HogwildError(f"an evaluation host failed: {str(err).splitlines()[0]}")) from None
        except RayActorError as err:
            raise HogwildError(f"an evaluation host died ({str(err).splitlines()[0]}); rerun to resume") from None


class GangExecutor:
    """``hosts`` gang hosts (``cluster.gang.GangHost``), each on ``gang`` worker actors of the Ray
    cluster (one device each), driven from this process; ``concurrency`` items in flight per gang.
    Without ``hosts``: one gang per ``gang`` GPUs of the cluster, at least one."""

    def __init__(self, settings: EvalSettings, concurrency: int, gang: int, hosts: int = 0,
                 address: str | None = None) -> None:
        import ray

        from cluster.gang import GangHost
        from cluster.ray_session import RayConfig
        from cluster.session import open_model_info
        from workers.actor import EngineSpec, ModelSpec

        info = open_model_info(settings.model)  # the driver needs the tokenizer, not the weights
        self.codec, self.max_context = codec_for(info.tokenizer, info.config.vocab_size), info.max_context
        if not ray.is_initialized():
            ray.init(address=address, log_to_driver=False)
        gpus = int(ray.cluster_resources().get("GPU", 0))
        count = hosts or max(gpus // gang, 1)
        spec = EngineSpec(ModelSpec(settings.model), pool=PoolConfig(tokens=settings.kv_tokens))
        self.settings, self.concurrency = settings, concurrency
        self.hosts: list[GangHost] = []
        try:
            for _ in range(count):
                self.hosts.append(GangHost(RayConfig((1,) * gang, address=address), spec).start())
        except BaseException:
            self.close()
            raise
        self.where = (f"{count} Ray gang host(s) of {gang} worker actor(s) ({'1 GPU' if gpus else '1 CPU'} each), "
                      f"{concurrency} problems in flight each")

    def run(self, items: Sequence[Item]) -> Iterator[dict[str, Any]]:
        todo, load = deque(items), [0] * len(self.hosts)
        with ThreadPoolExecutor(len(self.hosts) * self.concurrency, thread_name_prefix="hogwild-eval") as pool:
            running: dict[Future, int] = {}
            try:
                while todo or running:
                    while todo and len(running) < len(self.hosts) * self.concurrency:
                        at = min(range(len(self.hosts)), key=load.__getitem__)  # the least loaded gang
                        load[at] += 1
                        running[pool.submit(run_problem, self.hosts[at], self.codec, self.max_context,
                                            *todo.popleft(), self.settings)] = at
                    done, _ = wait(running, return_when=FIRST_COMPLETED)
                    for future in done:
                        load[running.pop(future)] -= 1
                        yield future.result()
            finally:
                todo.clear()
                self.close()  # ends the sessions in flight, so their threads return

    def close(self) -> None:
        for host in self.hosts:
            host.close()
        self.hosts = []


def make_executor(settings: EvalSettings, concurrency: int, hosts: int = 0, address: str | None = None,
                  use_ray: bool = False, gang: int = 0):
    """A ``GangExecutor`` when ``gang`` > 0; a ``RayExecutor`` when asked to (or ``hosts`` > 0, or an
    address); else a ``LocalExecutor``."""
    if concurrency < 1:
        raise ConfigError(f"--concurrency must be >= 1, got {concurrency}")
    if hosts < 0:
        raise ConfigError(f"--hosts must be >= 0 (0: one per device), got {hosts}")
    if gang < 0:
        raise ConfigError(f"--gang must be >= 0 (0: one host actor per device, no gangs), got {gang}")
    if gang:
        return GangExecutor(settings, concurrency, gang, hosts, address)
    if use_ray or hosts or address:
        return RayExecutor(settings, concurrency, hosts, address)
    return LocalExecutor(settings, concurrency)
