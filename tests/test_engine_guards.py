"""The engine refuses to run where its cache would be silently bypassed."""

import pytest

from cache_service.errors import HogwildError
from cache_service.kv_store import PoolConfig
from cache_service.layout import View
from tests.conftest import tiny_model
from workers.engine import HogwildEngine


def test_forward_refuses_a_model_switched_to_another_attention():
    lm = tiny_model("llama")
    engine = HogwildEngine(lm, pool=PoolConfig(tokens=32))
    block = engine.new_block()
    lm.model.set_attn_implementation("sdpa")
    try:
        with pytest.raises(HogwildError, match="set_attn_implementation"):
            engine.forward([(View.of(block), [1, 2, 3])])
        assert engine.length(block) == 0  # nothing was written
    finally:
        lm.model.set_attn_implementation("hogwild")
    engine.forward([(View.of(block), [1, 2, 3])])
    assert engine.length(block) == 3
