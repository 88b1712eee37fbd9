"""Collectives between worker actors (torch.distributed): rendezvous, row all-gathers, broadcasts.

Each actor computes some rows of a step; ``Collective.gather_rows`` all-gathers a per-actor
``[local rows, ...]`` tensor into ``[all rows, ...]`` in rank order (padding local rows to the
largest count, since all_gather needs equal shapes). ``start_gather`` launches it asynchronously
and hands back the wait, so an instant step overlaps each layer's K/V exchange with attention over
the shared history. At world size 1 nothing is communicated.
Backends: gloo on CPU, nccl on CUDA (one rank per GPU). The time spent in collectives is counted.
"""

from __future__ import annotations

import datetime
import socket
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
import torch.distributed as dist

from cache_service.errors import HogwildError
from workers.hook import Exchange, Received


class RendezvousError(HogwildError):
    """Ranks of a session could not meet (address unreachable, a rank missing, a timeout)."""


@dataclass
class ExchangeStats:
    """Host time blocked in collectives (launching them and waiting for them: with overlap, only
    the part not hidden behind other work), how many were made and the bytes sent by this rank."""

    seconds: float = 0.0
    calls: int = 0
    bytes_sent: int = 0

    def reset(self) -> None:
        self.seconds, self.calls, self.bytes_sent = 0.0, 0, 0


def free_port(host: str) -> int:
    """A TCP port free on ``host`` now (rank 0 picks it for the rendezvous)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def backend_for(device: torch.device) -> str:
    return "nccl" if device.type == "cuda" else "gloo"


def rendezvous(address: str, rank: int, world: int, device: torch.device, timeout_s: float) -> None:
    """Join the session's process group at ``address`` (``host:port`` of rank 0)."""
    if dist.is_initialized():
        raise RendezvousError("this process already belongs to a process group; use a fresh actor")
    if device.type == "cuda":
        torch.cuda.set_device(device)
    try:
        dist.init_process_group(backend_for(device), init_method=f"tcp://{address}", rank=rank,
                                world_size=world, timeout=datetime.timedelta(seconds=timeout_s))
    except (RuntimeError, ValueError, OSError) as err:  # torch raises DistStoreError (a RuntimeError)
        raise RendezvousError(
            f"rank {rank} of {world} could not meet the others at tcp://{address} within {timeout_s:.0f}s "
            f"({str(err).splitlines()[0][:200]}); check that every node reaches that address and port "
            "(firewalls, GLOO_SOCKET_IFNAME/NCCL_SOCKET_IFNAME) and that all actors started"
        ) from None


def leave() -> None:
    """Leave the process group (if any)."""
    if dist.is_initialized():
        dist.destroy_process_group()


class Collective:
    """The collectives one actor makes; ``world == 1`` makes every call local."""

    def __init__(self, rank: int, world: int, device: torch.device) -> None:
        self.rank, self.world, self.device = rank, world, device
        self.stats = ExchangeStats()

    def gather_rows(self, local: torch.Tensor, counts: Sequence[int]) -> torch.Tensor:
        """``[counts[rank], ...]`` from every rank -> ``[sum(counts), ...]`` in rank order."""
        return self.start_gather(local, counts)()

    def start_gather(self, local: torch.Tensor, counts: Sequence[int]) -> Callable[[], torch.Tensor]:
        """Launch ``gather_rows`` and return the call that waits for its result."""
        if self.world == 1:
            return lambda: local
        start = time.perf_counter()
        padded = local.new_zeros((max(counts), *local.shape[1:]))
        padded[: local.shape[0]] = local
        parts = [torch.empty_like(padded) for _ in range(self.world)]
        work = dist.all_gather(parts, padded, async_op=True)
        self._count(start, padded)

        def wait() -> torch.Tensor:
            start = time.perf_counter()
            work.wait()
            out = torch.cat([p[:c] for p, c in zip(parts, counts)])
            self.stats.seconds += time.perf_counter() - start
            return out

        return wait

    def broadcast(self, tensor: torch.Tensor, src: int = 0) -> torch.Tensor:
        """``tensor`` of rank ``src``; other ranks pass a buffer of the same shape and dtype."""
        if self.world == 1:
            return tensor
        start = time.perf_counter()
        tensor = tensor.contiguous()
        dist.broadcast(tensor, src)
        self._count(start, tensor if self.rank == src else tensor[:0])
        return tensor

    def agree_min(self, value: int) -> int:
        """The smallest ``value`` of all ranks (e.g. the KV pool size every replica can hold)."""
        if self.world == 1:
            return value
        tensor = torch.tensor([value], dtype=torch.long, device=self.device)
        dist.all_reduce(tensor, op=dist.ReduceOp.MIN)
        return int(tensor.item())

    def gather_tokens(self, tokens: Sequence[int], counts: Sequence[int]) -> list[int]:
        """Every rank's sampled tokens, concatenated in rank order."""
        local = torch.tensor(list(tokens), dtype=torch.long, device=self.device).reshape(len(tokens))
        return self.gather_rows(local, counts).tolist()

    def instant_exchange(self, counts: Sequence[int]) -> Exchange:
        """The per-layer hook of an instant step: every row's new K/V, in one all-gather per layer,
        launched when the layer has them and waited for when its attention needs them."""

        def exchange(layer: int, k: torch.Tensor, v: torch.Tensor) -> Received:
            wait = self.start_gather(torch.stack((k, v), dim=1), counts)  # [rows, 2, kvh, T, d]

            def received() -> tuple[torch.Tensor, torch.Tensor]:
                both = wait()
                return both[:, 0], both[:, 1]

            return received

        return exchange

    def _count(self, start: float, sent: torch.Tensor) -> None:
        self.stats.seconds += time.perf_counter() - start
        self.stats.calls += 1
        self.stats.bytes_sent += sent.numel() * sent.element_size()

