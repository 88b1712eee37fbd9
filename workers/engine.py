"""The single-device Hogwild engine: many rows (workers) stepping over one shared block store."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from cache_service.errors import ConfigError, HogwildError, LayoutError
from cache_service.kv_store import KVStore, PoolConfig
from cache_service.layout import View
from cache_service.planner import DIRECT_MIN_TOKENS, Mode, Row, overlap_min_tokens, plan_step
from workers.hook import ATTENTION_NAME, Exchange, StepContext
from workers.model import LoadedModel

Step = tuple[View, Sequence[int]]  # (view, new tokens written to view.target)


def pool_tokens(lm: LoadedModel, pool: PoolConfig) -> int:
    """Tokens of the KV pool ``pool`` gives an engine of ``lm`` on its device."""
    config = lm.config
    per_token = 2 * config.num_hidden_layers * config.num_key_value_heads * lm.rope.head_dim * lm.dtype.itemsize
    return pool.tokens_for(per_token, lm.device)


class HogwildEngine:
    """Owns one model replica and its KV pool; every method is one step of the contract.

    The pool is allocated here, once, sized by ``pool`` (a ``PoolConfig``); a request it cannot
    hold raises ``PoolExhaustedError`` before anything is written, and the engine stays usable.
    """

    def __init__(
        self,
        lm: LoadedModel,
        *,
        mode: Mode | str = Mode.INSTANT,
        pool: PoolConfig | None = None,
        direct_min: int = DIRECT_MIN_TOKENS,
        overlap_min: int | None = None,
    ) -> None:
        config = lm.config
        head_dim = lm.rope.head_dim
        self.lm = lm
        self.mode = Mode.parse(mode)
        self.direct_min = direct_min
        self.overlap_min = overlap_min_tokens(lm.device) if overlap_min is None else overlap_min
        self.group = config.num_attention_heads // config.num_key_value_heads
        pool = pool or PoolConfig()
        self.store = KVStore(config.num_hidden_layers, config.num_key_value_heads, head_dim,
                             tokens=pool_tokens(lm, pool), page_size=pool.page_size,
                             dtype=lm.dtype, device=lm.device)

    def clear(self, mode: Mode | str | None = None) -> None:
        """Free every block (the pool stays allocated), optionally switching the mode."""
        self.store.clear()
        if mode is not None:
            self.mode = Mode.parse(mode)

    # ---- blocks ------------------------------------------------------------------------------
    def new_block(self, reserve: int = 0) -> int:
        return self.store.new_block(reserve)

    def length(self, block: int) -> int:
        return self.store.length(block)

    def free(self, block: int) -> None:
        self.store.free(block)

    def commit(self, step_block: int, into: int) -> None:
        """Append a finished step to ``into`` (one rotation of its keys) and empty the step block."""
        self.store.append_block(step_block, into, self.lm.rope)

    # ---- forward -----------------------------------------------------------------------------
    @torch.inference_mode()
    def forward(
        self,
        steps: Sequence[Step],
        *,
        all_logits: bool = False,
        local: range | None = None,
        exchange: Exchange | None = None,
        modes: Sequence[Mode | str] | None = None,
    ) -> torch.Tensor | list[torch.Tensor]:
        """Write each step's tokens into its target block, attending through its view.

        Returns next-token logits ``[rows, vocab]`` (float32) for the last token of each row, or with
        ``all_logits`` a list of ``[tokens, vocab]`` per row. ``modes``: one per row (rows of several
        sessions), else the engine's mode for all.

        Multi-device use: ``local`` are the rows computed here (logits are returned for them only);
        with ``exchange`` every layer receives all rows' new entries from it and stores them all
        (instant; a history of ``overlap_min`` tokens or more is scored while they travel); without
        it only the local rows' entries are stored, and the caller must store the others' after the
        step (``store.write_entries``; lagged). Every block length advances.
        """
        self._check_attention()
        rows = [Row(view, len(tokens)) for view, tokens in steps]
        local = range(len(rows)) if local is None else local
        self.store.reserve_many({row.view.target: row.tokens for row in rows})
        try:
            mode = self.mode if modes is None else [Mode.parse(m) for m in modes]
            planned = plan_step(self.store, rows, mode, self.lm.rope, group=self.group,
                                direct_min=self.direct_min, local=local, overlap_min=self.overlap_min,
                                write_remote=exchange is not None or len(local) == len(rows))
            self._check_context(planned.view_length)
        except HogwildError:  # a refused step keeps no pages
            for row in rows:
                self.store.truncate(row.view.target, self.store.length(row.view.target))
            raise
        plan, device = planned.plan, self.lm.device
        mine = rows[local.start : local.stop]
        ids = torch.tensor([[t for _, tokens in steps[local.start : local.stop] for t in tokens]], device=device)
        out = self.lm.model.base_model(
            input_ids=ids,
            position_ids=planned.positions,
            use_cache=False,
            hogwild=StepContext(self.store, plan, exchange),
        )
        for row in rows:
            self.store.block(row.view.target).length += row.tokens
        hidden = out.last_hidden_state[0]  # [packed tokens, hidden]
        head = self.lm.model.get_output_embeddings()
        ends = torch.tensor([r.tokens for r in mine]).cumsum(0)
        if all_logits:
            return [head(hidden[end - r.tokens : end]).float() for r, end in zip(mine, ends.tolist())]
        return head(hidden[(ends - 1).to(device)]).float()

    def prefill(self, block: int, tokens: Sequence[int], context: Sequence[int] = ()) -> torch.Tensor:
        """Encode ``tokens`` into ``block`` after the blocks of ``context``; last-token logits."""
        if not tokens:
            raise ConfigError("prefill needs at least one token")
        return self.forward([(View((*context, block), block), tokens)])[0]

    def _check_attention(self) -> None:
        current = self.lm.config._attn_implementation
        if current != ATTENTION_NAME:
            raise HogwildError(
                f"the model's attention is {current!r}, so the engine's cache would be bypassed; "
                f"call model.set_attn_implementation({ATTENTION_NAME!r}) before using the engine"
            )

    def _check_context(self, longest: int) -> None:
        if longest > self.lm.max_context:
            raise LayoutError(
                f"a view reached {longest} tokens, beyond the model's context of "
                f"{self.lm.max_context}; use a smaller budget or fewer workers"
            )
