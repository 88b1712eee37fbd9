"""Our attention inside transformers: an ``AttentionInterface`` function named "hogwild".

Llama-family models rotate q and k at the ``position_ids`` we pass and then call the registered
attention function with ``**kwargs`` from the model call, so the step's context travels as the
keyword ``hogwild`` (no global state). The name is not registered for mask creation, so the model
builds no mask: the plan carries ours.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from transformers import AttentionInterface

from cache_service.errors import HogwildError
from cache_service.kv_store import KVStore
from kernels.attention import AttentionPlan, block_attention, pad_rows, write_new_entries

ATTENTION_NAME = "hogwild"

# exchange(layer, k_new, v_new) starts sending this device's new entries of a layer and returns
# ``received``: a call that waits for every row's (k, v) of the step. In between, the layer scores
# the blocks that hold no new entry (the shared history), so the transfer overlaps that work.
Received = Callable[[], tuple[torch.Tensor, torch.Tensor]]
Exchange = Callable[[int, torch.Tensor, torch.Tensor], Received]


@dataclass(frozen=True)
class StepContext:
    """What a layer needs for one step: the store, the plan, how to share new entries."""

    store: KVStore
    plan: AttentionPlan
    exchange: Exchange | None = None


def hogwild_attention(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    scaling: float | None = None,
    hogwild: StepContext | None = None,
    **kwargs,
) -> tuple[torch.Tensor, None]:
    if hogwild is None:
        raise HogwildError(
            "the model runs with the 'hogwild' attention but no step context was passed; "
            "call it through workers.engine.HogwildEngine"
        )
    layer, plan = module.layer_idx, hogwild.plan
    kv = hogwild.store.pool[layer]
    scale = scaling if scaling is not None else query.shape[-1] ** -0.5
    if hogwild.exchange is None:
        write_new_entries(kv, key, value, plan)
        return block_attention(query, kv, plan, scale), None
    received = hogwild.exchange(layer, pad_rows(key, plan), pad_rows(value, plan))
    return block_attention(query, kv, plan, scale, arrive=lambda: write_new_entries(kv, *received(), plan)), None


AttentionInterface.register(ATTENTION_NAME, hogwild_attention)
