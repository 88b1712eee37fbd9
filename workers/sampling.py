"""Token sampling with one random generator per worker, so results do not depend on placement."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from cache_service.errors import ConfigError


@dataclass(frozen=True)
class SamplingParams:
    """temperature 0 means greedy; top_k 0 and top_p 1 switch those filters off."""

    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0
    seed: int = 0

    def __post_init__(self) -> None:
        if not self.temperature >= 0 or self.temperature == float("inf"):
            raise ConfigError(f"temperature must be a finite number >= 0, got {self.temperature}")
        if self.top_k < 0:
            raise ConfigError(f"top_k must be >= 0, got {self.top_k}")
        if not 0 < self.top_p <= 1:
            raise ConfigError(f"top_p must be in (0, 1], got {self.top_p}")


def worker_generator(params: SamplingParams, worker: int) -> torch.Generator:
    """The RNG of one worker: seeded from (seed, worker index) only."""
    generator = torch.Generator(device="cpu")
    generator.manual_seed(params.seed * 1_000_003 + worker)
    return generator


def filter_logits(logits: torch.Tensor, params: SamplingParams) -> torch.Tensor:
    """Temperature, top-k and top-p applied to ``[rows, vocab]`` logits (float32)."""
    logits = logits.float() / params.temperature
    if params.top_k:
        kth = torch.topk(logits, min(params.top_k, logits.shape[-1]), dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if params.top_p < 1:
        ordered, index = torch.sort(logits, dim=-1, descending=True)
        cumulative = ordered.softmax(-1).cumsum(-1)
        drop = cumulative - ordered.softmax(-1) >= params.top_p  # keep the token that crosses top_p
        logits = logits.scatter(-1, index, ordered.masked_fill(drop, float("-inf")))
    return logits


def sample(
    logits: torch.Tensor, params: SamplingParams, generators: list[torch.Generator]
) -> list[int]:
    """One token per row of ``logits``; row i draws from ``generators[i]``."""
    if params.temperature == 0:
        return logits.argmax(-1).tolist()
    probs = filter_logits(logits, params).softmax(-1).cpu()
    return [int(torch.multinomial(p, 1, generator=g)) for p, g in zip(probs, generators)]
