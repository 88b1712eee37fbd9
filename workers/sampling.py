"""Token sampling with one random generator per worker, so results do not depend on placement."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from cache_service.errors import ConfigError


@dataclass(frozen=True)
class SamplingParams:
    """temperature 0 means greedy; top_k 0 and top_p 1 switch those filters off. A
    ``repetition_penalty`` above 1 makes the tokens a row generated recently less likely (its
    positive logits divided by it, its negative ones multiplied); 1 switches it off."""

    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0
    seed: int = 0
    repetition_penalty: float = 1.0

    def __post_init__(self) -> None:
        if not self.temperature >= 0 or self.temperature == float("inf"):
            raise ConfigError(f"temperature must be a finite number >= 0, got {self.temperature}")
        if self.top_k < 0:
            raise ConfigError(f"top_k must be >= 0, got {self.top_k}")
        if not 0 < self.top_p <= 1:
            raise ConfigError(f"top_p must be in (0, 1], got {self.top_p}")
        if not 0 < self.repetition_penalty < float("inf"):
            raise ConfigError(
                f"repetition_penalty must be a finite number > 0 (1 is off), got {self.repetition_penalty}")


def worker_generator(params: SamplingParams, worker: int) -> torch.Generator:
    """The RNG of one worker: seeded from (seed, worker index) only."""
    generator = torch.Generator(device="cpu")
    generator.manual_seed(params.seed * 1_000_003 + worker)
    return generator


TOP_P_CANDIDATES = 256  # top-p looks at this many most likely tokens first, the whole vocabulary if needed


def candidates(logits: torch.Tensor, params: SamplingParams) -> tuple[torch.Tensor, torch.Tensor]:
    """The tokens each row may draw after temperature, top-k and top-p: ``(values, ids)``, both
    ``[rows, c]``, logits of the candidates (``-inf`` where filtered out) and their token ids.

    Top-p keeps each row's most likely tokens up to (and including) the one whose cumulative
    probability reaches ``top_p``. It first looks at the ``TOP_P_CANDIDATES`` most likely tokens
    (a partial sort), which hold that set whenever their mass reaches ``top_p``; the rows where it
    does not sort their whole vocabulary. Either way the result equals a full sort's."""
    logits = logits.float() / params.temperature
    vocab = logits.shape[-1]
    every = torch.arange(vocab, device=logits.device).expand_as(logits)
    if not params.top_k and params.top_p == 1:
        return logits, every
    values, ids = torch.topk(logits, min(params.top_k or TOP_P_CANDIDATES, vocab), dim=-1)  # descending
    if params.top_p == 1:
        return values, ids
    if params.top_k:  # top-p renormalises over the top-k tokens
        return _top_p(values, values.softmax(-1), params.top_p), ids
    total = (logits - values[:, :1]).exp_().sum(-1, keepdim=True)  # the softmax's denominator
    probs = (values - values[:, :1]).exp_().div_(total)
    short = probs.sum(-1) < params.top_p  # rows whose candidates miss part of the kept set
    values = _top_p(values, probs, params.top_p)
    if not bool(short.any()):
        return values, ids
    full = torch.full_like(logits, float("-inf")).scatter_(-1, ids, values)
    rows = short.nonzero().flatten()
    ordered, order = torch.sort(logits[rows], dim=-1, descending=True)
    full[rows] = full[rows].scatter_(-1, order, _top_p(ordered, ordered.softmax(-1), params.top_p))
    return full, every


def _top_p(ordered: torch.Tensor, probs: torch.Tensor, top_p: float) -> torch.Tensor:
    """Descending ``ordered`` logits (with their probabilities ``probs``) cut after the one whose
    cumulative probability reaches ``top_p`` (that one kept)."""
    cumulative = probs.cumsum(-1)
    return ordered.masked_fill(cumulative - probs >= top_p, float("-inf"))


def filter_logits(logits: torch.Tensor, params: SamplingParams) -> torch.Tensor:
    """Temperature, top-k and top-p applied to ``[rows, vocab]`` logits (float32, ``-inf`` where dropped)."""
    values, ids = candidates(logits, params)
    return torch.full_like(logits, float("-inf"), dtype=torch.float32).scatter_(-1, ids, values)


def penalize(logits: torch.Tensor, recent: Sequence[Sequence[int]], penalty: float) -> torch.Tensor:
    """``logits`` ``[rows, vocab]`` with the repetition penalty on the ids of ``recent[i]`` in row
    i (positive logits divided by ``penalty``, negative ones multiplied), all rows in one scatter;
    the same tensor, untouched, when ``penalty`` is 1 or no row has recent ids."""
    if penalty == 1:
        return logits
    if len(recent) != logits.shape[0]:
        raise ConfigError(f"a repetition penalty needs each row's recent tokens: got {len(recent)} lists "
                          f"for {logits.shape[0]} rows (this backend does not pass them; use penalty 1)")
    if not any(recent):
        return logits
    width = max(len(r) for r in recent)
    # short rows repeat their first id (the same value is written twice); an empty row writes its
    # logit of token 0 back unchanged
    ids = torch.tensor([[*r, *[r[0] if r else 0] * (width - len(r))] for r in recent],
                       dtype=torch.long, device=logits.device)
    active = torch.tensor([bool(r) for r in recent], device=logits.device)[:, None]
    logits = logits.float()
    values = logits.gather(-1, ids)
    scaled = torch.where(values > 0, values / penalty, values * penalty)
    return logits.scatter(-1, ids, torch.where(active, scaled, values))


def sample(
    logits: torch.Tensor,
    params: SamplingParams,
    generators: list[torch.Generator],
    recent: Sequence[Sequence[int]] = (),
) -> list[int]:
    """One token per row of ``logits``; row i draws from ``generators[i]`` (one uniform number per
    draw, inverted through the cumulative probabilities of the row's candidates: all rows at once).
    ``recent[i]``: the ids row i generated lately, for the repetition penalty (greedy included)."""
    logits = penalize(logits, recent, params.repetition_penalty)
    if params.temperature == 0:
        return logits.argmax(-1).tolist()
    values, ids = candidates(logits, params)
    cumulative = values.softmax(-1).cumsum(-1)
    uniform = torch.stack([torch.rand((), generator=g) for g in generators]).to(cumulative.device)
    pick = torch.searchsorted(cumulative, (uniform * cumulative[:, -1])[:, None], right=True)
    return ids.gather(-1, pick.clamp_(max=ids.shape[-1] - 1)).flatten().tolist()
