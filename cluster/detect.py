"""Reading a worker's text: where a step ends and where the final answer is."""

from __future__ import annotations

import re

FENCE = "```"


def in_code_block(text: str) -> bool:
    """True inside a fenced code block (an odd number of fences so far)."""
    return text.count(FENCE) % 2 == 1


def step_ended(text: str, step_end: re.Pattern) -> bool:
    """A step ends where ``step_end`` matches its end (by default a finished line), never inside code."""
    return not in_code_block(text) and step_end.search(text) is not None


def find_answer(text: str, answer: re.Pattern, since: int = 0) -> str | None:
    """The last answer in ``text`` whose match ends after ``since`` (text older than that is old news)."""
    found = None
    for match in answer.finditer(text):
        if match.end() > since:
            found = match.group(1).strip()
    return found
