"""A naive reference for the Hogwild semantics (DESIGN.md §2), sharing no attention/rope code with
the engine: it keeps every block's keys UN-rotated and, for every row and layer, rotates each visible
key to its view position with the model's own rotary embedding, concatenates the row's view and runs
plain masked softmax attention. Slow and obvious on purpose; tests only.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from transformers import AttentionInterface

from cache_service.layout import View
from workers.model import LoadedModel

NAME = "naive_oracle"


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


class NaiveOracle:
    """Blocks of un-rotated K/V (per layer ``[kv_heads, n, d]``); one forward = one step."""

    def __init__(self, lm: LoadedModel, mode: str = "instant") -> None:
        assert mode in ("instant", "lagged")
        self.lm, self.mode = lm, mode
        self.rotary = lm.model.base_model.rotary_emb
        self.scale2 = float(self.rotary.attention_scaling) ** 2  # cos/sin carry s: R_s = s * R
        self.layers = lm.config.num_hidden_layers
        self.blocks: dict[int, list[tuple[torch.Tensor, torch.Tensor]]] = {}

    # ---- blocks ------------------------------------------------------------------------------
    def add_block(self, block: int) -> None:
        kvh, d = self.lm.config.num_key_value_heads, self.lm.rope.head_dim
        empty = torch.zeros(kvh, 0, d, dtype=self.lm.dtype)
        self.blocks[block] = [(empty, empty) for _ in range(self.layers)]

    def length(self, block: int) -> int:
        return self.blocks[block][0][0].shape[1]

    def commit(self, step: int, into: int) -> None:
        """Un-rotated keys: committing is plain concatenation."""
        self.blocks[into] = [
            (torch.cat((ki, ks), 1), torch.cat((vi, vs), 1))
            for (ki, vi), (ks, vs) in zip(self.blocks[into], self.blocks[step])
        ]
        self.add_block(step)

    # ---- rope through the model's own rotary embedding (includes attention_scaling) ----------
    def _cos_sin(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        cos, sin = self.rotary(torch.zeros(1, dtype=self.lm.dtype), positions[None])
        return cos[0], sin[0]  # [n, d]

    def _rope(self, x: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        cos, sin = self._cos_sin(positions)
        return x * cos + _rotate_half(x) * sin

    def _unrope(self, x: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        cos, sin = self._cos_sin(positions)  # s*R(-p) (s*R(p) k) = s^2 k
        return (x * cos - _rotate_half(x) * sin) / self.scale2

    # ---- one step ----------------------------------------------------------------------------
    @torch.inference_mode()
    def forward(self, steps: Sequence[tuple[View, Sequence[int]]]) -> list[torch.Tensor]:
        """Teacher-forced step; returns logits ``[T_r, vocab]`` (float32) for every real token."""
        views = [v for v, _ in steps]
        lens = [len(t) for _, t in steps]
        targets = [v.target for v in views]
        assert len(set(targets)) == len(targets) and min(lens) >= 1
        before = {b: self.length(b) for b in targets}

        def visible(r: int, b: int) -> int:
            if b == targets[r]:
                return before[b] + lens[r]
            if b in targets:
                return before[b] + (lens[targets.index(b)] if self.mode == "instant" else 0)
            return self.length(b)

        # view offsets per row, and the model's positions of every (padded) token
        offsets = []
        for r, view in enumerate(views):
            at, off = 0, {}
            for b in view.blocks:
                off[b] = at
                at += visible(r, b)
            offsets.append(off)
        width = max(lens)
        ids = torch.tensor([list(t) + [0] * (width - len(t)) for _, t in steps])
        pos = torch.tensor([[offsets[r][targets[r]] + before[targets[r]] + min(j, lens[r] - 1)
                             for j in range(width)] for r in range(len(steps))])
        state = dict(visible=visible, offsets=offsets, views=views, targets=targets,
                     before=before, lens=lens, pos=pos, new={})
        model = self.lm.model
        model.set_attn_implementation(NAME)
        try:
            hidden = model.base_model(input_ids=ids, position_ids=pos, use_cache=False,
                                      oracle=(self, state)).last_hidden_state
        finally:
            model.set_attn_implementation("hogwild")
        for b, per_layer in state["new"].items():  # store the step's real tokens, un-rotated
            self.blocks[b] = [(torch.cat((k0, k), 1), torch.cat((v0, v), 1))
                              for (k0, v0), (k, v) in zip(self.blocks[b], per_layer)]
        head = model.get_output_embeddings()
        return [head(hidden[r, : lens[r]]).float() for r in range(len(steps))]

    def _attention(self, layer: int, q, k, v, scaling: float, s: dict) -> torch.Tensor:
        """``q`` ``[R, H, T, d]`` and ``k`` rotated by the model at ``s['pos']``; out ``[R, T, H, d]``."""
        lens, targets, before = s["lens"], s["targets"], s["before"]
        new = {}  # block -> (k, v) of this step's real tokens, un-rotated
        for r, b in enumerate(targets):
            n = lens[r]
            new[b] = (self._unrope(k[r, :, :n], s["pos"][r, :n]), v[r, :, :n])
            s["new"].setdefault(b, []).append(new[b])

        rows, heads, width, _ = q.shape
        group = heads // k.shape[1]
        out = []
        for r, view in enumerate(s["views"]):
            keys, values, allowed = [], [], []
            for b in view.blocks:
                n = s["visible"](r, b)
                kb, vb = self.blocks[b][layer]
                if b in new:
                    kb, vb = torch.cat((kb, new[b][0]), 1), torch.cat((vb, new[b][1]), 1)
                kb, vb = kb[:, :n], vb[:, :n]
                keys.append(self._rope(kb, s["offsets"][r][b] + torch.arange(n)))
                values.append(vb)
                i = torch.arange(n)[None, :]
                if b == targets[r]:  # causal inside the own block (padded queries = last real one)
                    j = torch.arange(width).clamp(max=lens[r] - 1)[:, None]
                    allowed.append(i <= before[b] + j)
                else:
                    allowed.append(torch.ones(width, n, dtype=torch.bool))
            kr = torch.cat(keys, 1).repeat_interleave(group, 0)  # [H, L, d]
            vr = torch.cat(values, 1).repeat_interleave(group, 0)
            mask = torch.zeros(width, kr.shape[1]).masked_fill(~torch.cat(allowed, 1), float("-inf"))
            scores = q[r] @ kr.transpose(1, 2) * scaling + mask  # [H, T, L]
            out.append((torch.softmax(scores.float(), -1).to(vr.dtype) @ vr).transpose(0, 1))
        return torch.stack(out)


def _naive_attention(module, query, key, value, attention_mask, scaling=None, oracle=None, **kwargs):
    me, state = oracle
    scaling = scaling if scaling is not None else query.shape[-1] ** -0.5
    return me._attention(module.layer_idx, query, key, value, scaling, state), None


AttentionInterface.register(NAME, _naive_attention)
