"""Each trap of DESIGN §2 (transformers 5.x and the reference code) as a test that catches it."""

from __future__ import annotations

import contextlib

import pytest
import torch
from transformers import AttentionInterface, AutoConfig
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask
from transformers.models.gpt_neox.configuration_gpt_neox import GPTNeoXConfig
from transformers.models.gpt_neox.modeling_gpt_neox import GPTNeoXRotaryEmbedding
from transformers.models.gpt_neox.modeling_gpt_neox import (
    apply_rotary_pos_emb as neox_apply_rotary_pos_emb,
)
from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

from cache_service.errors import HogwildError, UnsupportedError
from kernels.rope import RopeTable, rotate, rotate_by
from tests.conftest import tiny_model
from workers.model import SUPPORTED_FAMILIES, check_dtype, check_supported, load_model, tiny_config

PROBE = "hogwild_test_probe"
PROBE_MASKED = "hogwild_test_probe_masked"
_calls: list[dict] = []


def _probe(module, query, key, value, attention_mask, scaling=None, **kwargs):
    _calls.append(
        dict(layer=module.layer_idx, query=query, key=key, value=value, mask=attention_mask, kwargs=kwargs)
    )
    batch, heads, tokens, dim = query.shape
    return torch.zeros(batch, tokens, heads, dim, dtype=query.dtype), None


AttentionInterface.register(PROBE, _probe)
AttentionInterface.register(PROBE_MASKED, _probe)
AttentionMaskInterface.register(PROBE_MASKED, sdpa_mask)  # the contrast: a name with a mask function

INPUT_IDS = torch.tensor([[5, 17, 3, 99, 42]])
POSITION_IDS = torch.tensor([[7, 8, 40, 41, 1000]])  # not 0..T-1: proves ours are used


@contextlib.contextmanager
def _attention(lm, name: str):
    lm.model.set_attn_implementation(name)
    _calls.clear()
    try:
        yield _calls
    finally:
        lm.model.set_attn_implementation("hogwild")
        _calls.clear()


def _raw_projections(lm, layer: int):
    """Forward hooks capturing un-rotated q and k ([1, heads, T, d]) of one layer."""
    attn = lm.model.base_model.layers[layer].self_attn
    head_dim = lm.rope.head_dim
    captured: dict[str, torch.Tensor] = {}

    def hook(name):
        def fn(_module, _inputs, output):
            captured[name] = output.reshape(*output.shape[:2], -1, head_dim).transpose(1, 2)

        return fn

    # qwen3 normalises q/k per head before the rotation: the raw vectors are the norms' outputs
    q_mod = getattr(attn, "q_norm", None) or attn.q_proj
    k_mod = getattr(attn, "k_norm", None) or attn.k_proj
    handles = [q_mod.register_forward_hook(hook("q")), k_mod.register_forward_hook(hook("k"))]
    return captured, handles


