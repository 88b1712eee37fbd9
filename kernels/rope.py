"""Rotary position embedding (RoPE) as rotations by a position *offset*.

A key or query that was rotated to position p by the model can be moved to position p + d by one more
rotation by d, because RoPE rotations compose: R(d) R(p) = R(p + d). The inverse frequencies come from
the model's own rope initialisation (transformers computes them); this module only applies them.

Conventions (those of the llama family in transformers): the first ``rotary_dim`` channels of a head
are rotated, split in two halves (``rotate_half``); the remaining channels pass through. Rotations
here are *unscaled*: the model's cos/sin carry ``attention_scaling`` (yarn), which is already inside
any query or key the model produced, so applying it again would count it twice.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class RopeTable:
    """Inverse frequencies of one model's RoPE, kept in float64 so large offsets stay exact."""

    inv_freq: torch.Tensor  # [rotary_dim // 2], float64
    head_dim: int

    def __post_init__(self) -> None:
        if self.inv_freq.ndim != 1:
            raise ValueError(f"inv_freq must be 1-D, got shape {tuple(self.inv_freq.shape)}")
        if 2 * self.inv_freq.numel() > self.head_dim:
            raise ValueError(
                f"rotary_dim {2 * self.inv_freq.numel()} is larger than head_dim {self.head_dim}"
            )

    @classmethod
    def from_inv_freq(cls, inv_freq: torch.Tensor, head_dim: int) -> "RopeTable":
        return cls(inv_freq.detach().to(device="cpu", dtype=torch.float64), head_dim)

    @property
    def rotary_dim(self) -> int:
        return 2 * self.inv_freq.numel()

    def cos_sin(
        self, offsets: torch.Tensor, dtype: torch.dtype, device: torch.device | str = "cpu"
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """cos/sin of shape ``[*offsets.shape, rotary_dim]`` for rotations by integer ``offsets``."""
        angles = offsets.to(device="cpu", dtype=torch.float64)[..., None] * self.inv_freq
        angles = torch.cat((angles, angles), dim=-1)
        return angles.cos().to(device, dtype), angles.sin().to(device, dtype)


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate the first ``cos.shape[-1]`` channels of ``x`` (broadcasting cos/sin); pass the rest."""
    rotary_dim = cos.shape[-1]
    if rotary_dim == x.shape[-1]:
        return x * cos + rotate_half(x) * sin
    head, tail = x[..., :rotary_dim], x[..., rotary_dim:]
    return torch.cat((head * cos + rotate_half(head) * sin, tail), dim=-1)


def rotate_by(x: torch.Tensor, offsets: torch.Tensor, table: RopeTable) -> torch.Tensor:
    """Rotate ``x`` (``[..., head_dim]``) by ``offsets`` (broadcastable to ``x.shape[:-1]``)."""
    cos, sin = table.cos_sin(offsets, x.dtype, x.device)
    return rotate(x, cos, sin)
