"""Oracle 1: RoPE algebra against transformers' own rotary embeddings.

Rotating a key that transformers placed at position p by an offset d with ``kernels.rope`` must give
the key transformers places at p + d, for every supported rope type (default, linear, llama3, yarn)
and for partial rotary. yarn is the trap: the model's cos/sin carry ``attention_scaling``; a rotation
by an offset must be unscaled or the scaling is counted twice.
"""

from __future__ import annotations

import functools

import pytest
import torch
from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS
from transformers.models.gpt_neox.configuration_gpt_neox import GPTNeoXConfig
from transformers.models.gpt_neox.modeling_gpt_neox import GPTNeoXRotaryEmbedding
from transformers.models.gpt_neox.modeling_gpt_neox import (
    apply_rotary_pos_emb as neox_apply_rotary_pos_emb,
)
from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

from kernels.rope import RopeTable, rotate_by
from workers.model import load_model, rope_table, tiny_config

HEAD_DIM = 16  # tiny_config's head_dim

ROPE_PARAMETERS = {
    "default": {"rope_type": "default", "rope_theta": 10000.0},
    "linear": {"rope_type": "linear", "rope_theta": 10000.0, "factor": 4.0},
    "llama3": {
        "rope_type": "llama3",
        "rope_theta": 500000.0,
        "factor": 8.0,
        "low_freq_factor": 1.0,
        "high_freq_factor": 4.0,
        "original_max_position_embeddings": 256,
    },
    "yarn": {
        "rope_type": "yarn",
        "rope_theta": 10000.0,
        "factor": 4.0,
        "original_max_position_embeddings": 512,
    },
}

# Positions and offsets: small, mixed, and large (p=3000, d=5000 -> 8000).
CASES = [
    ([0, 1, 2, 3], [1, 1, 1, 1]),
    ([0, 5, 17, 100], [3, 0, 40, 7]),
    ([3000, 3000, 12, 3000], [5000, 5000, 5000, 5000]),
    ([4000, 8000, 2500, 700], [-3000, -8000, 5000, 6000]),
]


@functools.cache
def _llama(rope_type: str):
    config = tiny_config("llama", rope_parameters=dict(ROPE_PARAMETERS[rope_type]))
    return load_model(config, dtype=torch.float32, device="cpu")


def _neox_rotary(rope_parameters: dict) -> GPTNeoXRotaryEmbedding:
    config = GPTNeoXConfig(
        hidden_size=4 * HEAD_DIM,
        num_attention_heads=4,
        max_position_embeddings=2048,
        rope_parameters=rope_parameters,
    )
    return GPTNeoXRotaryEmbedding(config)


def _hf_rope(rotary, apply, k: torch.Tensor, positions: list[int]) -> torch.Tensor:
    """transformers' rope of ``k`` ``[1, heads, T, head_dim]`` at ``positions`` (with scaling)."""
    position_ids = torch.tensor([positions])
    cos, sin = rotary(k, position_ids)
    return apply(k, k, cos, sin)[1]


def _keys(seed: int = 0, tokens: int = 4) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(1, 2, tokens, HEAD_DIM, generator=generator)


def _tolerance(positions: list[int]) -> float:
    # transformers computes angles position * inv_freq in float32: the angle error grows like
    # ulp(position) ~ position * 6e-8 rad (plus the same from inv_freq's rounding); keys are ~N(0,1).
    # Measured: ~2e-4 at position 8000; this allows 1.6e-3 (a wrong frequency is off by O(1)).
    largest = max(abs(p) for p in positions)
    return 2e-5 + 2e-7 * largest


@pytest.mark.parametrize("positions, offsets", CASES)
@pytest.mark.parametrize("rope_type", list(ROPE_PARAMETERS))
def test_shift_equals_transformers_rope(rope_type, positions, offsets):
    lm = _llama(rope_type)
    rotary = lm.model.base_model.rotary_emb
    table = lm.rope
    assert table.rotary_dim == HEAD_DIM
    k = _keys()
    placed = _hf_rope(rotary, apply_rotary_pos_emb, k, positions)
    moved = rotate_by(placed, torch.tensor(offsets), table)
    target = [p + d for p, d in zip(positions, offsets)]
    expected = _hf_rope(rotary, apply_rotary_pos_emb, k, target)
    torch.testing.assert_close(moved, expected, atol=_tolerance(positions + target), rtol=0)


