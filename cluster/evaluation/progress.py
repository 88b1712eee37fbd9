"""Progress of an evaluation: a bar with ETA on a terminal, one line per result otherwise (job logs)."""

from __future__ import annotations

import sys
import time
from typing import Any, TextIO

BAR = 28


def _clock(seconds: float) -> str:
    seconds = int(seconds)
    return f"{seconds // 3600}:{seconds % 3600 // 60:02d}:{seconds % 60:02d}"


class Progress:
    """Counts finished items of ``total`` (``done`` of them finished in earlier runs)."""

    def __init__(self, total: int, done: int = 0, stream: TextIO | None = None, tty: bool | None = None) -> None:
        self.stream = stream or sys.stderr
        self.tty = self.stream.isatty() if tty is None else tty
        self.total, self.done, self.resumed = total, done, done
        self.started = time.monotonic()

    def line(self) -> tuple[str, float]:
        new, left = self.done - self.resumed, self.total - self.done
        elapsed = time.monotonic() - self.started
        rate = new / elapsed * 60 if elapsed > 0 else 0.0
        eta = _clock(left / new * elapsed) if new else "?"
        share = self.done / self.total if self.total else 1.0
        text = f"{self.done}/{self.total} ({share:.0%}) · {rate:.1f}/min · elapsed {_clock(elapsed)} · ETA {eta}"
        return text, share

    def note(self, text: str) -> None:
        self.stream.write(f"eval: {text}\n")
        self.stream.flush()

    def update(self, record: dict[str, Any]) -> None:
        self.done += 1
        text, share = self.line()
        if self.tty:
            filled = int(share * BAR)
            self.stream.write(f"\r[{'#' * filled}{'.' * (BAR - filled)}] {text}   ")
        else:
            self.stream.write(f"eval: {text} · {record['id']} {record['method']}: {_summary(record)}\n")
        self.stream.flush()

    def close(self) -> None:
        if self.tty:
            self.stream.write("\n")
            self.stream.flush()


def _summary(record: dict[str, Any]) -> str:
    if record.get("error"):
        return f"error ({record['error']})"
    return " ".join(f"{b}:{'ok' if r['correct'] else 'no'}" for b, r in record["budgets"].items())
