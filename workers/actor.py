"""The worker actor: one model replica with a full cache replica, hosting a range of workers.

A plain class (the cluster wraps it with ``ray.remote`` and its resources). Every method that
touches the cache (``prefill``, ``forward``, ``step``, ``commit``, ``run``) is a lockstep call: the
driver makes it on every actor of the session with the same arguments, or the collectives inside
wait for the missing ranks until the rendezvous timeout.
"""

from __future__ import annotations

import hashlib
import os
import time
from collections import deque
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field, replace
from typing import Any, Protocol

import ray
import torch
from transformers import PretrainedConfig

from cache_service.errors import ConfigError, HogwildError
from cache_service.kv_store import PoolConfig
from cache_service.layout import View
from cache_service.planner import DIRECT_MIN_TOKENS, Mode
from cache_service.service import Record
from cache_service.snapshot import KVSnapshot, capture, restore
from workers.backend import Backend
from workers.distributed import DistributedBackend, Placement
from workers.engine import HogwildEngine, pool_tokens
from workers.exchange import Collective, free_port, leave, rendezvous
from workers.model import LoadedModel, load_model
from workers.model_store import resolve_model
from workers.sampling import SamplingParams

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
RECORD_BATCH = 64  # records buffered before they are pushed to the CacheService
MAX_IN_FLIGHT = 4  # pushes the CacheService may have unapplied before rank 0 waits for the oldest


@dataclass(frozen=True)
class ModelSpec:
    """What every actor loads: ``source`` a model path / ``default`` / hub id, or a config (random
    weights from ``seed``, identical in every process); ``dtype`` by name, None for the device default."""

    source: str | PretrainedConfig
    dtype: str | None = None
    seed: int = 0

    def __post_init__(self) -> None:
        if self.dtype is not None and self.dtype not in DTYPES:
            raise ConfigError(f"dtype {self.dtype!r} is not supported; use one of {', '.join(DTYPES)}")

    def load(self, device: torch.device) -> LoadedModel:
        dtype = DTYPES[self.dtype] if self.dtype else None
        source = resolve_model(self.source) if isinstance(self.source, str) else self.source
        return load_model(source, dtype=dtype, device=device, seed=self.seed)


@dataclass(frozen=True)
class EngineSpec:
    """One session's engine settings, the same on every actor."""

    model: ModelSpec
    mode: str = "instant"
    sampling: SamplingParams = field(default_factory=SamplingParams)
    pool: PoolConfig = field(default_factory=PoolConfig)
    direct_min: int = DIRECT_MIN_TOKENS
    overlap_min: int | None = None  # history tokens from which the K/V exchange overlaps attention

    def __post_init__(self) -> None:
        Mode.parse(self.mode)
        if self.overlap_min is not None and self.overlap_min < 0:
            raise ConfigError(f"overlap_min must be >= 0 tokens (or None for the device's default), "
                              f"got {self.overlap_min}")


class Program(Protocol):
    """A deterministic program (e.g. ``cluster.protocol.Program``): same calls on every actor."""

    def run(self, backend: Backend) -> Iterator[Any]: ...


