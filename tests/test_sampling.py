"""Sampling: greedy, top-k/top-p filters, per-worker seeded generators, parameter validation."""

from __future__ import annotations

import math

import pytest
import torch

from cache_service.errors import ConfigError, HogwildError
from workers.sampling import TOP_P_CANDIDATES, SamplingParams, filter_logits, sample, worker_generator

VOCAB = 50


def _logits(rows: int = 3, seed: int = 0) -> torch.Tensor:
    return torch.randn(rows, VOCAB, generator=torch.Generator().manual_seed(seed)) * 3


def _generators(params: SamplingParams, workers) -> list[torch.Generator]:
    return [worker_generator(params, w) for w in workers]


def test_greedy_is_argmax():
    params = SamplingParams()
    assert params.temperature == 0
    for seed in range(5):
        logits = _logits(4, seed)
        assert sample(logits, params, _generators(params, range(4))) == logits.argmax(-1).tolist()


@pytest.mark.parametrize("temperature", [0.1, 1.0, 7.0, 1e4])
def test_top_k_one_is_greedy_at_any_temperature(temperature):
    params = SamplingParams(temperature=temperature, top_k=1, seed=3)
    generators = _generators(params, range(3))
    for seed in range(10):
        logits = _logits(3, seed)
        assert sample(logits, params, generators) == logits.argmax(-1).tolist()


@pytest.mark.parametrize("temperature", [0.5, 1.0, 50.0])
def test_tiny_top_p_is_greedy(temperature):
    params = SamplingParams(temperature=temperature, top_p=1e-6, seed=1)
    generators = _generators(params, range(3))
    for seed in range(10):
        logits = _logits(3, seed)
        assert sample(logits, params, generators) == logits.argmax(-1).tolist()


def test_top_k_never_leaves_the_k_best():
    params = SamplingParams(temperature=5.0, top_k=3, seed=0)
    generator = worker_generator(params, 0)
    logits = _logits(1, 7)
    best = set(torch.topk(logits[0], 3).indices.tolist())
    drawn = {sample(logits, params, [generator])[0] for _ in range(200)}
    assert drawn <= best and len(drawn) > 1


def test_top_p_keeps_the_token_that_crosses_it():
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]]))
    kept = filter_logits(logits, SamplingParams(temperature=1.0, top_p=0.6)).isfinite()
    assert kept.tolist() == [[True, True, False, False]]
    kept = filter_logits(logits, SamplingParams(temperature=1.0, top_p=0.5)).isfinite()
    assert kept.tolist() == [[True, False, False, False]]
    kept = filter_logits(logits, SamplingParams(temperature=1.0, top_p=1.0)).isfinite()
    assert kept.all()


def test_temperature_one_samples_the_softmax():
    logits = torch.log(torch.tensor([[0.6, 0.3, 0.1]]))
    params = SamplingParams(temperature=1.0, seed=5)
    generator = worker_generator(params, 0)
    draws = torch.tensor([sample(logits, params, [generator])[0] for _ in range(3000)])
    frequency = torch.bincount(draws, minlength=3).float() / len(draws)
    torch.testing.assert_close(frequency, torch.tensor([0.6, 0.3, 0.1]), atol=0.04, rtol=0)


def _run(params: SamplingParams, workers, steps: int = 30) -> dict[int, list[int]]:
    """Sample ``steps`` tokens for ``workers`` batched together; tokens per worker."""
    generators = _generators(params, workers)
    tokens: dict[int, list[int]] = {w: [] for w in workers}
    for step in range(steps):
        # each worker's logits depend on the worker and step only, not on the batch
        logits = torch.stack([_logits(1, 1000 * w + step)[0] for w in workers])
        for w, token in zip(workers, sample(logits, params, generators)):
            tokens[w].append(token)
    return tokens


def test_same_seed_and_worker_give_the_same_tokens():
    params = SamplingParams(temperature=1.0, top_p=0.95, seed=42)
    assert _run(params, [0, 1, 2]) == _run(params, [0, 1, 2])


def test_tokens_do_not_depend_on_batch_composition():
    params = SamplingParams(temperature=1.0, top_k=20, seed=7)
    together = _run(params, [0, 1, 2])
    alone = {w: _run(params, [w])[w] for w in (0, 1, 2)}
    reordered = _run(params, [2, 0, 1])
    assert together == alone == reordered


