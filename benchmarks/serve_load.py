"""The HTTP endpoint under load: K concurrent streaming clients vs the same sessions in-process.

The endpoint runs on Ray Serve on a local Ray (``deploy.cli.start``: one replica, real HTTP on a
loopback port); K clients each stream one ``POST /v1/chat/completions`` at once. The baseline
submits the same K sessions (same problems, options and seeds, so the same tokens) to a
``ServeBackend`` in this process and reads their events on K threads. The variants alternate
(HTTP, in-process, HTTP, ...) for each K. Printed per K and variant: time to first content
(request sent -> first worker text; p50/p95 over clients and repeats), aggregate sampled tokens/s
(all clients' completion tokens / wall time from the first request to the last end, median over
repeats), and the in-process / HTTP ratio. Last line: ``serve_overhead=<ratio at 8 clients>``.

    python -m benchmarks.serve_load                    # default model, K in (1, 4, 8)
    python -m benchmarks.serve_load --tiny --steps 16  # a quick look with a random model
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import sys
import threading
import time

import httpx

from cluster.events import Delta
from deploy.backend import SessionOptions, local_backend
from deploy.config import ServeConfig


def problem(i: int) -> str:
    return f"A shop sells {10 + i} pens a day for {20 + i} days. How many pens does it sell in total?"


def options(args, i: int) -> SessionOptions:
    return SessionOptions(workers=2, max_steps=args.steps, check_every=0, temperature=0.7, top_p=0.95, seed=i)


def body(args, i: int) -> dict:
    o = options(args, i)
    return {"messages": [{"role": "user", "content": problem(i)}], "stream": True, "workers": o.workers,
            "max_steps": o.max_steps, "check_every": o.check_every, "temperature": o.temperature,
            "top_p": o.top_p, "seed": o.seed}


class Result:
    """One variant run: first-content latencies (s), completion tokens, wall time."""

    def __init__(self) -> None:
        self.ttft: list[float] = []
        self.tokens = 0
        self.wall_s = 0.0
        self.lock = threading.Lock()

    def add(self, ttft: float, tokens: int) -> None:
        with self.lock:
            self.ttft.append(ttft)
            self.tokens += tokens


def run_threads(k: int, target) -> Result:
    result, threads = Result(), []
    start = time.perf_counter()
    for i in range(k):
        threads.append(threading.Thread(target=target, args=(i, result, start)))
        threads[-1].start()
    for t in threads:
        t.join()
    result.wall_s = time.perf_counter() - start
    return result


def http_run(args, url: str, k: int) -> Result:
    def client(i: int, result: Result, _: float) -> None:
        sent, first, tokens = time.perf_counter(), None, 0
        with httpx.Client(timeout=600) as http, http.stream("POST", url + "v1/chat/completions", json=body(args, i)) as r:
            r.raise_for_status()
            for line in r.iter_lines():
                if not line.startswith("data: {"):
                    continue
                chunk = json.loads(line[6:])
                if first is None and any(c.get("delta", {}).get("content") for c in chunk["choices"]):
                    first = time.perf_counter()
                if chunk.get("usage"):
                    tokens = chunk["usage"]["completion_tokens"]
        result.add((first or time.perf_counter()) - sent, tokens)

    return run_threads(k, client)


def local_run(args, backend, k: int) -> Result:
    def client(i: int, result: Result, _: float) -> None:
        sent, first = time.perf_counter(), None
        handle = backend.submit(problem(i), options(args, i))
        for event in handle.events():
            if first is None and isinstance(event, Delta):
                first = time.perf_counter()
        result.add((first or time.perf_counter()) - sent, sum(w.tokens for w in handle.builder.result().workers))

    return run_threads(k, client)


def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(round(q * (len(ordered) - 1))))]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="default")
    parser.add_argument("--tiny", action="store_true", help="a tiny random model instead (a quick look)")
    parser.add_argument("--clients", default="1,4,8", help="comma-separated concurrent clients")
    parser.add_argument("--steps", type=int, default=32, help="decode steps per session (2 workers)")
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--threads", type=int, default=2, help="torch threads, in-process and in the replica")
    parser.add_argument("--kv-tokens", type=int, default=1 << 16)
    args = parser.parse_args(argv)
    clients = [int(c) for c in args.clients.split(",")]

    import ray
    import torch

    from deploy.cli import start, stop
    from workers.model import tiny_config

    model = tiny_config("llama", initializer_range=0.15) if args.tiny else args.model
    config = ServeConfig(model=model, threads=args.threads, kv_tokens=args.kv_tokens, max_steps=args.steps,
                         max_waiting=max(clients) * 2)
    torch.set_num_threads(args.threads)
    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False, logging_level="WARNING")
    try:
        url = start(config, port=free_port())
        backend = local_backend(config)
        try:
            print(f"model={backend.model_id} steps={args.steps} workers=2 threads={args.threads} "
                  f"repeats={args.repeats} cpus={os.cpu_count()} url={url}")
            http_run(args, url, 1), local_run(args, backend, 1)  # warm-up
            print(f"{'clients':>7} | {'variant':>10} | {'ttft p50/p95 s':>15} | {'tok/s':>7} | {'wall s':>7} | tokens")
            ratios = {}
            for k in clients:
                runs: dict[str, list[Result]] = {"http": [], "in-process": []}
                for _ in range(args.repeats):
                    runs["http"].append(http_run(args, url, k))
                    runs["in-process"].append(local_run(args, backend, k))
                rates = {}
                for name, results in runs.items():
                    ttft = [t for r in results for t in r.ttft]
                    rates[name] = statistics.median(r.tokens / r.wall_s for r in results)
                    wall = statistics.median(r.wall_s for r in results)
                    print(f"{k:>7} | {name:>10} | {pct(ttft, .5):>6.2f}/{pct(ttft, .95):<8.2f} | {rates[name]:>7.1f} | "
                          f"{wall:>7.1f} | {results[0].tokens}")
                ratios[k] = rates["in-process"] / rates["http"]
                print(f"    {k} clients: in-process / HTTP tokens/s = {ratios[k]:.3f}")
            at = 8 if 8 in ratios else max(ratios)
            print(f"serve_overhead={ratios[at]:.3f}")
        finally:
            backend.close()
    finally:
        stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
