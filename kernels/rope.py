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

    def rotation(
        self, offsets: torch.Tensor, dtype: torch.dtype, device: torch.device | str = "cpu"
    ) -> "Rotation":
        """The rotation by integer ``offsets`` (shape ``[*offsets.shape, head_dim]``)."""
        return Rotation.from_cos_sin(*self.cos_sin(offsets, dtype, device), self.head_dim)


@dataclass(frozen=True)
class Rotation:
    """A rotation by per-row offsets, prepared once per step and applied by every layer.

    ``apply(x) = x * cos + swap(x) * sin``: ``swap`` exchanges the two rotary halves of each head
    and ``sin`` carries the sign of ``rotate_half``; channels beyond the rotary ones have cos 1 and
    sin 0, so partial rotary needs no separate path.
    """

    cos: torch.Tensor  # [..., head_dim]
    sin: torch.Tensor  # [..., head_dim], signed
    swap: torch.Tensor | None  # [head_dim] channel permutation (partial rotary), None: a roll

    @classmethod
    def from_cos_sin(cls, cos: torch.Tensor, sin: torch.Tensor, head_dim: int) -> "Rotation":
        rotary_dim, half = cos.shape[-1], cos.shape[-1] // 2
        pad = head_dim - rotary_dim
        ones, zeros = cos.new_ones(*cos.shape[:-1], pad), sin.new_zeros(*sin.shape[:-1], pad)
        signed = torch.cat((-sin[..., :half], sin[..., half:], zeros), dim=-1)
        swap = None
        if pad:
            swap = torch.cat((torch.arange(half, rotary_dim), torch.arange(half),
                              torch.arange(rotary_dim, head_dim))).to(cos.device)
        return cls(torch.cat((cos, ones), dim=-1), signed, swap)

    def apply(self, x: torch.Tensor) -> torch.Tensor:
        if self.swap is None:  # full rotary: the swap is a roll by half a head
            swapped = x.roll(x.shape[-1] // 2, dims=-1)
        else:
            swapped = x.index_select(-1, self.swap)
        return torch.addcmul(x * self.cos, swapped, self.sin)

    def rows(self, index: slice) -> "Rotation":
        """The rotation of a slice of rows (first dimension)."""
        return Rotation(self.cos[index], self.sin[index], self.swap)


def rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate the first ``cos.shape[-1]`` channels of ``x`` (broadcasting cos/sin); pass the rest."""
    return Rotation.from_cos_sin(cos, sin, x.shape[-1]).apply(x)


def rotate_by(x: torch.Tensor, offsets: torch.Tensor, table: RopeTable) -> torch.Tensor:
    """Rotate ``x`` (``[..., head_dim]``) by ``offsets`` (broadcastable to ``x.shape[:-1]``)."""
    return table.rotation(offsets, x.dtype, x.device).apply(x)