def test_workers_and_seeds_draw_different_streams():
    params = SamplingParams(temperature=1.0, seed=0)
    tokens = _run(params, [0, 1])
    assert tokens[0] != tokens[1]
    other_seed = _run(SamplingParams(temperature=1.0, seed=1), [0])
    assert other_seed[0] != tokens[0]


def test_worker_generator_depends_only_on_seed_and_worker():
    params = SamplingParams(temperature=1.0, seed=9)
    a = worker_generator(params, 3)
    b = worker_generator(SamplingParams(temperature=0.3, top_k=5, seed=9), 3)
    assert torch.equal(torch.rand(8, generator=a), torch.rand(8, generator=b))


@pytest.mark.parametrize(
    "kwargs",
    [
        dict(temperature=-0.1),
        dict(top_k=-1),
        dict(top_p=0.0),
        dict(top_p=-0.5),
        dict(top_p=1.5),
        dict(top_p=math.nan),
    ],
    ids=lambda k: ",".join(f"{n}={v}" for n, v in k.items()),
)
def test_bad_params_raise_config_error(kwargs):
    with pytest.raises(ConfigError):
        SamplingParams(**kwargs)
    assert issubclass(ConfigError, HogwildError)


def test_nan_temperature_raises_config_error():
    with pytest.raises(ConfigError):
        SamplingParams(temperature=math.nan)


def _top_p_by_full_sort(logits: torch.Tensor, top_p: float) -> torch.Tensor:
    """The reference: sort the whole vocabulary."""
    ordered, index = torch.sort(logits, dim=-1, descending=True)
    probs = ordered.softmax(-1)
    drop = probs.cumsum(-1) - probs >= top_p
    return logits.scatter(-1, index, ordered.masked_fill(drop, float("-inf")))


@pytest.mark.parametrize("spread", [8.0, 0.01])  # peaked: the candidates suffice; flat: the fallback
@pytest.mark.parametrize("top_p", [0.5, 0.95])
def test_top_p_from_candidates_equals_a_full_sort(spread, top_p):
    generator = torch.Generator().manual_seed(3)
    logits = torch.randn(5, 49152, generator=generator) * spread
    kept = filter_logits(logits, SamplingParams(temperature=1.0, top_p=top_p)).isfinite()
    expected = _top_p_by_full_sort(logits, top_p).isfinite()
    assert torch.equal(kept, expected)
    assert kept.sum() > (TOP_P_CANDIDATES if spread < 1 else 0)  # the flat case keeps more than the candidates


def test_top_p_mixes_rows_from_candidates_and_from_a_full_sort():
    generator = torch.Generator().manual_seed(4)
    logits = torch.randn(6, 49152, generator=generator) * torch.tensor([8.0, 0.01, 8.0, 0.01, 8.0, 8.0])[:, None]
    kept = filter_logits(logits, SamplingParams(temperature=0.7, top_p=0.9)).isfinite()
    assert torch.equal(kept, _top_p_by_full_sort(logits / 0.7, 0.9).isfinite())


def test_top_k_then_top_p_renormalises_over_the_top_k():
    logits = torch.log(torch.tensor([[0.4, 0.3, 0.2, 0.1]]))
    # over the top 2 (0.4, 0.3 -> 0.57, 0.43), top-p 0.5 keeps the first only
    kept = filter_logits(logits, SamplingParams(temperature=1.0, top_k=2, top_p=0.5)).isfinite()
    assert kept.tolist() == [[True, False, False, False]]
    kept = filter_logits(logits, SamplingParams(temperature=1.0, top_k=3, top_p=0.6)).isfinite()
    assert kept.tolist() == [[True, True, False, False]]


def test_sampling_follows_the_distribution_of_the_candidates():
    logits = torch.log(torch.tensor([[0.6, 0.3, 0.1, 0.0]]))
    generator = torch.Generator().manual_seed(0)
    drawn = [sample(logits, SamplingParams(temperature=1.0), [generator])[0] for _ in range(6000)]
    shares = [drawn.count(t) / len(drawn) for t in range(4)]
    assert shares[3] == 0 and abs(shares[0] - 0.6) < 0.03 and abs(shares[1] - 0.3) < 0.03
