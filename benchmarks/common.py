"""Shared helpers for benchmarks: interleaved timing, medians and spread, CPU times."""

from __future__ import annotations

import os
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass, field


@dataclass
class Timing:
    """Wall-clock samples (ms) and process CPU time (s) of one variant."""

    samples: list[float] = field(default_factory=list)
    user_s: float = 0.0
    system_s: float = 0.0

    @property
    def median(self) -> float:
        return statistics.median(self.samples)

    @property
    def spread(self) -> str:
        """Inter-quartile range as 'p25-p75'."""
        q = statistics.quantiles(self.samples, n=4) if len(self.samples) > 1 else self.samples * 3
        return f"{q[0]:.1f}-{q[-1]:.1f}"


def interleave(variants: dict[str, Callable[[], None]], repeats: int, warmup: int = 2) -> dict[str, Timing]:
    """Run the variants A B A B ... ``repeats`` times each (after a warm-up) and time each call."""
    for _ in range(warmup):
        for run in variants.values():
            run()
    timings = {name: Timing() for name in variants}
    for _ in range(repeats):
        for name, run in variants.items():
            before, start = os.times(), time.perf_counter()
            run()
            elapsed, after = time.perf_counter() - start, os.times()
            t = timings[name]
            t.samples.append(elapsed * 1000)
            t.user_s += after.user - before.user
            t.system_s += after.system - before.system
    return timings
