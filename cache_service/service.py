"""The CacheService: authoritative prompt + committed history and the token log of one session.

A plain class; the cluster runs it as a Ray actor with no GPU and a fraction of a CPU. Rank 0 of
the worker actors pushes what it writes as ``Wrote``/``Committed`` records, fire-and-forget and in
batches, so the service is never on the step's critical path. Blocks whose whole content the
service holds are *mirrored* (the prompt, layout headers, the common history); a block that is
written by decode steps (a worker's current step) is *live*: only its token ids are logged here,
and its K/V is taken from a worker replica when a snapshot is saved (it is short, bounded by a step).
"""

from __future__ import annotations

from dataclasses import dataclass
import torch

from cache_service.snapshot import BlockState, KVSnapshot, SnapshotError, write_file


@dataclass(frozen=True)
class Wrote:
    """``tokens`` were appended to ``block``; ``entries`` (their K/V) when the block is mirrored,
    ``None`` when it is live (the service drops its copy and logs the tokens only)."""

    block: int
    tokens: list[int]
    entries: torch.Tensor | None = None


@dataclass(frozen=True)
class Committed:
    """Block ``step`` was appended to ``into`` and emptied; ``entries``: the appended (rotated) K/V
    when ``into`` is mirrored, else ``None`` (``into`` becomes live)."""

    step: int
    into: int
    entries: torch.Tensor | None = None


Record = Wrote | Committed


class CacheService:
    """Holds mirrored blocks' K/V and every block's token ids; writes and reads snapshots."""

    def __init__(self) -> None:
        self.entries: dict[int, torch.Tensor] = {}  # mirrored blocks only
        self.tokens: dict[int, list[int]] = {}

    def ping(self) -> bool:
        return True

    def clear(self) -> None:
        """Forget everything (the workers started a fresh cache)."""
        self.entries, self.tokens = {}, {}

    # ---- records -----------------------------------------------------------------------------
    def apply(self, records: list[Record]) -> None:
        """Apply pushed records in order."""
        for record in records:
            if isinstance(record, Wrote):
                self._wrote(record)
            else:
                self._committed(record)

    def _wrote(self, r: Wrote) -> None:
        self.tokens.setdefault(r.block, []).extend(r.tokens)
        self._extend(r.block, r.entries)

    def _committed(self, r: Committed) -> None:
        self.tokens.setdefault(r.into, []).extend(self.tokens.get(r.step, []))
        self.tokens[r.step] = []
        self.entries.pop(r.step, None)
        self._extend(r.into, r.entries)

    def _extend(self, block: int, entries: torch.Tensor | None) -> None:
        if entries is None:
            self.entries.pop(block, None)
        elif block in self.entries:
            self.entries[block] = torch.cat((self.entries[block], entries), dim=3)
        else:
            self.entries[block] = entries

    # ---- queries -----------------------------------------------------------------------------
    def block_tokens(self, block: int) -> list[int]:
        """Token ids written into ``block`` so far (commits move them to the target block)."""
        return list(self.tokens.get(block, []))

    def mirrored(self) -> dict[int, int]:
        """Mirrored blocks and their lengths."""
        return {b: e.shape[3] for b, e in self.entries.items()}

    # ---- snapshots ---------------------------------------------------------------------------
    def snapshot(self, live: dict[int, BlockState], spans: dict[int, tuple[int, int]], next_block: int,
                 meta: dict) -> bytes:
        """A full cache snapshot: mirrored blocks from here, ``live`` ones from a worker replica.
        ``spans``: every block's (length, capacity) in that replica, to check both agree."""
        blocks = {}
        for b, (length, capacity) in spans.items():
            state = live.get(b) or self._mirrored_state(b, capacity)
            if state.entries.shape[3] != length:
                raise SnapshotError(f"block {b} has {state.entries.shape[3]} tokens here but {length} in the "
                                    "replica; sync the worker's records before saving")
            state.tokens = self.block_tokens(b)
            blocks[b] = state
        return KVSnapshot(blocks, next_block, meta).to_bytes()

    def save(self, path: str, live: dict[int, BlockState], spans: dict[int, tuple[int, int]], next_block: int,
             meta: dict) -> str:
        """Write a snapshot file on this actor's node; returns its path."""
        return str(write_file(path, self.snapshot(live, spans, next_block, meta)))

    def _mirrored_state(self, block: int, capacity: int) -> BlockState:
        if block not in self.entries:
            raise SnapshotError(f"block {block} is neither mirrored here nor sent live; "
                                "send every block the service does not mirror")
        return BlockState(self.entries[block], capacity)

    def load(self, blob: bytes) -> dict:
        """Adopt a snapshot (every block becomes mirrored); returns its metadata."""
        snapshot = KVSnapshot.from_bytes(blob)
        self.entries = {b: s.entries for b, s in snapshot.blocks.items()}
        self.tokens = {b: list(s.tokens) for b, s in snapshot.blocks.items()}
        return snapshot.meta