class ServiceRecorder:
    """Rank 0's records on their way to the CacheService, off the step's critical path.

    * K/V entries are copied to the host asynchronously (CUDA: into pinned memory on the current
      stream, with an event); a record is pushed once its copy has completed, so no step waits for
      a device-to-host copy. On the CPU the copy is a plain clone (the pool's pages are reused).
    * Records are pushed in batches, fire-and-forget, in order.
    * Back-pressure: at most ``max_in_flight`` pushes are unapplied; past that, the oldest is waited
      for, so a slow service slows rank 0 down instead of growing memory without bound.
    * A dead service does not stop the session (it is off the critical path): the recorder stops
      recording, and ``sync`` (before a snapshot) says the session cannot be saved.
    """

    def __init__(self, service: Any, max_in_flight: int = MAX_IN_FLIGHT, timeout_s: float = 60.0) -> None:
        if max_in_flight < 1:
            raise ConfigError(f"max_in_flight must be >= 1, got {max_in_flight}")
        self.service, self.max_in_flight, self.timeout_s = service, max_in_flight, timeout_s
        self.buffer: list[tuple[Record, torch.cuda.Event | None]] = []
        self.in_flight: deque = deque()  # ObjectRefs of pushes not yet known to be applied
        self.waits = 0  # times back-pressure made rank 0 wait (benchmarks read it)
        self.lost: str | None = None  # why the service is gone, once it is

    def record(self, record: Record) -> None:
        if self.lost is not None:
            return
        self.buffer.append(_to_host(record))
        if len(self.buffer) >= RECORD_BATCH:
            self.flush()

    def flush(self, wait: bool = False) -> None:
        """Push the buffered records whose host copies are done (all of them with ``wait``)."""
        ready = 0
        for _, event in self.buffer:
            if event is not None and not event.query():
                if not wait:
                    break
                event.synchronize()
            ready += 1
        if ready:
            self._push([record for record, _ in self.buffer[:ready]])
            del self.buffer[:ready]

    def clear(self) -> None:
        """Drop what is buffered and clear the service (after the records already sent)."""
        self.buffer = []
        self.in_flight.append(self.service.clear.remote())

    def sync(self, timeout_s: float | None = None) -> None:
        """Push what is buffered and wait until the service has applied everything."""
        self.flush(wait=True)
        while self.in_flight:
            self._settle(self.in_flight.popleft(), timeout_s or self.timeout_s)
        if self.lost is not None:
            raise HogwildError(f"the cache service died ({self.lost}); the session goes on but cannot be "
                               "saved: start it again to save it")

    def poll(self) -> str | None:
        """Settle the pushes already answered, without waiting; why the service is gone, if it is."""
        if self.in_flight and self.lost is None:
            done, _ = ray.wait(list(self.in_flight), num_returns=len(self.in_flight), timeout=0)
            for ref in done:
                if self.lost is None:
                    self.in_flight.remove(ref)
                    self._settle(ref, self.timeout_s)
        return self.lost

    def _push(self, records: list[Record]) -> None:
        if self.lost is not None:
            return
        self.in_flight.append(self.service.apply.remote(records))
        while len(self.in_flight) > self.max_in_flight:
            self.waits += 1
            self._settle(self.in_flight.popleft(), self.timeout_s)

    def _settle(self, ref: Any, timeout_s: float) -> None:
        try:
            ray.get(ref, timeout=timeout_s)
        except ray.exceptions.GetTimeoutError:
            raise HogwildError(f"the cache service did not apply rank 0's records within {timeout_s:.0f}s; "
                               "it is overloaded or stuck: check its node") from None
        except ray.exceptions.RayActorError as err:
            self.lost = str(err).strip().splitlines()[0][:200] if str(err).strip() else type(err).__name__
            self.buffer, self.in_flight = [], deque()


def _to_host(record: Record) -> tuple[Record, "torch.cuda.Event | None"]:
    """A record whose entries are (being) copied to host memory, and the copy's event (CUDA)."""
    entries = getattr(record, "entries", None)
    if entries is None:
        return record, None
    if entries.device.type != "cuda":
        return replace(record, entries=entries.detach().to("cpu", copy=True)), None
    host = torch.empty(entries.shape, dtype=entries.dtype, pin_memory=True)
    host.copy_(entries, non_blocking=True)
    event = torch.cuda.Event()
    event.record()
    return replace(record, entries=host), event


