"""The CacheService's checkpoints of a gang's sessions: a consistent cut of the records before it
(mirrored blocks from the service, live ones sent along), the blocks of ended sessions forgotten,
an inconsistent cut refused (the previous one kept), files written at most every ``every_s``."""

from __future__ import annotations

import torch

from cache_service.service import CacheService, Checkpoint, Committed, Wrote
from cache_service.snapshot import BlockState, KVSnapshot, restore
from cache_service.kv_store import KVStore


def kv(n: int, value: float) -> torch.Tensor:
    return torch.full((2, 2, 1, n, 4), value)


def test_a_checkpoint_is_the_cut_at_its_place_among_the_records(tmp_path):
    service = CacheService()
    path = tmp_path / "gang.hwkv"
    service.configure(str(path), every_s=3600)
    service.apply([Wrote(0, [1, 2, 3], kv(3, 1.0)), Wrote(1, [4], None), Wrote(2, [9], kv(1, 9.0)),
                   Committed(1, 0, kv(1, 2.0)), Wrote(1, [5, 6], None)])
    live = {1: BlockState(kv(2, 3.0), 8)}
    service.apply([Checkpoint({0: (4, 10), 1: (2, 8), 3: (0, 8)}, {**live, 3: BlockState(kv(0, 0.0), 8)},
                              keep=[0, 1, 3], next_block=4, meta={"kind": "gang", "sessions": {"7": {}}}),
                   Wrote(0, [7], kv(1, 5.0))])  # after the cut: not in it
    snapshot = KVSnapshot.from_bytes(service.checkpoint_blob())
    assert sorted(snapshot.blocks) == [0, 1, 3] and snapshot.next_block == 4
    assert torch.equal(snapshot.blocks[0].entries, torch.cat([kv(3, 1.0), kv(1, 2.0)], dim=3))
    assert snapshot.blocks[0].tokens == [1, 2, 3, 4] and snapshot.blocks[1].tokens == [5, 6]
    assert snapshot.blocks[0].capacity == 10 and snapshot.meta["sessions"] == {"7": {}}
    assert 2 not in service.lengths  # block 2 was freed (not kept): forgotten
    assert service.lengths[1] == 2  # sent whole with the checkpoint: mirrored from then on
    assert KVSnapshot.load(path).to_bytes() == service.checkpoint_blob()  # the first one is written at once
    store = KVStore(2, 1, 4, tokens=64, page_size=4, dtype=torch.float32, device="cpu")
    restore(store, snapshot)  # block 2 comes back as a gap, the empty block 3 as an empty block
    assert sorted(store.blocks) == [0, 1, 3] and store.length(3) == 0 and store.length(0) == 4


def test_an_inconsistent_cut_keeps_the_previous_checkpoint():
    service = CacheService()
    service.apply([Wrote(0, [1], kv(1, 1.0)),
                   Checkpoint({0: (1, 4)}, {}, keep=[0], next_block=1, meta={"n": 1})])
    first = service.checkpoint_blob()
    service.apply([Checkpoint({0: (5, 8)}, {}, keep=[0], next_block=1, meta={"n": 2})])  # records missing
    assert service.checkpoint_blob() == first and service.checkpoints == 1
    service.load(first)  # a restored service restores from what it loaded until its next checkpoint
    assert service.checkpoint_blob() == first
