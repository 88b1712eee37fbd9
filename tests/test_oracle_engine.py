"""DESIGN.md §3 oracles 2, 3 and 5 on tiny random models: the engine against ``model.generate`` and
against the naive oracle of tests/oracle.py (instant and lagged, any layout, commits, multi-token
rows, both the "direct" and the "tail" attention paths, default/linear/llama3/yarn rope)."""

from __future__ import annotations

import functools
import random

import pytest
import torch
from transformers import AutoConfig

from cache_service.errors import UnsupportedError
from cache_service.kv_store import PoolConfig
from cache_service.layout import View
from cache_service.planner import DIRECT_MIN_TOKENS
from workers.engine import HogwildEngine
from workers.model import SUPPORTED_FAMILIES, load_model, tiny_config

from tests.oracle import NaiveOracle

# fp32 logits (|x| up to ~5), engine vs oracle: observed <= 1.3e-5 (float32 rope angles at view
# positions ~300); a wrong rotation, visibility or causality rule moves them by > 0.3.
ATOL = 1e-4
ROPES = {
    "default": {"rope_type": "default", "rope_theta": 10000.0},
    "linear": {"rope_type": "linear", "rope_theta": 10000.0, "factor": 2.0},
    "llama3": {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
               "high_freq_factor": 4.0, "original_max_position_embeddings": 64},
    "yarn": {"rope_type": "yarn", "rope_theta": 10000.0, "factor": 4.0,
             "original_max_position_embeddings": 64},
}


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tiny matmuls: intra-op threads only add overhead, and on a busy 2-core machine spinning
    OpenMP threads made this module ~20x slower."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@functools.cache
def sharp_model(family: str, rope: str = "default"):
    """Tiny fp32 model with larger weights than the default init (0.02 gives near-uniform attention,
    which hides position errors): a key at a wrong position or wrongly visible moves the logits."""
    config = tiny_config(family, rope_parameters=dict(ROPES[rope]), initializer_range=0.15)
    return load_model(config, dtype=torch.float32, device="cpu")


# ---- oracle 2: one worker, one block == model.generate ---------------------------------------
def check_against_generate(lm, atol_per_unit):
    """16 greedy steps: same tokens as ``model.generate`` (sdpa), logits within
    ``atol_per_unit`` times the largest reference logit magnitude (at least 1)."""
    prompt = torch.randint(0, lm.config.vocab_size, (1, 11), generator=torch.Generator().manual_seed(1))
    lm.model.set_attn_implementation("sdpa")
    try:
        ref = lm.model.generate(prompt, max_new_tokens=16, do_sample=False, eos_token_id=None,
                                pad_token_id=0, output_logits=True, return_dict_in_generate=True)
    finally:
        lm.model.set_attn_implementation("hogwild")
    want_tokens = ref.sequences[0, prompt.shape[1]:].tolist()
    assert len(want_tokens) == 16
    atol = atol_per_unit * max(1.0, max(float(x.abs().max()) for x in ref.logits))

    engine = HogwildEngine(lm)
    block = engine.new_block()
    logits = engine.prefill(block, prompt[0].tolist())
    tokens = []
    for step in range(16):
        torch.testing.assert_close(logits, ref.logits[step][0].float(), atol=atol, rtol=0)
        tokens.append(int(logits.argmax()))
        logits = engine.forward([(View.of(block), [tokens[-1]])])[0]
    assert tokens == want_tokens


def test_single_worker_matches_generate(family_model):
    check_against_generate(family_model, 1e-5)  # default init: logits |x| < 1


@pytest.mark.parametrize("family", SUPPORTED_FAMILIES)
def test_single_worker_matches_generate_sharp(family):
    check_against_generate(sharp_model(family), 1e-5)  # larger logits: fp32 noise scales with them


