"""The cost of keeping the CacheService current.

1. Rank 0's decode step with its recorder on (records, host copies of committed K/V, batched pushes
   to a real CacheService actor with back-pressure) vs off: 2 workers on one engine
   (``DistributedBackend``, world 1), steps of ``--step-tokens`` tokens, each committed into the
   shared history when it ends, as the protocol does. Variants alternate (on, off, on, off ...) in
   blocks of ``--steps`` decode steps, each from the same prompt on a fresh cache.
2. The service's own cost per commit as the history grows: appending a chunk (this build) vs
   concatenating the whole history on every commit (before), in this process.

    python -m benchmarks.service_overhead            # default model
    python -m benchmarks.service_overhead --tiny
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

import ray
import torch

from benchmarks.common import Timing
from cache_service.layout import View
from cache_service.service import CacheService, Committed, Wrote
from workers.actor import ServiceRecorder
from workers.distributed import DistributedBackend, Placement
from workers.engine import HogwildEngine
from workers.exchange import Collective
from workers.model import load_model, tiny_config
from workers.model_store import default_model_path
from workers.sampling import SamplingParams


def decode_block(engine: HogwildEngine, recorder: ServiceRecorder | None, prompt: list[int], steps: int,
                 step_tokens: int) -> list[float]:
    """ms per decode step of 2 workers on a fresh cache; each worker commits every ``step_tokens``."""
    engine.clear(None)
    if recorder is not None:
        recorder.clear()
    backend = DistributedBackend(engine, SamplingParams(temperature=0), Placement((2,), 0),
                                 Collective(0, 1, torch.device("cpu")), recorder)
    common = backend.new_block(len(prompt) + 2 * steps + 8)
    backend.prefill(common, prompt)
    own = [backend.new_block(step_tokens + 8) for _ in range(2)]
    feed, times = [[prompt[-1]], [prompt[-2]]], []
    for step in range(steps):
        start = time.perf_counter()
        rows = [(View.of(common, own[1 - w], own[w]), feed[w]) for w in range(2)]
        tokens = backend.step(rows, [0, 1], greedy=True)
        feed = [[t] for t in tokens]
        if (step + 1) % step_tokens == 0:
            for w in range(2):
                backend.commit(own[w], common)
        if recorder is not None:
            recorder.flush()  # what the actor does after every call
        times.append((time.perf_counter() - start) * 1000)
    if recorder is not None:
        recorder.sync()  # outside the timed steps: the service caught up
    return times


def service_cost(entries: torch.Tensor, commits: int, concat_every_commit: bool) -> list[float]:
    """ms per commit applied by a service, the history growing by ``entries`` each time."""
    service = CacheService()
    service.apply([Wrote(0, [0], entries)])
    history, times = entries, []
    for _ in range(commits):
        start = time.perf_counter()
        if concat_every_commit:
            history = torch.cat((history, entries), dim=3)
        else:
            service.apply([Committed(1, 0, entries)])
        times.append((time.perf_counter() - start) * 1000)
    return times


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tiny", action="store_true", help="tiny random llama instead of the default model")
    parser.add_argument("--context", type=int, default=256, help="prompt tokens")
    parser.add_argument("--steps", type=int, default=48, help="decode steps per block")
    parser.add_argument("--step-tokens", type=int, default=12, help="tokens per worker step before its commit")
    parser.add_argument("--rounds", type=int, default=4, help="blocks per variant, alternating")
    parser.add_argument("--commits", type=int, default=400, help="commits in the service-only measurement")
    args = parser.parse_args(argv)

    torch.set_num_threads(1)
    source = tiny_config("llama", max_position_embeddings=8192) if args.tiny else str(default_model_path())
    lm = load_model(source, dtype=torch.float32, device="cpu")
    prompt = torch.randint(0, lm.config.vocab_size, (args.context,), generator=torch.Generator().manual_seed(0))
    engine = HogwildEngine(lm)

    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False, logging_level="ERROR")
    try:
        service = ray.remote(CacheService).options(num_cpus=0.1).remote()
        recorder = ServiceRecorder(service)
        variants = {"recorder on": recorder, "recorder off": None}
        timings = {name: Timing() for name in variants}
        for round_ in range(args.rounds + 1):  # the first round warms up
            for name, rec in variants.items():
                before = os.times()
                times = decode_block(engine, rec, prompt.tolist(), args.steps, args.step_tokens)
                after = os.times()
                if round_:
                    timings[name].samples += times
                    timings[name].user_s += after.user - before.user
                    timings[name].system_s += after.system - before.system
        pushed = ray.get(service.apply.remote([]))
    finally:
        ray.shutdown()

    layers, _, kv_heads, head_dim = engine.store.shape
    chunk = torch.randn(layers, 2, kv_heads, 2 * args.step_tokens, head_dim)
    service_times = {"append chunk (now)": service_cost(chunk, args.commits, False),
                     "concat history (before)": service_cost(chunk, args.commits, True)}
    report(timings, service_times, pushed, recorder.waits, lm.name, args)


def report(timings: dict[str, Timing], service: dict[str, list[float]], pushed: int, waits: int,
           model: str, args: argparse.Namespace) -> None:
    n = args.rounds * args.steps
    print(f"model={model} context={args.context} workers=2 steps/variant={n} step_tokens={args.step_tokens} "
          f"threads=1 cores={os.cpu_count()}")
    print(f"{'variant':<14} | {'ms/step p50 (iqr)':>22} | {'cpu user/sys ms/step':>20}")
    for name, t in timings.items():
        print(f"{name:<14} | {t.median:>8.2f} ({t.spread:>11}) | {t.user_s * 1000 / n:>9.1f}/{t.system_s * 1000 / n:<9.1f}")
    print(f"records applied by the service: {pushed}; back-pressure waits: {waits}")
    quarter = args.commits // 4
    print(f"service ms per commit ({2 * args.step_tokens} tokens each) at history size ~{quarter * 2 * args.step_tokens} "
          f"and ~{args.commits * 2 * args.step_tokens} tokens:")
    for name, times in service.items():
        print(f"  {name:<24} {statistics.median(times[:quarter]):8.3f} -> {statistics.median(times[-quarter:]):8.3f}")
    sys.stdout.flush()
    ratio = timings["recorder on"].median / timings["recorder off"].median
    print(f"service_overhead_ratio={ratio:.3f}")


if __name__ == "__main__":
    main()
