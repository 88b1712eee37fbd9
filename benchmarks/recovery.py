"""Recovery from a lost worker actor: restoring from the CacheService's checkpoint vs replaying.

A gang of 2 actors (1 worker each) hosts one session; rank 1 is killed (``ray.kill``) right after
the Tick of decode step ``--kill-at``. Printed per variant: the time from the kill to the next event
of the session (what a client sees), the gang's own "recovered in" (tear-down, a new gang started,
the checkpoint fetched and loaded into the new service) and the message. Variants, in turn:

* ``restore`` (this build): a checkpoint every call (``checkpoint_every=1``); the new gang restores
  the K/V and the run state and generates only the steps since the checkpoint again (<= 8).
* ``replay`` (before): no checkpoints (``checkpoint_every=0``); the new gang replays the session
  from its start.

    python -m benchmarks.recovery                      # default model
    python -m benchmarks.recovery --tiny --kill-at 150
"""

from __future__ import annotations

import argparse
import os
import sys
import threading
import time

import ray
import torch

from cache_service.kv_store import PoolConfig
from cluster.codec import codec_for
from cluster.events import Recovered, Tick
from cluster.gang import GangHost
from cluster.prompts import Templates
from cluster.protocol import Program, ProtocolConfig
from cluster.ray_session import RayConfig
from workers.actor import EngineSpec, ModelSpec
from workers.model import load_model_info, tiny_config
from workers.model_store import default_model_path
from workers.sampling import SamplingParams

PROBLEM = "A train leaves at 3 pm and travels 60 km per hour. How far has it gone by 6 pm?"


def run(spec: EngineSpec, program: Program, kill_at: int, checkpoint_every: int) -> dict:
    """One session, rank 1 killed after the Tick of ``kill_at``; the recovery's figures."""
    killed: list[float] = []
    out: dict = {}
    with GangHost(RayConfig((1, 1), threads=1), spec, checkpoint_every=checkpoint_every) as host:
        handle = host.submit(program, SamplingParams(temperature=0.0), "instant")
        for event in handle.events():
            if isinstance(event, Recovered):
                out["recovered_s"], out["message"] = event.seconds, event.message
                continue
            if "message" in out and "next_event_s" not in out:  # the first event generated after it
                out["next_event_s"] = time.monotonic() - killed[0]
            if isinstance(event, Tick) and event.step == kill_at:
                killed.append(time.monotonic())
                threading.Thread(target=ray.kill, args=(host.session.actors[1],), kwargs={"no_restart": True}).start()
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tiny", action="store_true", help="a tiny random model instead of the default one")
    parser.add_argument("--kill-at", type=int, default=120, help="decode step after which rank 1 is killed")
    parser.add_argument("--repeats", type=int, default=1)
    args = parser.parse_args(argv)
    source = tiny_config("llama", initializer_range=0.15) if args.tiny else str(default_model_path())
    info = load_model_info(source)
    no_answers = Templates(answer=r"(?!x)(x)")  # never matches: the session runs past the kill
    protocol = ProtocolConfig(workers=2, max_steps=args.kill_at + 24, max_step_tokens=32, check_every=0,
                              templates=no_answers)
    program = Program(PROBLEM, protocol, codec_for(info.tokenizer, info.config.vocab_size), info.max_context)
    spec = EngineSpec(ModelSpec(source, dtype="float32"), pool=PoolConfig(tokens=1 << 13))
    ray.init(address="local", num_cpus=3, include_dashboard=False, log_to_driver=False, logging_level="ERROR")
    torch.set_num_threads(1)
    name = "tiny llama" if args.tiny else source
    print(f"model={name} workers=2 actors=2 kill_at={args.kill_at} prompt_tokens={len(program.prompt_ids)} "
          f"cores={len(os.sched_getaffinity(0))}")
    print(f"{'variant':8} | kill -> next event s | recovered in s | message")
    try:
        for _ in range(args.repeats):
            for variant, every in (("restore", 1), ("replay", 0)):
                got = run(spec, program, args.kill_at, every)
                print(f"{variant:8} | {got.get('next_event_s', float('nan')):19.2f} | "
                      f"{got.get('recovered_s', float('nan')):14.2f} | {got.get('message', 'no recovery')}", flush=True)
    finally:
        ray.shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