# ---- (a) q and k are rotated at our position_ids before the attention function ----------------
@pytest.mark.parametrize("family", SUPPORTED_FAMILIES)
def test_attention_function_receives_keys_rotated_at_our_positions(family):
    lm = tiny_model(family)
    captured, handles = _raw_projections(lm, layer=1)
    try:
        with _attention(lm, PROBE) as calls, torch.no_grad():
            lm.model.base_model(input_ids=INPUT_IDS, position_ids=POSITION_IDS, use_cache=False)
            call = next(c for c in calls if c["layer"] == 1)
    finally:
        for h in handles:
            h.remove()
    q_raw, k_raw = captured["q"], captured["k"]
    assert call["key"].shape == k_raw.shape
    # transformers' own rope at our position_ids ...
    cos, sin = lm.model.base_model.rotary_emb(k_raw, POSITION_IDS)
    q_expected, k_expected = apply_rotary_pos_emb(q_raw, k_raw, cos, sin)
    torch.testing.assert_close(call["key"], k_expected, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(call["query"], q_expected, atol=1e-6, rtol=1e-6)
    # ... which is our rotation by the absolute position (default rope: no attention scaling)
    ours = rotate_by(k_raw, POSITION_IDS[0], lm.rope)
    torch.testing.assert_close(call["key"], ours, atol=1e-4, rtol=0)  # fp32 angles at 1000
    # the keys are NOT rotated at 0..T-1 (what a model ignoring position_ids would do)
    default_positions = rotate_by(k_raw, torch.arange(INPUT_IDS.shape[1]), lm.rope)
    assert not torch.allclose(call["key"], default_positions, atol=1e-3)
    # the function gets no cos/sin: it cannot undo or redo the rotation itself
    assert "position_embeddings" not in call["kwargs"]
    assert "cos" not in call["kwargs"] and "sin" not in call["kwargs"]


@pytest.mark.parametrize("family", SUPPORTED_FAMILIES)
def test_model_kwargs_reach_the_attention_function(family):
    """The hook's step context travels as a model kwarg: it must arrive untouched at every layer."""
    lm = tiny_model(family)
    marker = object()
    with _attention(lm, PROBE) as calls, torch.no_grad():
        lm.model.base_model(input_ids=INPUT_IDS, position_ids=POSITION_IDS, use_cache=False, hogwild=marker)
        layers = sorted(c["layer"] for c in calls)
        assert layers == list(range(lm.config.num_hidden_layers))
        assert all(c["kwargs"].get("hogwild") is marker for c in calls)


def test_hogwild_attention_without_context_raises():
    lm = tiny_model("llama")
    with pytest.raises(HogwildError, match="step context"), torch.no_grad():
        lm.model.base_model(input_ids=INPUT_IDS, position_ids=POSITION_IDS, use_cache=False)


# ---- (b) no mask for a function whose name is not registered for mask creation ----------------
@pytest.mark.parametrize("family", SUPPORTED_FAMILIES)
def test_unregistered_attention_function_gets_no_mask(family):
    lm = tiny_model(family)
    with _attention(lm, PROBE) as calls, torch.no_grad():
        lm.model.base_model(input_ids=INPUT_IDS, position_ids=POSITION_IDS, use_cache=False)
        assert calls and all(c["mask"] is None for c in calls)


def test_mask_registered_name_does_get_a_mask():
    """Contrast for (b): registering a mask function under the name makes transformers build one."""
    lm = tiny_model("llama")
    with _attention(lm, PROBE_MASKED) as calls, torch.no_grad():
        lm.model.base_model(
            input_ids=INPUT_IDS,
            position_ids=POSITION_IDS,
            attention_mask=torch.tensor([[0, 1, 1, 1, 1]]),
            use_cache=False,
        )
        assert calls and all(c["mask"] is not None for c in calls)


def test_hogwild_name_is_not_registered_for_masks():
    from workers.hook import ATTENTION_NAME

    assert ATTENTION_NAME in AttentionInterface._global_mapping
    assert ATTENTION_NAME not in AttentionMaskInterface._global_mapping


# ---- (c) rope_parameters replaces rope_scaling -------------------------------------------------
def test_rope_parameters_round_trip(tmp_path):
    parameters = {"rope_type": "yarn", "rope_theta": 10000.0, "factor": 4.0,
                  "original_max_position_embeddings": 512}
    config = tiny_config("llama", rope_parameters=dict(parameters))
    assert config.rope_parameters == parameters
    config.save_pretrained(tmp_path)
    again = AutoConfig.from_pretrained(tmp_path)
    assert again.rope_parameters == parameters
    check_supported(again)


@pytest.mark.parametrize("family", SUPPORTED_FAMILIES)
def test_default_tiny_config_has_rope_parameters(family):
    config = tiny_config(family)
    assert config.rope_parameters["rope_type"] == "default"
    assert config.rope_parameters["rope_theta"] == 10000.0


@pytest.mark.parametrize("legacy_key", ["type", "rope_type"])
def test_legacy_rope_scaling_is_converted(legacy_key):
    config = tiny_config("llama", rope_parameters=None, rope_theta=5000.0,
                         rope_scaling={legacy_key: "linear", "factor": 2.0})
    assert config.rope_parameters["rope_type"] == "linear"
    assert config.rope_parameters["factor"] == 2.0
    assert config.rope_parameters["rope_theta"] == 5000.0
    lm = load_model(config, dtype=torch.float32, device="cpu")
    # the loaded model really uses it: linear scaling divides the default frequencies by the factor
    expected = 1.0 / 5000.0 ** (torch.arange(0, 16, 2, dtype=torch.float64) / 16) / 2.0
    torch.testing.assert_close(lm.rope.inv_freq, expected, atol=0, rtol=1e-6)


def test_legacy_dynamic_rope_scaling_is_rejected():
    config = tiny_config("llama", rope_parameters=None, rope_scaling={"type": "dynamic", "factor": 2.0})
    with pytest.raises(UnsupportedError, match="dynamic"):
        check_supported(config)


# ---- (d) dynamic / longrope are not shift invariant: rejected naming the type ------------------
UNSUPPORTED_ROPE = {
    "dynamic": {"rope_type": "dynamic", "rope_theta": 10000.0, "factor": 2.0},
    "longrope": {"rope_type": "longrope", "rope_theta": 10000.0, "factor": 4.0,
                 "short_factor": [1.0] * 8, "long_factor": [2.0] * 8,
                 "original_max_position_embeddings": 512},
}


@pytest.mark.parametrize("rope_type", list(UNSUPPORTED_ROPE))
def test_unsupported_rope_types_are_rejected(rope_type, tmp_path):
    config = tiny_config("llama", rope_parameters=dict(UNSUPPORTED_ROPE[rope_type]))
    with pytest.raises(UnsupportedError, match=repr(rope_type)):
        check_supported(config)
    with pytest.raises(UnsupportedError, match=repr(rope_type)):
        load_model(config, dtype=torch.float32, device="cpu")
    config.save_pretrained(tmp_path)  # a checkpoint dir is checked before any weights are read
    with pytest.raises(UnsupportedError, match=repr(rope_type)):
        load_model(tmp_path, dtype=torch.float32, device="cpu")


def test_unsupported_family_is_rejected():
    config = GPTNeoXConfig(hidden_size=64, num_attention_heads=4, num_hidden_layers=1, vocab_size=64)
    with pytest.raises(UnsupportedError, match="gpt_neox"):
        check_supported(config)
    with pytest.raises(UnsupportedError, match="gpt_neox"):
        tiny_config("gpt_neox")


# ---- (e) partial rotary rotates the FIRST channels ---------------------------------------------
def test_partial_rotary_rotates_first_channels():
    head_dim = 16
    config = GPTNeoXConfig(hidden_size=64, num_attention_heads=4, rope_parameters={
        "rope_type": "default", "rope_theta": 10000.0, "partial_rotary_factor": 0.5})
    rotary = GPTNeoXRotaryEmbedding(config)
    table = RopeTable.from_inv_freq(rotary.inv_freq, head_dim)
    assert table.rotary_dim == 8
    x = torch.randn(1, 2, 4, head_dim, generator=torch.Generator().manual_seed(0))
    positions = torch.tensor([[3, 50, 400, 2000]])
    ours = rotate_by(x, positions[0], table)
    assert torch.equal(ours[..., 8:], x[..., 8:])  # the last head_dim - rotary_dim pass through
    assert not torch.allclose(ours[..., :8], x[..., :8])
    cos, sin = rotary(x, positions)
    _, theirs = neox_apply_rotary_pos_emb(x, x, cos, sin)
    torch.testing.assert_close(ours, theirs, atol=5e-5, rtol=0)
    # the reference repo's convention (rotate the LAST channels) would differ
    last = torch.cat((x[..., :8], rotate(x[..., 8:], *table.cos_sin(positions[0], x.dtype))), dim=-1)
    assert not torch.allclose(last, theirs, atol=1e-2)


def test_rotate_with_full_width_tables_matches_rotate_half():
    x = torch.randn(1, 2, 3, 16, generator=torch.Generator().manual_seed(1))
    table = RopeTable.from_inv_freq(1.0 / 10000.0 ** (torch.arange(0, 16, 2) / 16), 16)
    cos, sin = table.cos_sin(torch.tensor([1, 2, 3]), torch.float32)
    _, expected = apply_rotary_pos_emb(x, x, cos[None], sin[None])
    torch.testing.assert_close(rotate(x, cos, sin), expected)


def test_partial_rotary_on_llama_family_is_rejected():
    """llama-family attention rotates whole heads: a partial factor there would be silently wrong."""
    config = tiny_config("llama", rope_parameters={
        "rope_type": "default", "rope_theta": 10000.0, "partial_rotary_factor": 0.5})
    with pytest.raises(UnsupportedError, match="partial_rotary_factor"):
        check_supported(config)


def test_rope_table_rejects_rotary_wider_than_head():
    with pytest.raises(ValueError):
        RopeTable.from_inv_freq(torch.ones(9), 16)


# ---- (f) unsupported dtypes --------------------------------------------------------------------
@pytest.mark.parametrize("dtype", [torch.float64, torch.int8])
def test_unsupported_dtype_is_rejected(dtype):
    with pytest.raises(UnsupportedError, match="dtype"):
        check_dtype(dtype)
    with pytest.raises(UnsupportedError, match="dtype"):
        load_model(tiny_config("llama"), dtype=dtype, device="cpu")
