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
from kernels.attention import AttentionPlan, block_attention, write_new_entries

ATTENTION_NAME = "hogwild"

# exchange(layer, k_new, v_new) -> (k, v) for every row of the step (identity on one device)
Exchange = Callable[[int, torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]


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
    layer = module.layer_idx
    if hogwild.exchange is not None:
        key, value = hogwild.exchange(layer, key, value)
    kv = hogwild.store.arena[layer]
    write_new_entries(kv, key, value, hogwild.plan)
    scale = scaling if scaling is not None else query.shape[-1] ** -0.5
    return block_attention(query, kv, hogwild.plan, scale), None


AttentionInterface.register(ATTENTION_NAME, hogwild_attention)
