"""The CacheService: authoritative prompt + committed history and the token log of one session.

A plain class; the cluster runs it as a Ray actor with no GPU and a fraction of a CPU. Rank 0 of
the worker actors pushes what it writes as ``Wrote``/``Committed`` records, fire-and-forget and in
batches, so the service is never on the step's critical path. Blocks whose whole content the
service holds are *mirrored* (the prompt, layout headers, the common history); a block that is
written by decode steps (a worker's current step) is *live*: only its token ids are logged here,
and its K/V is taken from a worker replica when a snapshot is saved (it is short, bounded by a step).

Appending is O(new entries): a mirrored block is a list of chunks, concatenated only when a
snapshot reads it (and kept concatenated). ``Progress`` records carry what a session needs to
resume beyond the cache (see ``RunState``); the latest one goes into every snapshot's metadata.

A gang of actors hosting many sessions (``cluster.gang``) pushes a ``Checkpoint`` record now and
then, in order with its writes: the service then holds a consistent snapshot of the sessions it
names (their blocks: mirrored ones from here, live ones sent along; their run states in the
metadata). A replacement gang restores from it (``checkpoint_blob``) instead of recomputing the
sessions, and with ``configure(path)`` the service also writes it to a file every ``every_s``
seconds, to restore from when the service itself is lost.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch

from cache_service.snapshot import BlockState, KVSnapshot, SnapshotError, read_file, write_file


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


@dataclass(frozen=True)
class Progress:
    """The session's resumable state at a decode-step boundary (replaces the previous one): a
    msgpack-able ``RunState.to_dict()``."""

    state: dict


@dataclass(frozen=True)
class Checkpoint:
    """A consistent cut of a gang's cache, applied in order with the writes before it. ``blocks``:
    the blocks to keep in the snapshot, by id, with (length, reserved tokens); ``live``: the K/V of
    those among them the service does not mirror (from rank 0's replica; mirrored from then on, so
    a long block is sent whole once, e.g. a prompt that began with shared pages); ``keep``: every block the
    replica holds (the service forgets the others: sessions that ended); ``next_block``: the
    replica's next block id; ``meta``: msgpack-able (the sessions' run states)."""

    blocks: dict[int, tuple[int, int]]
    live: dict[int, BlockState]
    keep: list[int]
    next_block: int
    meta: dict = field(default_factory=dict)


Record = Wrote | Committed | Progress | Checkpoint


@dataclass
class RunState:
    """What a session needs to resume besides the cache's blocks (prompt, committed history and
    every worker's unfinished step are blocks with their token ids): the decode steps done, the
    protocol's run state (its block table and each worker's step number, unwritten input, counters:
    plain data from the program), and each worker's sampling generator state (``torch.Generator.
    get_state()`` bytes), all at the same decode-step boundary."""

    steps: int
    protocol: dict
    rng: dict[int, bytes]

    def to_dict(self) -> dict:
        return {"steps": self.steps, "protocol": self.protocol, "rng": {str(w): s for w, s in self.rng.items()}}

    @classmethod
    def from_dict(cls, data: dict) -> "RunState":
        try:
            return cls(int(data["steps"]), dict(data["protocol"]),
                       {int(w): bytes(s) for w, s in data["rng"].items()})
        except (KeyError, TypeError, ValueError) as err:
            raise SnapshotError(f"the snapshot's run state is malformed ({err!r}); the file is damaged") from None


class CacheService:
    """Holds mirrored blocks' K/V and every block's token ids; writes and reads snapshots."""

    def __init__(self) -> None:
        self.chunks: dict[int, list[torch.Tensor]] = {}  # mirrored blocks only, in append order
        self.lengths: dict[int, int] = {}
        self.tokens: dict[int, list[int]] = {}
        self.run: dict | None = None  # the latest ``Progress`` state
        self.applied = 0  # records applied (a pusher's back-pressure and tests read it)
        self.cut: tuple | None = None  # the latest ``Checkpoint``: (blocks, next_block, meta), tensors held
        self.cut_blob: bytes | None = None  # ... as a snapshot, once built (or the one loaded)
        self.checkpoints = 0
        self.path: str | None = None  # where checkpoints are written (``configure``)
        self.every_s = 0.0
        self.written_at: float | None = None
        self.written = 0  # checkpoint files written
        self.write_error: str | None = None  # why the last write failed

    def ping(self) -> bool:
        return True

    def clear(self) -> None:
        """Forget everything (the workers started a fresh cache)."""
        self.chunks, self.lengths, self.tokens, self.run = {}, {}, {}, None

    # ---- records -----------------------------------------------------------------------------
    def apply(self, records: list[Record]) -> int:
        """Apply pushed records in order; returns how many were applied so far."""
        for record in records:
            if isinstance(record, Wrote):
                self._wrote(record)
            elif isinstance(record, Committed):
                self._committed(record)
            elif isinstance(record, Checkpoint):
                self._checkpoint(record)
            else:
                self.run = record.state
        self.applied += len(records)
        return self.applied

    def _wrote(self, r: Wrote) -> None:
        self.tokens.setdefault(r.block, []).extend(r.tokens)
        self._extend(r.block, r.entries)

    def _committed(self, r: Committed) -> None:
        self.tokens.setdefault(r.into, []).extend(self.tokens.get(r.step, []))
        self.tokens[r.step] = []
        self.chunks.pop(r.step, None)
        self.lengths.pop(r.step, None)
        self._extend(r.into, r.entries)

    def _extend(self, block: int, entries: torch.Tensor | None) -> None:
        """Append a chunk (O(its size): no copy of what the block already holds)."""
        if entries is None:
            self.chunks.pop(block, None)
            self.lengths.pop(block, None)
        else:
            self.chunks.setdefault(block, []).append(entries)
            self.lengths[block] = self.lengths.get(block, 0) + entries.shape[3]

    def entries(self, block: int) -> torch.Tensor:
        """A mirrored block's K/V, concatenated once (later reads reuse it)."""
        chunks = self.chunks[block]
        if len(chunks) > 1:
            chunks[:] = [torch.cat(chunks, dim=3)]
        return chunks[0]

    # ---- checkpoints (a gang's sessions) -----------------------------------------------------
    def configure(self, path: str | None, every_s: float = 10.0) -> None:
        """Write each checkpoint to ``path`` (atomically), at most every ``every_s`` seconds."""
        self.path, self.every_s, self.written_at = path, every_s, None

    def _checkpoint(self, r: Checkpoint) -> None:
        keep = set(r.keep)
        for table in (self.chunks, self.lengths, self.tokens):
            for block in [b for b in table if b not in keep]:
                del table[block]
        for b, state in r.live.items():  # sent whole: mirrored from here on (the sender marks them so too)
            self.chunks[b], self.lengths[b] = [state.entries], state.entries.shape[3]
        blocks = {}
        for b, (length, capacity) in r.blocks.items():
            if b in self.chunks:
                parts = list(self.chunks[b])  # the tensors are never changed in place: holding them is enough
            else:
                return  # not consistent (e.g. the records before it were lost): keep the previous one
            if sum(p.shape[3] for p in parts) != length:
                return
            blocks[b] = (parts, capacity, list(self.tokens.get(b, [])))
        self.cut, self.cut_blob = (blocks, r.next_block, r.meta), None
        self.checkpoints += 1
        now = time.monotonic()
        if self.path and (self.written_at is None or now - self.written_at >= self.every_s):
            try:
                write_file(self.path, self.checkpoint_blob())
                self.written_at, self.written, self.write_error = now, self.written + 1, None
            except SnapshotError as err:  # the sessions go on; a lost service then cannot restore
                self.written_at, self.write_error = now, str(err)

    def checkpoint_blob(self) -> bytes | None:
        """The latest checkpoint (or the snapshot loaded last) as snapshot bytes; None when there is none."""
        if self.cut_blob is None and self.cut is not None:
            blocks, next_block, meta = self.cut
            states = {b: BlockState(parts[0] if len(parts) == 1 else torch.cat(parts, dim=3), capacity, tokens)
                      for b, (parts, capacity, tokens) in blocks.items()}
            self.cut_blob = KVSnapshot(states, next_block, meta).to_bytes()
        return self.cut_blob

    def load_file(self, path: str) -> dict:
        """``load`` a snapshot file on this actor's node (a checkpoint written by ``configure``)."""
        return self.load(read_file(path))

    # ---- queries -----------------------------------------------------------------------------
    def block_tokens(self, block: int) -> list[int]:
        """Token ids written into ``block`` so far (commits move them to the target block)."""
        return list(self.tokens.get(block, []))

    def mirrored(self) -> dict[int, int]:
        """Mirrored blocks and their lengths."""
        return dict(self.lengths)

    def run_state(self) -> dict | None:
        """The latest resumable run state pushed (``RunState.to_dict()``), if any."""
        return self.run

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
        if self.run is not None and "run" not in meta:
            meta = {**meta, "run": self.run}
        return KVSnapshot(blocks, next_block, meta).to_bytes()

    def save(self, path: str, live: dict[int, BlockState], spans: dict[int, tuple[int, int]], next_block: int,
             meta: dict) -> str:
        """Write a snapshot file on this actor's node; returns its path."""
        return str(write_file(path, self.snapshot(live, spans, next_block, meta)))

    def _mirrored_state(self, block: int, capacity: int) -> BlockState:
        if block not in self.chunks:
            raise SnapshotError(f"block {block} is neither mirrored here nor sent live; "
                                "send every block the service does not mirror")
        return BlockState(self.entries(block), capacity)

    def load(self, blob: bytes) -> dict:
        """Adopt a snapshot (every block becomes mirrored); returns its metadata."""
        snapshot = KVSnapshot.from_bytes(blob)
        self.chunks = {b: [s.entries] for b, s in snapshot.blocks.items()}
        self.lengths = {b: s.entries.shape[3] for b, s in snapshot.blocks.items()}
        self.tokens = {b: list(s.tokens) for b, s in snapshot.blocks.items()}
        self.run = snapshot.meta.get("run")
        self.cut, self.cut_blob = None, bytes(blob)  # restoring again (before a new checkpoint) starts here too
        return snapshot.meta
