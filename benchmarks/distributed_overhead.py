"""Distributed overhead: ms per decode step of 2 workers on 1 actor vs 2 actors (instant, lagged),
and on the single-process engine, same model and context (a shared prompt of C tokens). Instant
mode runs with the default ``overlap_min`` and twice more to measure that policy: always
overlapping each layer's K/V all-gather with attention over the prompt, and never.

Each variant decodes in blocks of ``--steps`` steps (``Backend.step``: forward, greedy sample,
token all-gather); variants alternate (A B C D A B C D ...). Steps are timed inside rank 0, so the
Ray call that starts a block is not counted; the exchange column is rank 0's time in collectives
(per-layer K/V all-gathers, the lagged all-gather, the token all-gather; with overlap only the
part not hidden behind attention). CPU time sums every process of the variant (all actors, or the
driver for the engine).

    python -m benchmarks.distributed_overhead            # default model, C = 512
    python -m benchmarks.distributed_overhead --tiny --rounds 5

Run it from the repository root with ``python -m`` (the actors import this module).
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass

import ray
import torch

from benchmarks.common import Timing
from cache_service.layout import View
from cache_service.planner import overlap_min_tokens
from cluster.ray_session import RayConfig, RaySession
from workers.actor import EngineSpec, ModelSpec
from workers.backend import LocalBackend
from workers.engine import HogwildEngine
from workers.model import load_model, tiny_config
from workers.model_store import default_model_path
from workers.sampling import SamplingParams

STEP_TOKENS = 16  # tokens already in each worker's step when timing starts


@dataclass(frozen=True)
class DecodeBlock:
    """A program: the first run (``blocks`` None) prefills the prompt and fills two step blocks;
    later runs decode ``steps`` steps over those blocks and yield one timing record."""

    prompt: tuple[int, ...]
    reserve: int
    steps: int = 0
    blocks: tuple[int, int, int] | None = None

    def run(self, backend) -> Iterator[dict]:
        if self.blocks is None:
            yield {"blocks": self._setup(backend)}
            return
        common, *own = self.blocks
        rows = [(View.of(common, own[1 - w], own[w]), [self.prompt[-1]]) for w in range(2)]
        stats = getattr(getattr(backend, "collective", None), "stats", None)
        exchange_before = stats.seconds if stats else 0.0
        cpu_before, times = os.times(), []
        for _ in range(self.steps):
            start = time.perf_counter()
            backend.step(rows, [0, 1], greedy=True)
            times.append((time.perf_counter() - start) * 1000)
        cpu = _cpu_since(cpu_before, backend)
        yield {"ms": times, "exchange_s": (stats.seconds if stats else 0.0) - exchange_before, "cpu": cpu}

    def _setup(self, backend) -> tuple[int, int, int]:
        common = backend.new_block(len(self.prompt))
        backend.prefill(common, list(self.prompt))
        own = [backend.new_block(self.reserve) for _ in range(2)]
        for w in range(2):
            backend.prefill(own[w], list(self.prompt[:STEP_TOKENS]), (common,))
        return common, own[0], own[1]


def _cpu_since(before: os.times_result, backend) -> tuple[float, float]:
    """(user, system) seconds since ``before``, summed over every rank of the session."""
    after = os.times()
    mine = torch.tensor([[after.user - before.user, after.system - before.system]], dtype=torch.float64)
    collective = getattr(backend, "collective", None)
    if collective is not None and collective.world > 1:
        mine = collective.gather_rows(mine, [1] * collective.world)
    return float(mine[:, 0].sum()), float(mine[:, 1].sum())


class EngineVariant:
    """The single-process engine in this process (the same program through ``LocalBackend``)."""

    def __init__(self, lm, prompt: tuple[int, ...], reserve: int) -> None:
        self.backend = LocalBackend(HogwildEngine(lm), SamplingParams(), 2)
        self.program = DecodeBlock(prompt, reserve)
        self.program = DecodeBlock(prompt, reserve, blocks=next(self.program.run(self.backend))["blocks"])

    def block(self, steps: int) -> dict:
        program = DecodeBlock(self.program.prompt, self.program.reserve, steps, self.program.blocks)
        return next(program.run(self.backend))


class RayVariant:
    """A Ray session whose actors keep the cache between blocks."""

    def __init__(self, counts: tuple[int, ...], spec: EngineSpec, prompt: tuple[int, ...], reserve: int) -> None:
        self.session = RaySession(RayConfig(counts, chunk_s=60.0), spec).start()
        setup = DecodeBlock(prompt, reserve)
        self.program = DecodeBlock(prompt, reserve, blocks=next(self.session.events(setup))["blocks"])

    def block(self, steps: int) -> dict:
        program = DecodeBlock(self.program.prompt, self.program.reserve, steps, self.program.blocks)
        return list(self.session.events(program))[0]


def measure(variants: dict, rounds: int, steps: int, warmup: int) -> dict[str, tuple[Timing, float]]:
    """Alternate the variants ``rounds`` times; per variant its step timings and exchange seconds."""
    for _ in range(warmup):
        for variant in variants.values():
            variant.block(steps)
    results = {name: (Timing(), [0.0]) for name in variants}
    for _ in range(rounds):
        for name, variant in variants.items():
            record = variant.block(steps)
            timing, exchange = results[name]
            timing.samples += record["ms"]
            timing.user_s += record["cpu"][0]
            timing.system_s += record["cpu"][1]
            exchange[0] += record["exchange_s"]
    return {name: (t, x[0]) for name, (t, x) in results.items()}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tiny", action="store_true", help="tiny random llama instead of the default model")
    parser.add_argument("--context", type=int, default=512, help="prompt tokens shared by both workers")
    parser.add_argument("--steps", type=int, default=8, help="decode steps per block (one Ray call)")
    parser.add_argument("--rounds", type=int, default=10, help="blocks per variant, alternating")
    parser.add_argument("--warmup", type=int, default=1)
    args = parser.parse_args(argv)

    torch.set_num_threads(1)  # like every actor: one thread per worker process
    config = tiny_config("llama", max_position_embeddings=8192) if args.tiny else None
    source = config if args.tiny else str(default_model_path())
    lm = load_model(source, dtype=torch.float32, device="cpu")
    prompt = tuple(torch.randint(0, lm.config.vocab_size, (args.context,),
                                 generator=torch.Generator().manual_seed(0)).tolist())
    reserve = STEP_TOKENS + (args.rounds + args.warmup) * args.steps + 16

    ray.init(address="local", num_cpus=12, include_dashboard=False, log_to_driver=False, logging_level="ERROR")
    model = ModelSpec(source, dtype="float32")
    variants = {
        "engine (1 process)": EngineVariant(lm, prompt, reserve),
        "1 actor x 2 workers": RayVariant((2,), EngineSpec(model), prompt, reserve),
        "2 actors instant": RayVariant((1, 1), EngineSpec(model), prompt, reserve),
        "instant, overlap": RayVariant((1, 1), EngineSpec(model, overlap_min=0), prompt, reserve),
        "instant, no overlap": RayVariant((1, 1), EngineSpec(model, overlap_min=sys.maxsize), prompt, reserve),
        "2 actors lagged": RayVariant((1, 1), EngineSpec(model, mode="lagged"), prompt, reserve),
    }
    try:
        results = measure(variants, args.rounds, args.steps, args.warmup)
    finally:
        for variant in variants.values():
            if isinstance(variant, RayVariant):
                variant.session.close()
        ray.shutdown()
    report(results, lm.name, args)


def report(results: dict[str, tuple[Timing, float]], model: str, args: argparse.Namespace) -> None:
    n = args.rounds * args.steps
    print(f"model={model} context={args.context} workers=2 steps/variant={n} (blocks of {args.steps}) "
          f"threads/process=1 cores={os.cpu_count()}")
    print(f"{'variant':<20} | {'ms/step (iqr)':>22} | {'exchange ms/step':>16} | {'cpu user/sys ms/step':>20}")
    for name, (t, exchange) in results.items():
        print(f"{name:<20} | {t.median:>8.1f} ({t.spread:>11}) | {exchange * 1000 / n:>16.1f} | "
              f"{t.user_s * 1000 / n:>9.1f}/{t.system_s * 1000 / n:<9.1f}")
    base = results["1 actor x 2 workers"][0].median
    for name in ("2 actors instant", "2 actors lagged", "engine (1 process)"):
        print(f"ratio {name} / 1 actor x 2 workers = {results[name][0].median / base:.3f}")
    overlap = results["instant, overlap"][0].median / results["instant, no overlap"][0].median
    print(f"ratio instant, overlap / no overlap = {overlap:.3f} (default overlap_min on CPU: "
          f"{overlap_min_tokens(torch.device('cpu'))} tokens, prompt {args.context})")
    sys.stdout.flush()
    print(f"distributed_overhead_ratio={results['2 actors instant'][0].median / base:.3f}")


if __name__ == "__main__":
    main()
