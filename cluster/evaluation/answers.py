"""Comparing answers: numbers, fractions and ``\\boxed{}`` normalised to one canonical string.

``normalize("\\boxed{\\frac{3}{4}}") == normalize("0.75") == "3/4"``; ``"1,234"``, ``"$1234"``,
``"1234."``, ``"1234%"`` and ``"1234 apples"`` are all ``"1234"`` (units are dropped). Text that
holds no number is compared lowercased with its spaces collapsed and outer punctuation removed.
``majority`` is the vote of independent workers: the most frequent normalised answer, ties going to
the answer given first.
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Sequence
from fractions import Fraction

BOXED = re.compile(r"\\boxed\s*\{")
FRAC = re.compile(r"\\[dt]?frac\s*\{([^{}]*)\}\s*\{([^{}]*)\}")
TEXT_WRAP = re.compile(r"\\(?:text|mathrm|mbox)\s*\{([^{}]*)\}")
NUMBER = r"[-+−]?\s*(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?|[-+−]?\s*\.\d+"
LEADING = re.compile(rf"^\s*\$?\s*(?P<num>{NUMBER})(?:\s*/\s*(?P<den>{NUMBER}))?(?![\d.,]*\d)")
MIXED = re.compile(r"^\s*(?P<whole>\d+)\s+(?P<num>\d+)\s*/\s*(?P<den>\d+)\s*$")


def unbox(text: str) -> str:
    """The content of the last ``\\boxed{...}`` (braces balanced), else ``text``."""
    starts = [m.end() for m in BOXED.finditer(text)]
    if not starts:
        return text
    depth, start = 1, starts[-1]
    for i in range(start, len(text)):
        depth += {"{": 1, "}": -1}.get(text[i], 0)
        if depth == 0:
            return text[start:i]
    return text[start:]  # never closed: what was written


def gsm8k_answer(text: str) -> str:
    """The final answer of a GSM8K solution (after ``####``), else ``text``."""
    return text.rsplit("####", 1)[1].strip() if "####" in text else text.strip()


def to_number(text: str) -> Fraction | None:
    """The number ``text`` states (a leading one; after the last ``=`` when there is one)."""
    text = TEXT_WRAP.sub(r"\1", FRAC.sub(r"(\1)/(\2)", text)).replace("(", "").replace(")", "")
    text = text.rsplit("=", 1)[-1].replace("\\$", "$").replace("\\!", "").replace("−", "-")
    mixed = MIXED.match(text)
    if mixed:
        return int(mixed["whole"]) + Fraction(int(mixed["num"]), int(mixed["den"]))
    match = LEADING.match(text)
    if not match:
        return None
    value = _fraction(match["num"])
    if match["den"] is not None:
        den = _fraction(match["den"])
        if den == 0:
            return None
        value /= den
    return value


def _fraction(text: str) -> Fraction:
    return Fraction(text.replace(",", "").replace(" ", ""))


def normalize(answer: object) -> str | None:
    """A canonical string for comparing answers; None when there is no answer."""
    if answer is None:
        return None
    text = unbox(str(answer)).strip()
    if not text:
        return None
    number = to_number(text)
    if number is not None:
        return str(number.numerator) if number.denominator == 1 else f"{number.numerator}/{number.denominator}"
    text = " ".join(TEXT_WRAP.sub(r"\1", text).lower().split())
    return text.strip(" .,;:!?$\"'`*") or None


def same(answer: object, gold: object) -> bool:
    """Whether ``answer`` states ``gold`` (both normalised); no answer is never right."""
    left = normalize(answer)
    return left is not None and left == normalize(gold)


def majority(answers: Sequence[object]) -> str | None:
    """The vote: the most frequent normalised answer (answers that are None abstain); a tie goes to
    the tied answer that appears first in ``answers``. Returns that answer as first written."""
    keys = [normalize(a) for a in answers]
    counts = Counter(k for k in keys if k is not None)
    if not counts:
        return None
    top = max(counts.values())
    for answer, key in zip(answers, keys):
        if key is not None and counts[key] == top:
            return str(answer)
    return None  # unreachable: some key has the top count
