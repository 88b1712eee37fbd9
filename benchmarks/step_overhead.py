"""One decode step of the engine (N workers, shared prompt) vs Hugging Face batched decode of N sequences.

Both sides see the same model and the same context: a shared prompt of C tokens plus a short
per-worker step. The engine holds the prompt once (one block read in place by every worker); the
Hugging Face baseline holds N copies in a DynamicCache. Variants alternate (A B A B ...). The
engine's KV pool is sized for the run; the table gives the bytes its blocks hold and the pool's.

    python -m benchmarks.step_overhead                 # default model, N in (2, 4), C in (512, 2048, 4096)
    python -m benchmarks.step_overhead --tiny --repeats 5
"""

from __future__ import annotations

import argparse
import copy
import sys

import torch
from transformers import DynamicCache

from benchmarks.common import interleave
from cache_service.kv_store import PoolConfig
from cache_service.layout import View
from workers.engine import HogwildEngine
from workers.model import LoadedModel, load_model, tiny_config
from workers.model_store import default_model_path

STEP_TOKENS = 16  # tokens already in each worker's current step


def engine_stepper(lm: LoadedModel, prompt: list[int], n: int, repeats: int):
    """A closure doing one engine decode step of ``n`` workers in the combined layout."""
    engine = HogwildEngine(lm, pool=PoolConfig(tokens=len(prompt) + n * (STEP_TOKENS + repeats + 64)))
    common = engine.new_block(len(prompt))
    engine.prefill(common, prompt)
    steps = [engine.new_block(STEP_TOKENS + repeats + 16) for _ in range(n)]
    views = [View.of(common, *[s for s in steps if s != own], own) for own in steps]
    engine.forward([(View.of(common, s), prompt[:STEP_TOKENS]) for s in steps])  # fill the steps
    token = [prompt[-1]]

    def step() -> None:
        engine.forward([(view, token) for view in views])

    return step, engine.store.nbytes(), engine.store.pool_bytes()


def hf_stepper(model: torch.nn.Module, prompt: list[int], n: int):
    """A closure doing one Hugging Face decode step of ``n`` sequences over a DynamicCache."""
    ids = torch.tensor([prompt + prompt[:STEP_TOKENS]] * n)
    with torch.inference_mode():
        cache = DynamicCache(config=model.config)
        model(input_ids=ids, past_key_values=cache, use_cache=True)
    token = torch.tensor([[prompt[-1]]] * n)

    @torch.inference_mode()
    def step() -> None:
        model(input_ids=token, past_key_values=cache, use_cache=True)

    held = sum(layer.keys.numel() + layer.values.numel() for layer in cache.layers)
    return step, held * next(model.parameters()).element_size()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tiny", action="store_true", help="tiny random llama instead of the default model")
    parser.add_argument("--workers", type=int, nargs="+", default=[2, 4])
    parser.add_argument("--contexts", type=int, nargs="+", default=[512, 2048, 4096])
    parser.add_argument("--repeats", type=int, default=15)
    args = parser.parse_args(argv)

    torch.manual_seed(0)
    if args.tiny:
        lm = load_model(tiny_config("llama", max_position_embeddings=8192), dtype=torch.float32, device="cpu")
    else:
        lm = load_model(default_model_path(), dtype=torch.float32, device="cpu")
    hf_model = copy.deepcopy(lm.model)
    hf_model.set_attn_implementation("sdpa")
    print(f"model={lm.name} threads={torch.get_num_threads()} repeats={args.repeats}")
    print(f"{'N':>2} {'ctx':>5} | {'engine ms (iqr)':>18} | {'HF ms (iqr)':>18} | {'ratio':>5} | "
          f"{'eng user/sys s':>14} | {'HF user/sys s':>14} | {'KV MB eng/HF':>13} | {'pool MB':>7}")
    ratios = {}
    for n in args.workers:
        for ctx in args.contexts:
            prompt = torch.randint(0, lm.config.vocab_size, (ctx,)).tolist()
            hf_step, hf_bytes = hf_stepper(hf_model, prompt, n)
            engine_step, eng_bytes, pool_bytes = engine_stepper(lm, prompt, n, args.repeats + 4)
            t = interleave({"engine": engine_step, "hf": hf_step}, args.repeats)
            e, h = t["engine"], t["hf"]
            ratio = e.median / h.median
            ratios[(n, ctx)] = ratio
            print(f"{n:>2} {ctx:>5} | {e.median:>8.1f} ({e.spread:>8}) | {h.median:>8.1f} ({h.spread:>8}) | "
                  f"{ratio:>5.2f} | {e.user_s:>6.2f}/{e.system_s:<6.2f} | {h.user_s:>6.2f}/{h.system_s:<6.2f} | "
                  f"{eng_bytes / 2**20:>6.1f}/{hf_bytes / 2**20:<6.1f} | {pool_bytes / 2**20:>7.1f}")
            sys.stdout.flush()
    key = (2, 2048) if (2, 2048) in ratios else next(iter(ratios))
    print(f"step_overhead_ratio={ratios[key]:.3f}")


if __name__ == "__main__":
    main()