# ---- oracle 3: randomised many-worker scenarios against the naive oracle ----------------------
def run_scenario(lm, mode, seed, *, direct_min=DIRECT_MIN_TOKENS, long_prompt=False, steps=8, page_size=16,
                 groups=1):
    """Seeded random scenario; every forward's all-token logits are compared with the oracle.
    ``groups`` > 1: as many unrelated groups of workers (blocks of their own, like sessions of a
    host) step together in one forward, their rows group by group or (sometimes) interleaved."""
    rng = random.Random(seed)
    engine = HogwildEngine(lm, mode=mode, direct_min=direct_min, overlap_min=0,  # plans mark all it may read early
                           pool=PoolConfig(tokens=4096, page_size=page_size))
    oracle = NaiveOracle(lm, mode)
    vocab = lm.config.vocab_size

    def new_block():
        block = engine.new_block()
        oracle.add_block(block)
        return block

    def tokens(n):
        return [rng.randrange(vocab) for _ in range(n)]

    def check(rows):
        got = engine.forward(rows, all_logits=True)
        want = oracle.forward(rows)
        for r, (g, w) in enumerate(zip(got, want)):
            torch.testing.assert_close(g, w, atol=ATOL, rtol=0, msg=lambda m: f"row {r} of {rows}: {m}")
        for b in oracle.blocks:
            assert engine.length(b) == oracle.length(b)

    def new_group():
        common = new_block()
        check([(View.of(common), tokens(rng.randint(130, 150) if long_prompt else rng.randint(5, 12)))])
        headers = [new_block() for _ in range(2)] if rng.random() < 0.7 else []
        for h in headers:  # encoded on their own or after the prompt; keys land block-local either way
            context = rng.choice([(), (common,)])
            check([(View((*context, h), h), tokens(rng.randint(2, 6)))])
        own = [new_block() for _ in range(rng.randint(2, 4))]
        return common, headers, own

    def layout(group, w):
        common, headers, own = group
        peers = [own[p] for p in range(len(own)) if p != w]
        if rng.random() < 0.4:  # the paper's combined layout
            return View((common, *headers[:1], *peers, *headers[1:], own[w]), own[w])
        pool = [common, *headers, *peers]
        blocks = rng.sample(pool, rng.randint(0, len(pool)))  # random subset and order
        blocks.insert(rng.randint(0, len(blocks)), own[w])  # own step anywhere
        return View(tuple(blocks), own[w])

    def layouts(group):
        return [layout(group, w) for w in range(len(group[2]))]

    all_groups = [new_group() for _ in range(groups)]
    views = [layouts(g) for g in all_groups]
    for _ in range(steps):
        if rng.random() < 0.3:
            views = [layouts(g) for g in all_groups]
        rows = []
        for group_views in views:
            n = len(group_views)
            active = range(n) if rng.random() < 0.8 else sorted(rng.sample(range(n), rng.randint(1, n)))
            rows += [(group_views[w], tokens(rng.randint(1, 4))) for w in active]
        if groups > 1 and rng.random() < 0.3:  # a block's readers need not be neighbours
            rng.shuffle(rows)
        check(rows)
        for common, _, own in all_groups:
            if rng.random() < 0.4:
                w = rng.randrange(len(own))
                if engine.length(own[w]):
                    engine.commit(own[w], common)
                    oracle.commit(own[w], common)
    return engine


def assert_paths(plans, *, long_direct):
    """Both attention paths ran; direct chunks read before the step's entries arrive hold none."""
    for p in plans:
        written = set(p.write_slots.tolist())
        assert not any(set(c.slots()) & written for c in p.direct[: p.stable])
    assert any(p.stable for p in plans) and any(len(p.direct) > p.stable for p in plans)
    assert any(p.tail is not None for p in plans), "the tail path was not exercised"
    assert any(c.rotated is not None for p in plans for c in p.direct), "no direct chunk at an offset"
    if long_direct:
        assert any(c.length > 128 for p in plans for c in p.direct), "no direct chunk > 128 tokens"


@pytest.mark.parametrize("mode", ["instant", "lagged"])
@pytest.mark.parametrize("family", SUPPORTED_FAMILIES)
def test_scenarios_match_oracle(family, mode, plan_spy):
    lm = sharp_model(family)
    for seed in range(4):
        run_scenario(lm, mode, seed)
    run_scenario(lm, mode, 100, direct_min=8)  # step blocks and headers read in place too
    run_scenario(lm, mode, 101, long_prompt=True)  # prompt > 128: direct with the default threshold
    run_scenario(lm, mode, 102, long_prompt=True, direct_min=8)
    run_scenario(lm, mode, 103, long_prompt=True, direct_min=8, page_size=3)  # blocks in scattered pages
    assert_paths(plan_spy, long_direct=True)
    assert any(len(c.runs) > 1 for p in plan_spy for c in p.direct), "no block read in several runs"


@pytest.mark.parametrize("mode", ["instant", "lagged"])
@pytest.mark.parametrize("rope", ["linear", "llama3", "yarn"])
def test_rope_types_match_oracle(rope, mode, plan_spy):
    lm = sharp_model("llama", rope)
    if rope == "yarn":  # the "scaling applied once" trap is only covered when s != 1
        assert abs(lm.model.base_model.rotary_emb.attention_scaling - 1.0) > 0.05
    run_scenario(lm, mode, 7)
    run_scenario(lm, mode, 8, direct_min=8, long_prompt=True)
    assert_paths(plan_spy, long_direct=True)


