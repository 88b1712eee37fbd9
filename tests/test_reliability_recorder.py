"""Rank 0's recorder pushes a record only once its host copy is done (an asynchronous device-to-host
copy on CUDA, marked by an event), always in order; the step never waits for a copy unless asked."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

import workers.actor
from cache_service.errors import ConfigError
from cache_service.service import Committed, Wrote
from workers.actor import ServiceRecorder


class FakeEvent:
    """A CUDA event stand-in: ``query`` is False until the copy is done (or ``synchronize``)."""

    def __init__(self, done: bool) -> None:
        self.done, self.waited = done, False

    def query(self) -> bool:
        return self.done

    def synchronize(self) -> None:
        self.waited, self.done = True, True


class FakeService:
    def __init__(self) -> None:
        self.pushed: list[list[int]] = []
        self.apply = SimpleNamespace(remote=self._apply)

    def _apply(self, records) -> int:
        self.pushed.append([r.block if isinstance(r, Wrote) else -r.into for r in records])
        return len(self.pushed)


def test_records_wait_for_their_copies_in_order(monkeypatch):
    events = {0: FakeEvent(True), 1: FakeEvent(False), 2: FakeEvent(True), 3: FakeEvent(False)}
    monkeypatch.setattr(workers.actor, "_to_host", lambda record: (record, events[record.block]))
    service = FakeService()
    recorder = ServiceRecorder(service, max_in_flight=100)
    for block in range(3):
        recorder.record(Wrote(block, [block]))
    recorder.flush()
    assert service.pushed == [[0]]  # record 1's copy is still running: 1 and 2 wait (order kept)
    recorder.flush()
    assert service.pushed == [[0]] and not events[1].waited
    events[1].done = True
    recorder.flush()
    assert service.pushed == [[0], [1, 2]]
    recorder.record(Wrote(3, [3]))
    recorder.flush(wait=True)  # a snapshot: wait for the copy
    assert service.pushed[-1] == [3] and events[3].waited and not recorder.buffer


def test_cpu_entries_are_copied_and_records_without_entries_are_not():
    source = torch.ones(2, 2, 2, 3, 4)
    record, event = workers.actor._to_host(Committed(1, 0, source[:, :, :, 1:]))
    source.zero_()
    assert event is None and torch.equal(record.entries, torch.ones(2, 2, 2, 2, 4))
    plain = Wrote(1, [5])
    assert workers.actor._to_host(plain) == (plain, None)


def test_the_bound_must_be_positive():
    with pytest.raises(ConfigError, match="max_in_flight must be >= 1"):
        ServiceRecorder(FakeService(), max_in_flight=0)
