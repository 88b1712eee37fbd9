"""Showing a running session in a terminal: side-by-side columns on a TTY, plain lines otherwise."""

from __future__ import annotations

import shutil
import textwrap
import time
from typing import Protocol, TextIO

from cluster.events import Delta, Event, Finished, Started, StepDone, Tick
from cluster.transcript import SessionResult

CLEAR = "\x1b[H\x1b[J"
HIDE_CURSOR, SHOW_CURSOR = "\x1b[?25l", "\x1b[?25h"
GAP = " │ "


class LiveView(Protocol):
    def update(self, event: Event) -> None: ...

    def close(self, result: SessionResult) -> None: ...


def printable(text: str) -> str:
    """Model text made safe for a terminal: tabs to spaces, other control characters dropped."""
    text = text.replace("\t", "    ")
    return "".join(c for c in text if c == "\n" or c.isprintable())


def wrap(text: str, width: int) -> list[str]:
    """Hard-wrapped lines of ``text`` (blank lines kept)."""
    lines: list[str] = []
    for paragraph in printable(text).split("\n"):
        lines += textwrap.wrap(paragraph, width, drop_whitespace=False) or [""]
    return lines


def render_columns(names: tuple[str, ...], texts: list[str], width: int, height: int) -> list[str]:
    """The last ``height`` lines of each worker's text, in columns under the worker's name."""
    col = max(8, (width - len(GAP) * (len(names) - 1)) // max(1, len(names)))
    tails = [wrap(t, col)[-height:] for t in texts]
    rows = [GAP.join(name[:col].ljust(col) for name in names).rstrip(), GAP.join("─" * col for _ in names)]
    for i in range(height):
        rows.append(GAP.join((tail[i] if i < len(tail) else "").ljust(col) for tail in tails).rstrip())
    return rows


def progress_bar(done: int, total: int, width: int) -> str:
    """``[#####.....] done/total steps`` fitted to ``width``."""
    label = f" {done}/{total} steps"
    inner = max(4, width - len(label) - 2)
    filled = inner * done // max(1, total)
    return "[" + "#" * filled + "." * (inner - filled) + "]" + label


def summary(result: SessionResult) -> str:
    t = result.timings
    return (f"answer: {result.answer if result.answer is not None else '(none)'}  ({result.reason}, "
            f"{result.steps} steps, {t.get('wall_s', 0):.1f} s, {t.get('tokens_per_s', 0):.1f} tok/s)")


class ColumnView:
    """Redraws all workers side by side (ANSI escapes), at most ``fps`` times a second."""

    def __init__(self, out: TextIO, fps: float = 10.0) -> None:
        self.out = out
        self.interval = 1.0 / fps
        self.names: tuple[str, ...] = ()
        self.texts: list[str] = []
        self.done, self.total = 0, 0
        self.drawn_at = 0.0

    def update(self, event: Event) -> None:
        if isinstance(event, Started):
            self.names, self.texts, self.total = event.workers, [""] * len(event.workers), event.max_steps
            self.out.write(HIDE_CURSOR)
        elif isinstance(event, Delta):
            self.texts[event.worker] += event.text
        elif isinstance(event, Tick):
            self.done = event.step
        if isinstance(event, Finished) or time.monotonic() - self.drawn_at >= self.interval:
            self._draw()

    def close(self, result: SessionResult) -> None:
        self._draw()
        self.out.write(SHOW_CURSOR + "\n" + summary(result) + "\n")
        self.out.flush()

    def _draw(self) -> None:
        if not self.names:
            return
        size = shutil.get_terminal_size()
        rows = render_columns(self.names, self.texts, size.columns - 1, max(3, size.lines - 4))
        self.out.write(CLEAR + "\n".join(rows) + "\n" + progress_bar(self.done, self.total, size.columns - 1))
        self.out.flush()
        self.drawn_at = time.monotonic()


class LineView:
    """Plain streaming output: a line per finished step, then the open steps and the answer."""

    def __init__(self, out: TextIO) -> None:
        self.out = out
        self.names: tuple[str, ...] = ()

    def update(self, event: Event) -> None:
        if isinstance(event, Started):
            self.names = event.workers
            self._line(f"hogwild: {len(event.workers)} workers ({', '.join(event.workers)}), "
                       f"layout {event.layout}, up to {event.max_steps} steps")
        elif isinstance(event, StepDone):
            self._line(f"[{self.names[event.worker]}] {_one_line(event.text)}")

    def close(self, result: SessionResult) -> None:
        for record in result.transcript:
            if not record.finished:
                self._line(f"[{record.worker}, unfinished] {_one_line(record.text)}")
        self._line(summary(result))

    def _line(self, text: str) -> None:
        self.out.write(text + "\n")
        self.out.flush()


def _one_line(text: str) -> str:
    return " ".join(printable(text).split())
