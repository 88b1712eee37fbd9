"""Is a transcript readable? Template echo and n-gram repetition of the workers' sampled text.

Only what the model sampled counts: text the protocol forced in (step prefixes, checks, the
finisher) is the scaffolding itself. A sampled line *echoes* the template when it copies the
prompt's scaffolding: it opens like a step header (``Bob (step 3):``), contains a sentence of the
system prompt or a workspace header, or is itself a piece of one. Repetition is the share of word
4-grams of a worker's sampled text that already occurred earlier in it.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from cluster.events import Delta, Event
from cluster.prompts import NAMES, Templates

NGRAM = 4
MIN_WORDS = 3  # shorter lines or sentences are too common to call an echo
_WORD = re.compile(r"[\w']+")


@dataclass
class Readability:
    """Counts that add up over sessions; the rates are their ratios."""

    lines: int = 0
    echo_lines: int = 0
    ngrams: int = 0
    repeated_ngrams: int = 0

    def add(self, other: Readability) -> None:
        for name in ("lines", "echo_lines", "ngrams", "repeated_ngrams"):
            setattr(self, name, getattr(self, name) + getattr(other, name))

    @property
    def echo_rate(self) -> float:
        return self.echo_lines / self.lines if self.lines else 0.0

    @property
    def repetition_rate(self) -> float:
        return self.repeated_ngrams / self.ngrams if self.ngrams else 0.0


def _words(text: str) -> list[str]:
    return _WORD.findall(text.lower())


def scaffolding(templates: Templates, names: Sequence[str], layout: str) -> list[str]:
    """The sentences and headers of the prompt that a worker should never need to write, as word strings."""
    texts = [templates.system_text(tuple(names), layout), templates.check, templates.finisher,
             templates.others_header]
    for name in NAMES:
        texts += [templates.peer_header.format(name=name), templates.own_header.format(name=name)]
    pieces = [p for text in texts for p in re.split(r"(?<=[.:?!])\s+|\n+", text)]
    return sorted({" ".join(w) for w in map(_words, pieces) if len(w) >= MIN_WORDS})


def header_pattern(templates: Templates) -> re.Pattern:
    """A line that opens like a step header of any worker, e.g. ``Carol (step 12):``."""
    pattern = re.escape(templates.step_prefix).replace(re.escape("{name}"), r"\w+").replace(re.escape("{step}"), r"\d+")
    return re.compile(r"^\W*" + pattern, re.IGNORECASE)


def sampled_lines(events: Iterable[Event], worker: int) -> list[str]:
    """The lines of what ``worker`` sampled (a forced piece ends a line)."""
    text = ""
    for event in events:
        if isinstance(event, Delta) and event.worker == worker:
            text += "\n" if event.forced else event.text
    return [line.strip() for line in text.split("\n") if line.strip()]


def is_echo(line: str, sentences: Sequence[str], header: re.Pattern) -> bool:
    if header.search(line):
        return True
    words = " ".join(_words(line))
    if not words:
        return False
    padded = f" {words} "
    if any(f" {s} " in padded for s in sentences):
        return True
    return len(words.split()) >= MIN_WORDS and any(f" {words} " in f" {s} " for s in sentences)


def readability(lines: Sequence[str], sentences: Sequence[str], header: re.Pattern) -> Readability:
    """Echo and repetition counts of one worker's sampled lines."""
    out = Readability(lines=len(lines), echo_lines=sum(is_echo(line, sentences, header) for line in lines))
    words = _words(" ".join(lines))
    grams = [tuple(words[i : i + NGRAM]) for i in range(len(words) - NGRAM + 1)]
    out.ngrams, out.repeated_ngrams = len(grams), len(grams) - len(set(grams))
    return out


def session_readability(events: Sequence[Event], workers: int, templates: Templates, names: Sequence[str],
                        layout: str) -> Readability:
    """Echo and repetition counts of every worker of one session."""
    sentences, header = scaffolding(templates, names, layout), header_pattern(templates)
    total = Readability()
    for worker in range(workers):
        total.add(readability(sampled_lines(events, worker), sentences, header))
    return total
