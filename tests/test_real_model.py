"""Oracle 2 and a two-worker smoke test on the real default model (SmolLM2-135M-Instruct, fp32, CPU)."""

from __future__ import annotations

import pytest
import torch

from cache_service.layout import View
from workers.engine import HogwildEngine

pytestmark = pytest.mark.slow

NEW_TOKENS = 32
QUESTION = "Explain in detail how photosynthesis works in plants."


def _chat_ids(lm, text: str) -> list[int]:
    encoded = lm.tokenizer.apply_chat_template(
        [{"role": "user", "content": text}], add_generation_prompt=True
    )
    ids = encoded["input_ids"]  # transformers 5: a BatchEncoding
    return ids.tolist() if isinstance(ids, torch.Tensor) else list(ids)


def _encode(lm, text: str) -> list[int]:
    return lm.tokenizer(text, add_special_tokens=False)["input_ids"]


@pytest.fixture(scope="module")
def reference(default_lm):
    """``model.generate`` greedy (sdpa attention): prompt ids, tokens and per-step logits."""
    lm = default_lm
    ids = _chat_ids(lm, QUESTION)
    lm.model.set_attn_implementation("sdpa")
    try:
        with torch.no_grad():
            out = lm.model.generate(
                torch.tensor([ids]),
                attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                do_sample=False,
                max_new_tokens=NEW_TOKENS,
                output_logits=True,
                return_dict_in_generate=True,
                pad_token_id=lm.tokenizer.eos_token_id,
            )
    finally:
        lm.model.set_attn_implementation("hogwild")
    tokens = out.sequences[0, len(ids):].tolist()
    logits = torch.stack([step[0].float() for step in out.logits])
    return ids, tokens, logits


def test_one_worker_one_block_equals_generate(default_lm, reference):
    lm = default_lm
    ids, expected_tokens, expected_logits = reference
    assert len(expected_tokens) == NEW_TOKENS
    assert lm.tokenizer.eos_token_id not in expected_tokens  # the comparison covers all 32 steps
    assert lm.model.config._attn_implementation == "hogwild"

    engine = HogwildEngine(lm)
    block = engine.new_block()
    logits = engine.prefill(block, ids)
    tokens, worst = [], 0.0
    for step in range(NEW_TOKENS):
        assert logits.shape == (lm.config.vocab_size,) and logits.dtype == torch.float32
        torch.testing.assert_close(logits, expected_logits[step], atol=1e-4, rtol=0,
                                   msg=lambda m, s=step: f"step {s}: {m}")
        worst = max(worst, float((logits - expected_logits[step]).abs().max()))
        token = int(logits.argmax())
        tokens.append(token)
        if step + 1 < NEW_TOKENS:
            logits = engine.forward([(View.of(block), [token])])[0]
    assert tokens == expected_tokens, (lm.tokenizer.decode(tokens), lm.tokenizer.decode(expected_tokens))
    assert engine.length(block) == len(ids) + NEW_TOKENS - 1


WORKERS = ("Alice", "Bob")
STEPS = 8
PROBE_STEPS = (0, 3, STEPS - 1)  # steps at which the peer is also hidden (keeps the file fast)


def test_two_workers_combined_layout_see_each_other(default_lm):
    """Two workers, combined layout [common, others-header, peer step, own-header, own step], 8
    greedy steps: finite logits, and hiding the peer's step from a worker's view changes its logits.

    The hidden-peer forward is a probe: it is undone with ``truncate`` and the step is then run with
    the full views (the probe's entries are overwritten)."""
    lm = default_lm
    engine = HogwildEngine(lm)
    common, others, own = engine.new_block(), engine.new_block(), engine.new_block()
    engine.prefill(common, _chat_ids(lm, "Count from one to twenty, splitting the work between you."))
    engine.prefill(others, _encode(lm, "\nOther workers:\n"), context=(common,))
    engine.prefill(own, _encode(lm, "\nYour step:\n"), context=(common,))
    steps = [engine.new_block() for _ in WORKERS]
    shown = [View((common, others, steps[1 - w], own, steps[w]), steps[w]) for w in range(2)]
    hidden = [View((common, others, own, steps[w]), steps[w]) for w in range(2)]
    # first inputs of different lengths: rows are padded and masked
    first = [_encode(lm, f"{WORKERS[0]}: "), _encode(lm, f"{WORKERS[1]}: I will")]
    assert len(first[0]) != len(first[1])
    inputs = first
    for step in range(STEPS):
        if step in PROBE_STEPS:
            before = [engine.length(b) for b in steps]
            alone = engine.forward(list(zip(hidden, inputs)))
            for b, n in zip(steps, before):
                engine.store.truncate(b, n)
        logits = engine.forward(list(zip(shown, inputs)))
        assert logits.shape == (len(WORKERS), lm.config.vocab_size)
        assert torch.isfinite(logits).all()
        if step in PROBE_STEPS:
            assert torch.isfinite(alone).all()
            for w in range(len(WORKERS)):
                change = float((logits[w] - alone[w]).abs().max())
                assert change > 1e-2, f"step {step}: worker {w}'s logits ignore its peer ({change})"
        inputs = [[int(t)] for t in logits.argmax(-1)]
    assert [engine.length(b) for b in steps] == [len(f) + STEPS - 1 for f in first]