class WorkerActor:
    """Hosts ``placement.workers`` of a session on one device (see the module docstring)."""

    def __init__(self, spec: EngineSpec, placement: Placement, device: str = "cpu", threads: int = 1) -> None:
        torch.set_num_threads(threads)
        self.spec, self.placement = spec, placement
        self.device = torch.device("cuda", 0) if device == "cuda" else torch.device("cpu")
        self.lm = spec.model.load(self.device)
        self.collective = Collective(placement.rank, placement.world, self.device)
        self.recorder: ServiceRecorder | None = None
        self.engine: HogwildEngine | None = None  # built by connect(), its pool sized alike on every rank
        self._backend: DistributedBackend | None = None

    # ---- setup -------------------------------------------------------------------------------
    def identity(self) -> dict:
        """Where this actor runs: rank, node address, process id and the GPUs Ray gave it."""
        gpus = ray.get_runtime_context().get_accelerator_ids().get("GPU", [])
        return {"rank": self.placement.rank, "node": ray.util.get_node_ip_address(),
                "pid": os.getpid(), "gpus": list(gpus), "workers": list(self.placement.workers)}

    def pick_address(self) -> str:
        """``host:port`` for the rendezvous (called on rank 0)."""
        host = ray.util.get_node_ip_address()
        return f"{host}:{free_port(host)}"

    def connect(self, address: str, timeout_s: float, service: Any = None) -> None:
        """Join the process group (``timeout_s`` bounds the rendezvous and every collective) and
        allocate the engine's KV pool, as large as the smallest rank's (the ranks mirror each other's
        pages); rank 0 also reports to ``service`` (a CacheService handle)."""
        if self.placement.world > 1:
            rendezvous(address, self.placement.rank, self.placement.world, self.device, timeout_s)
        if service is not None and self.placement.rank == 0:
            self.recorder = ServiceRecorder(service)
        pool = self.spec.pool
        tokens = self.collective.agree_min(pool_tokens(self.lm, pool))
        self.engine = HogwildEngine(self.lm, mode=self.spec.mode, pool=replace(pool, tokens=tokens),
                                    direct_min=self.spec.direct_min, overlap_min=self.spec.overlap_min)
        self._backend = DistributedBackend(self.engine, self.spec.sampling, self.placement, self.collective,
                                           self.recorder)

    def attach_service(self, service: Any) -> None:
        """Report to a new CacheService (rank 0; the previous one was lost), or to none (None)."""
        if self.placement.rank == 0:
            self.recorder = ServiceRecorder(service) if service is not None else None
            self.backend.recorder = self.recorder

    @property
    def backend(self) -> DistributedBackend:
        if self._backend is None:
            raise HogwildError("the worker actor is not connected; call connect() first")
        return self._backend

    def weights_digest(self) -> str:
        """sha256 of the weights (placement tests check every replica is the same model)."""
        digest = hashlib.sha256()
        for name, tensor in sorted(self.lm.model.state_dict().items()):
            digest.update(name.encode())
            digest.update(tensor.detach().to("cpu").contiguous().view(torch.uint8).numpy().tobytes())
        return digest.hexdigest()

    def reset(self, mode: str | None = None, snapshot: bytes | None = None,
              sampling: SamplingParams | None = None) -> None:
        """A fresh, empty cache (optionally in another mode, with other sampling, with fresh
        per-worker generators), or one restored from ``snapshot``."""
        params = sampling or self.backend.params
        self.engine.clear(mode)
        self._backend = DistributedBackend(self.engine, params, self.placement, self.collective, self.recorder)
        if snapshot is not None:
            restore(self.backend.engine.store, KVSnapshot.from_bytes(snapshot))
            if self.recorder is not None:  # the service adopted the same snapshot: it mirrors all
                self.backend.mirrored = set(self.backend.engine.store.blocks)
        elif self.recorder is not None:
            self.recorder.clear()

    # ---- lockstep cache operations -----------------------------------------------------------
    def new_block(self, reserve: int = 0) -> int:
        return self.backend.new_block(reserve)

    def length(self, block: int) -> int:
        return self.backend.length(block)

    def prefill(self, block: int, tokens: Sequence[int], context: Sequence[int] = ()) -> None:
        self.backend.prefill(block, tokens, context)
        self._flush()

    def forward(self, rows: Sequence[tuple[View, Sequence[int]]], workers: Sequence[int],
                all_logits: bool = False) -> dict[int, torch.Tensor]:
        """Teacher-forced step; logits of this actor's rows by worker (on the CPU)."""
        logits = self.backend.forward(rows, workers, all_logits=all_logits)
        self._flush()
        return {w: x.to("cpu") for w, x in logits.items()}

    def step(self, rows: Sequence[tuple[View, Sequence[int]]], workers: Sequence[int],
             greedy: bool = False, suppress: Sequence[int] = (), recent: Sequence[Sequence[int]] = ()) -> list[int]:
        tokens = self.backend.step(rows, workers, greedy=greedy, suppress=suppress, recent=recent)
        self._flush()
        return tokens

    def commit(self, step_block: int, into: int) -> None:
        self.backend.commit(step_block, into)
        self._flush()

    def run(self, program: Program, chunk_s: float = 0.2) -> Iterator[list]:
        """Run ``program`` to the end; rank 0 yields its events in chunks (every ``chunk_s``)."""
        chunk, since = [], time.monotonic()
        for event in program.run(self.backend):
            if self.placement.rank != 0:
                continue
            chunk.append(event)
            if time.monotonic() - since >= chunk_s:
                self._flush()
                yield chunk
                chunk, since = [], time.monotonic()
        self._flush()
        if chunk:
            yield chunk

    def pool_pages(self) -> tuple[int, int]:
        """The KV pool's pages and page size (the same on every rank)."""
        return self.engine.store.pages, self.engine.store.page_size

    # ---- snapshots and statistics ------------------------------------------------------------
    def live_state(self) -> dict:
        """For a snapshot (rank 0): ``live`` blocks (those the service does not mirror), every
        block's (length, reserved tokens) in ``spans``, ``next_block`` and ``mode``. Waits until the
        service has applied every record."""
        if self.recorder is not None:
            self.recorder.sync()
        store = self.backend.engine.store
        live = [b for b in sorted(store.blocks) if b not in self.backend.mirrored]
        return {"live": capture(store, live), "spans": {b: (s.length, s.reserved) for b, s in store.blocks.items()},
                "next_block": max(store.blocks, default=-1) + 1, "mode": self.backend.engine.mode.value}

    def exchange_stats(self, reset: bool = False) -> dict:
        stats = self.collective.stats
        out = {"seconds": stats.seconds, "calls": stats.calls, "bytes_sent": stats.bytes_sent}
        if reset:
            stats.reset()
        return out

    def close(self) -> None:
        if self.recorder is not None:
            self.recorder.flush()
        leave()

    def _flush(self) -> None:
        if self.recorder is not None:
            self.recorder.flush()
