"""Views: a worker's layout of the shared cache is data, an ordered tuple of block ids."""

from __future__ import annotations

from dataclasses import dataclass

from cache_service.errors import LayoutError


@dataclass(frozen=True)
class View:
    """Blocks a row attends to, in view order; new tokens are written to ``target``."""

    blocks: tuple[int, ...]
    target: int

    def __post_init__(self) -> None:
        object.__setattr__(self, "blocks", tuple(int(b) for b in self.blocks))
        if len(set(self.blocks)) != len(self.blocks):
            raise LayoutError(f"a view lists a block twice: {self.blocks}; list each block once")
        if self.target not in self.blocks:
            raise LayoutError(
                f"target block {self.target} is not in the view {self.blocks}; "
                "a row must see the block it writes"
            )

    @classmethod
    def of(cls, *blocks: int) -> "View":
        """View whose target is its last block (the usual case: own step last)."""
        if not blocks:
            raise LayoutError("a view needs at least one block (the one its row writes)")
        return cls(tuple(blocks), blocks[-1])