@pytest.mark.parametrize("mode", ["instant", "lagged"])
def test_unrelated_groups_in_one_forward_match_oracle(mode, plan_spy):
    """Two or three groups with blocks of their own step together: each direct chunk is scored by
    its readers' rows only (contiguous or not), and everything still equals the oracle."""
    lm = sharp_model("llama")
    run_scenario(lm, mode, 200, groups=2, direct_min=8)
    run_scenario(lm, mode, 201, groups=3, direct_min=8, long_prompt=True, page_size=3)
    run_scenario(lm, mode, 202, groups=2)
    assert_paths(plan_spy, long_direct=True)
    partial = [c for p in plan_spy for c in p.direct if c.rows[1] - c.rows[0] < p.rows]
    assert partial, "no direct chunk scored by part of the rows"
    # a query that sees none of a chunk belongs to a row in between that does not read it
    assert any(c.mask is not None and c.mask.isinf().all(-1).any() for c in partial), \
        "no direct chunk with a row in between that does not read it"


def test_oracle_comparison_has_teeth():
    """The tolerance is far below what a wrong visibility or position produces: the instant engine
    differs from the lagged oracle, and from a layout with the peer moved, by >> ATOL."""
    lm = sharp_model("llama")
    engine, oracle = HogwildEngine(lm, mode="instant"), NaiveOracle(lm, "lagged")
    common, alice, bob = engine.new_block(), engine.new_block(), engine.new_block()
    for b in (common, alice, bob):
        oracle.add_block(b)
    rows = [(View.of(common), [5, 6, 7, 8])]
    torch.testing.assert_close(engine.forward(rows, all_logits=True)[0], oracle.forward(rows)[0],
                               atol=ATOL, rtol=0)
    rows = [(View.of(common, bob, alice), [8, 9]), (View.of(common, alice, bob), [10])]
    got, want = engine.forward(rows, all_logits=True), oracle.forward(rows)
    assert all((g - w).abs().max() > 100 * ATOL for g, w in zip(got, want))

    moved = HogwildEngine(lm, mode="instant")
    for b in (common, alice, bob):
        moved.new_block()
    moved.forward([(View.of(common), [5, 6, 7, 8])])
    rows = [(View.of(common, bob, alice), [8, 9]), (View.of(alice, common, bob), [10])]
    assert (moved.forward(rows, all_logits=True)[1] - got[1]).abs().max() > 100 * ATOL


# ---- visibility: a hidden peer has no influence, a shown one has ------------------------------
@pytest.mark.parametrize("mode", ["instant", "lagged"])
def test_hidden_peer_has_no_influence(mode):
    lm = sharp_model("qwen3")

    def bob_logits(alice_tokens, bob_sees_alice):
        engine = HogwildEngine(lm, mode=mode)
        common, alice, bob = engine.new_block(), engine.new_block(), engine.new_block()
        engine.prefill(common, [3, 1, 4, 1, 5, 9, 2, 6])
        bob_view = View.of(common, alice, bob) if bob_sees_alice else View.of(common, bob)
        out = []
        for step, a in enumerate(alice_tokens):
            rows = [(View.of(common, bob, alice), a), (bob_view, [20 + step, 30 + step])]
            out.append(engine.forward(rows, all_logits=True)[1])
        return torch.cat(out)

    first, second = [[11, 12], [13, 14], [15, 16]], [[40, 41], [42, 43], [44, 45]]
    assert torch.equal(bob_logits(first, False), bob_logits(second, False))
    assert (bob_logits(first, True) - bob_logits(second, True)).abs().max() > 1e-2


# ---- oracle 5: anything unsupported fails with an error naming it -----------------------------
@pytest.mark.parametrize("family", ["gpt2", "phi3"])
def test_unsupported_family(family):
    with pytest.raises(UnsupportedError, match=family):
        load_model(AutoConfig.for_model(family), dtype=torch.float32, device="cpu")


@pytest.mark.parametrize("rope", [
    {"rope_type": "dynamic", "rope_theta": 10000.0, "factor": 2.0},
    {"rope_type": "longrope", "rope_theta": 10000.0, "short_factor": [1.0] * 8,
     "long_factor": [2.0] * 8, "original_max_position_embeddings": 64},
])
def test_unsupported_rope(rope):
    with pytest.raises(UnsupportedError, match=rope["rope_type"]):
        load_model(tiny_config("llama", rope_parameters=rope), dtype=torch.float32, device="cpu")
