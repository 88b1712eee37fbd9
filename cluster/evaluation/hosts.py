"""Where problems run: one session host in this process, or one per device on a Ray cluster.

``EvalWorker`` owns a model, an engine and a started ``SessionHost``; ``run`` solves one
(problem, method) and may be called from many threads at once, so that many sessions share each
forward. ``LocalExecutor`` runs items on one worker with a thread per item in flight;
``RayExecutor`` starts one ``EvalWorker`` actor per device (GPU, else CPU slot) and keeps
``concurrency`` items in flight on each. Both yield result lines as they finish.
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


def make_executor(settings: EvalSettings, concurrency: int, hosts: int = 0, address: str | None = None,
                  use_ray: bool = False):
    """A ``RayExecutor`` when asked to (or ``hosts`` > 0, or an address), else a ``LocalExecutor``."""
    if concurrency < 1:
        raise ConfigError(f"--concurrency must be >= 1, got {concurrency}")
    if hosts < 0:
        raise ConfigError(f"--hosts must be >= 0 (0: one per device), got {hosts}")
    if use_ray or hosts or address:
        return RayExecutor(settings, concurrency, hosts, address)
    return LocalExecutor(settings, concurrency)