def test_yarn_has_attention_scaling_and_shift_stays_unscaled():
    """The trap: yarn's cos/sin carry attention_scaling != 1; an offset rotation must not re-apply it."""
    lm = _llama("yarn")
    rotary = lm.model.base_model.rotary_emb
    scaling = float(rotary.attention_scaling)
    assert abs(scaling - 1.0) > 0.05
    k = _keys(1)
    placed = _hf_rope(rotary, apply_rotary_pos_emb, k, [10, 20, 30, 40])
    moved = rotate_by(placed, torch.tensor(7), lm.rope)
    # norms are preserved by an unscaled rotation: |moved| == |placed| == scaling * |k|
    torch.testing.assert_close(moved.norm(dim=-1), placed.norm(dim=-1), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(placed.norm(dim=-1), scaling * k.norm(dim=-1), atol=1e-4, rtol=1e-5)
    expected = _hf_rope(rotary, apply_rotary_pos_emb, k, [17, 27, 37, 47])
    torch.testing.assert_close(moved, expected, atol=5e-5, rtol=0)


@pytest.mark.parametrize("rope_type", ["default", "yarn"])
@pytest.mark.parametrize("positions, offsets", CASES)
def test_partial_rotary_shift_equals_transformers(rope_type, positions, offsets):
    """gpt_neox with partial_rotary_factor 0.5 rotates the FIRST half of each head."""
    parameters = {**ROPE_PARAMETERS[rope_type], "partial_rotary_factor": 0.5}
    rotary = _neox_rotary(parameters)
    table = RopeTable.from_inv_freq(rotary.inv_freq, HEAD_DIM)
    assert table.rotary_dim == HEAD_DIM // 2
    k = _keys(2)
    placed = _hf_rope(rotary, neox_apply_rotary_pos_emb, k, positions)
    moved = rotate_by(placed, torch.tensor(offsets), table)
    target = [p + d for p, d in zip(positions, offsets)]
    expected = _hf_rope(rotary, neox_apply_rotary_pos_emb, k, target)
    torch.testing.assert_close(moved, expected, atol=_tolerance(positions + target), rtol=0)
    # the pass-through channels are the last ones and never change
    assert torch.equal(moved[..., HEAD_DIM // 2 :], k[..., HEAD_DIM // 2 :])


@pytest.mark.parametrize("rope_type", list(ROPE_PARAMETERS))
def test_rotate_then_back_is_identity(rope_type):
    table = _llama(rope_type).rope
    x = _keys(3, tokens=5)
    d = torch.tensor([0, 1, 37, 3000, 5000])
    back = rotate_by(rotate_by(x, d, table), -d, table)
    torch.testing.assert_close(back, x, atol=2e-6, rtol=1e-6)


@pytest.mark.parametrize("rope_type", list(ROPE_PARAMETERS))
def test_composition(rope_type):
    table = _llama(rope_type).rope
    x = _keys(4, tokens=5)
    a = torch.tensor([0, 3, 1000, 3000, -200])
    b = torch.tensor([5, 0, 2500, 5000, 7000])
    torch.testing.assert_close(
        rotate_by(rotate_by(x, a, table), b, table), rotate_by(x, a + b, table), atol=2e-6, rtol=1e-6
    )
    # R(a) R(b) = R(b) R(a)
    torch.testing.assert_close(
        rotate_by(rotate_by(x, a, table), b, table),
        rotate_by(rotate_by(x, b, table), a, table),
        atol=2e-6,
        rtol=1e-6,
    )


def test_rotation_by_zero_is_exact_identity():
    table = _llama("default").rope
    x = _keys(5)
    assert torch.equal(rotate_by(x, torch.tensor(0), table), x)


def test_default_rope_is_not_in_rope_init_functions():
    """Trap: transformers has no "default" entry; the default rope is the model's own function."""
    assert "default" not in ROPE_INIT_FUNCTIONS
    lm = _llama("default")
    assert lm.config.rope_parameters["rope_type"] == "default"
    table = rope_table(lm.model)
    theta = ROPE_PARAMETERS["default"]["rope_theta"]
    expected = 1.0 / theta ** (torch.arange(0, HEAD_DIM, 2, dtype=torch.float64) / HEAD_DIM)
    assert table.head_dim == HEAD_DIM and table.rotary_dim == HEAD_DIM
    assert table.inv_freq.dtype == torch.float64
    torch.testing.assert_close(table.inv_freq, expected, atol=0, rtol=1e-6)
    torch.testing.assert_close(table.inv_freq, lm.model.base_model.rotary_emb.inv_freq.double())
