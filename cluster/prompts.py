"""The words the workers see: replaceable templates and their rendering.

Every piece of text the protocol writes into the cache comes from a ``Templates`` instance, so a
user can swap any of it (other languages, other answer formats) without touching the protocol.
The ideas follow the Hogwild! paper (arXiv 2504.06261); the wording is this project's own.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from functools import cached_property

from cache_service.errors import ConfigError

NAMES = ("Alice", "Bob", "Carol", "Dave", "Eve", "Frank", "Grace", "Heidi")

SYSTEM = (
    "You are one of {count} assistants ({names}) solving the user's problem together. "
    "You share one workspace: whatever any of you writes, the others see at once, while it is "
    "being written. {layout_help}\n\n"
    "Work in short steps. A step is one line: it starts with your name and the step number, "
    "like \"{example}\", and ends where the line ends. Before you start on something, look at what "
    "the others are doing. If someone already does it, do not repeat it: take another part of the "
    "problem, check their result, or try a different method. Once the problem is solved, write "
    "the final answer inside \\boxed{{}}."
)

LAYOUT_HELP = {
    "combined": "Below you first see every finished step of all workers, in the order they were "
                "finished, then the steps the others are writing right now, and last your own "
                "current step.",
    "contiguous": "Below you see each worker's writing as one continuous stream: first the other "
                  "workers' streams, then your own.",
    "interleaved": "Below you see every finished step of all workers, in the order they were "
                   "finished, and then your own current step. A step of another worker shows up "
                   "once it is finished.",
}

# Where a step ends, looked for in what the worker wrote after its step prefix. One line a step:
# the default model, left to write paragraphs, opened new lines with step headers of its own (its
# own or another worker's); ending the step there lets the protocol write the next header instead.
STEP_END = r"\S[^\n]*\n\s*$"  # a line with something on it, then its line break
BOXED = r"\\boxed\{((?:[^{}]|\{[^{}]*\})*)\}"  # \boxed{...}, one level of nested braces


@dataclass(frozen=True)
class Templates:
    """All protocol text. ``{name}``/``{step}`` are filled per worker; regexes are Python ``re``."""

    system: str = SYSTEM  # fields: {count} {names} {layout_help} {example}
    layout_help: dict[str, str] = field(default_factory=lambda: dict(LAYOUT_HELP))
    history_header: str = ""  # opens the common history (layouts that commit)
    others_header: str = "Meanwhile, the others are writing:\n\n"
    peer_header: str = "{name}'s work so far:\n\n"
    peer_tail: str = " ...\n\n"
    own_header: str = "Now {name} continues:\n\n"
    step_prefix: str = "{name} (step {step}):"
    check: str = " Wait, is another worker already doing this? In short,"  # a sentence follows, not a list
    step_separator: str = "\n"  # closes a step cut off at the token limit
    finisher: str = "\n\nTime is up. Putting together what we all found, the final answer is \\boxed{"
    step_end: str = STEP_END
    answer: str = BOXED  # group 1 is the answer

    def __post_init__(self) -> None:
        for name in ("system", "peer_header", "own_header", "step_prefix"):
            self._check_format(name)
        if not self.step_prefix.strip():
            raise ConfigError("templates.step_prefix is empty; it must name the worker and step")
        for name in ("step_end", "answer"):
            _compile(name, getattr(self, name))
        if _compile("answer", self.answer).groups < 1:
            raise ConfigError("templates.answer needs one capturing group: the answer")

    def _check_format(self, name: str) -> None:
        try:
            getattr(self, name).format(count=2, names="A, B", layout_help="", example="", name="A", step=1)
        except (KeyError, IndexError, ValueError) as err:
            raise ConfigError(f"templates.{name} does not format ({err}); escape literal braces as {{{{ }}}}") from None

    @cached_property
    def step_end_re(self) -> re.Pattern:
        return re.compile(self.step_end)

    @cached_property
    def answer_re(self) -> re.Pattern:
        return re.compile(self.answer)

    # ---- rendering -----------------------------------------------------------------------
    def system_text(self, names: tuple[str, ...], layout: str) -> str:
        return self.system.format(count=len(names), names=", ".join(names),
                                  layout_help=self.layout_help.get(layout, ""),
                                  example=self.prefix(names[0], 1))

    def prefix(self, name: str, step: int) -> str:
        return self.step_prefix.format(name=name, step=step)

    def part_text(self, part: str, name: str) -> str:
        """Text of a fixed layout block (``others_header``, ``peer_header``, ``peer_tail``, ``own_header``)."""
        texts = {"others_header": self.others_header, "peer_header": self.peer_header,
                 "peer_tail": self.peer_tail, "own_header": self.own_header}
        return texts[part].format(name=name)


def _compile(name: str, pattern: str) -> re.Pattern:
    try:
        return re.compile(pattern)
    except re.error as err:
        raise ConfigError(f"templates.{name} is not a valid regular expression: {err}") from None
