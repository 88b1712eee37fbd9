"""Many sessions on one engine (the session host) vs the same sessions one after another.

K concurrent 2-worker sessions (prompts of one length, a fixed budget of decode steps: answers are
switched off) are submitted at once to one ``SessionHost``; the baseline runs the same K sessions
on the same host one at a time. Both variants alternate (A B A B ...) ``--repeats`` times. Printed:
aggregate sampled tokens/s (medians), the per-session decode step latency (p50/p95 of the time
between a session's consecutive steps), the KV bytes held at the peak and the pool's bytes.

    python -m benchmarks.multi_session                    # default model, K in (1, 4, 16)
    python -m benchmarks.multi_session --tiny --steps 16  # a quick look
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

import torch

from cache_service.kv_store import PoolConfig
from cluster.events import Tick
from cluster.host import SessionHost
from cluster.prompts import Templates
from cluster.protocol import Program, ProtocolConfig
from cluster.session import Session, SessionConfig
from workers.engine import HogwildEngine
from workers.model import load_model, tiny_config
from workers.model_store import default_model_path
from workers.sampling import SamplingParams

NO_ANSWERS = Templates(answer=r"(?!)()")  # every session runs its whole budget


def programs(lm, k: int, steps: int) -> list[Program]:
    """``k`` problems of the same shape (numbers differ), 2 workers, ``steps`` decode steps."""
    protocol = ProtocolConfig(workers=2, max_steps=steps, max_step_tokens=48, check_every=0, templates=NO_ANSWERS)
    config = SessionConfig(protocol=protocol)
    return [Session(f"A shop sells {10 + i} pens a day for {20 + i} days. How many pens does it sell?",
                    config, lm=lm).program for i in range(k)]


class Run:
    """One variant's measurements: wall time, sampled tokens, step gaps, peak KV bytes."""

    def __init__(self) -> None:
        self.wall_s, self.tokens, self.gaps_ms, self.peak_bytes = 0.0, 0, [], 0


def run_sessions(host: SessionHost, progs: list[Program], concurrent: bool) -> Run:
    """The sessions one after another or all at once, from an empty prefix cache."""
    host.engine.store.forget_prefixes()
    run, start = Run(), time.perf_counter()
    batches = [progs] if concurrent else [[p] for p in progs]
    for batch in batches:
        handles = [host.submit(p, SamplingParams(temperature=0.7, seed=i), "instant") for i, p in enumerate(batch)]
        last = {h.id: None for h in handles}
        while not all(h.done.is_set() for h in handles):
            host.step()
            run.peak_bytes = max(run.peak_bytes, host.engine.store.nbytes())
            now = time.perf_counter()
            for h in handles:
                for event in h.poll():
                    if isinstance(event, Tick):
                        run.tokens += len(event.tokens)
                        if last[h.id] is not None:
                            run.gaps_ms.append((now - last[h.id]) * 1000)
                        last[h.id] = now
    run.wall_s = time.perf_counter() - start
    return run


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tiny", action="store_true", help="tiny random llama instead of the default model")
    parser.add_argument("--sessions", type=int, nargs="+", default=[1, 4, 16])
    parser.add_argument("--steps", type=int, default=32, help="decode steps per session")
    parser.add_argument("--repeats", type=int, default=2)
    args = parser.parse_args(argv)

    torch.manual_seed(0)
    if args.tiny:
        lm = load_model(tiny_config("llama"), dtype=torch.float32, device="cpu")
    else:
        lm = load_model(default_model_path(), dtype=torch.float32, device="cpu")
    progs = programs(lm, max(args.sessions), args.steps)
    page = PoolConfig().page_size
    tokens = page * sum(p.worst_case_pages(page) for p in progs)
    host = SessionHost(HogwildEngine(lm, pool=PoolConfig(tokens=tokens)))
    print(f"model={lm.name} threads={torch.get_num_threads()} steps={args.steps} repeats={args.repeats} "
          f"pool={host.engine.store.pool_bytes() / 2**20:.0f} MB")
    print(f"{'K':>3} | {'variant':>10} | {'tok/s':>7} | {'wall s':>7} | {'step p50/p95 ms':>16} | "
          f"{'peak KV MB':>10} | {'user/sys s':>11}")
    speedups = {}
    for k in args.sessions:
        runs: dict[str, list[Run]] = {"sequential": [], "concurrent": []}
        cpu: dict[str, list[float]] = {"sequential": [0.0, 0.0], "concurrent": [0.0, 0.0]}
        for _ in range(args.repeats):
            for variant in runs:
                before = os.times()
                runs[variant].append(run_sessions(host, progs[:k], variant == "concurrent"))
                after = os.times()
                cpu[variant][0] += after.user - before.user
                cpu[variant][1] += after.system - before.system
        rates = {}
        for variant, done in runs.items():
            rates[variant] = statistics.median(r.tokens / r.wall_s for r in done)
            gaps = [g for r in done for g in r.gaps_ms]
            print(f"{k:>3} | {variant:>10} | {rates[variant]:>7.1f} | "
                  f"{statistics.median(r.wall_s for r in done):>7.1f} | "
                  f"{percentile(gaps, 0.5):>7.0f}/{percentile(gaps, 0.95):<8.0f} | "
                  f"{max(r.peak_bytes for r in done) / 2**20:>10.1f} | {cpu[variant][0]:>5.0f}/{cpu[variant][1]:<5.0f}")
            sys.stdout.flush()
        speedups[k] = rates["concurrent"] / rates["sequential"]
        print(f"    K={k}: concurrent / sequential tokens/s = {speedups[k]:.2f}")
    print(f"multi_session_speedup={speedups[max(speedups)]:.2f}")


if __name__ == "__main__":
    main()
