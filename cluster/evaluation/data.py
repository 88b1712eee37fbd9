"""Problems to evaluate: a JSONL file, or ``builtin:N[:SEED]`` word problems generated here.

A JSONL line is ``{"id": ..., "question": ..., "answer": ...}``; ``id`` defaults to the line number
and a GSM8K-style answer (a worked solution ending in ``#### 42``) counts as its last part. Every
error names the file and line, and nothing is loaded unless the whole file is good.

The built-in generator makes arithmetic word problems with exact integer answers at three
difficulty levels (1: one operation, 2: two, 3: three with a division); the same ``N`` and ``SEED``
give the same problems on every machine.
"""

from __future__ import annotations

import json
import random
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from cache_service.errors import ConfigError
from cluster.evaluation.answers import gsm8k_answer

BUILTIN = "builtin:"


@dataclass(frozen=True)
class Problem:
    id: str
    question: str
    answer: str
    level: int = 0  # difficulty of a built-in problem (0: unknown)


def load_problems(source: str) -> list[Problem]:
    """The problems of ``source``: ``builtin:N[:SEED]`` or a JSONL file path."""
    if source.startswith(BUILTIN):
        return builtin_problems(*_builtin_args(source))
    return load_jsonl(Path(source))


def _builtin_args(source: str) -> tuple[int, int]:
    parts = source[len(BUILTIN):].split(":")
    try:
        count, seed = int(parts[0]), int(parts[1]) if len(parts) > 1 else 0
    except (ValueError, IndexError):
        count, seed = -1, 0
    if len(parts) > 2 or count <= 0:
        raise ConfigError(f"{source!r}: write builtin:N or builtin:N:SEED with N > 0 problems")
    return count, seed


def load_jsonl(path: Path) -> list[Problem]:
    """Every problem of a JSONL file; a ``ConfigError`` naming the file and line on the first fault."""
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except FileNotFoundError:
        raise ConfigError(f"{path}: no such data file; give a JSONL file or builtin:N") from None
    except (OSError, UnicodeDecodeError) as err:
        raise ConfigError(f"{path}: cannot read the data file ({err})") from None
    problems, seen = [], {}
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        problem = _parse_line(line, f"{path}:{number}", str(number))
        if problem.id in seen:
            raise ConfigError(f"{path}:{number}: id {problem.id!r} was already used on line {seen[problem.id]}")
        seen[problem.id] = number
        problems.append(problem)
    if not problems:
        raise ConfigError(f"{path}: the data file holds no problems")
    return problems


def _parse_line(line: str, where: str, default_id: str) -> Problem:
    try:
        record = json.loads(line)
    except json.JSONDecodeError as err:
        raise ConfigError(f"{where}: not valid JSON ({err.msg} at column {err.colno})") from None
    if not isinstance(record, dict):
        raise ConfigError(f"{where}: expected a JSON object with question and answer")
    question = record.get("question")
    if not isinstance(question, str) or not question.strip():
        raise ConfigError(f"{where}: no question (a non-empty string under \"question\")")
    answer = record.get("answer")
    if isinstance(answer, bool) or not isinstance(answer, (str, int, float)):
        raise ConfigError(f"{where}: no answer (a string or number under \"answer\")")
    answer = gsm8k_answer(str(answer))
    if not answer:
        raise ConfigError(f"{where}: the answer is empty")
    return Problem(str(record.get("id", default_id)), question.strip(), answer, int(record.get("level", 0) or 0))


# ---- the built-in generator -----------------------------------------------------------------------
Maker = Callable[[random.Random], tuple[str, int]]


def _one_step(r: random.Random) -> tuple[str, int]:
    kind = r.randrange(3)
    if kind == 0:
        a, b = r.randint(12, 90), r.randint(5, 60)
        return f"{r.choice(NAMES)} has {a} marbles and finds {b} more. How many marbles does she have now?", a + b
    if kind == 1:
        a, b = r.randint(40, 150), r.randint(5, 39)
        return f"A shelf holds {a} books. {b} books are taken away. How many books are left on the shelf?", a - b
    a, b = r.randint(3, 12), r.randint(4, 15)
    return f"There are {a} boxes with {b} pencils in each box. How many pencils are there in total?", a * b


def _two_steps(r: random.Random) -> tuple[str, int]:
    kind = r.randrange(2)
    if kind == 0:
        a, b, c = r.randint(3, 9), r.randint(4, 12), r.randint(2, 20)
        c = min(c, a * b - 1)
        return (f"{r.choice(NAMES)} buys {a} bags of apples with {b} apples in each bag, then gives {c} "
                f"apples to a friend. How many apples are left?"), a * b - c
    price, count, paid = r.randint(2, 9), r.randint(2, 8), 0
    paid = price * count + r.randint(1, 30)
    return (f"A notebook costs {price} dollars. {r.choice(NAMES)} buys {count} notebooks and pays with "
            f"{paid} dollars. How much change does she get, in dollars?"), paid - price * count


def _three_steps(r: random.Random) -> tuple[str, int]:
    groups, per = r.randint(2, 6), r.randint(3, 9)
    a, b = r.randint(2, 8), r.randint(2, 8)
    total = groups * per * (a + b)
    return (f"A farm has {a} red baskets and {b} blue baskets, each holding {groups * per} eggs. All the "
            f"eggs are packed equally into {groups * (a + b)} cartons. How many eggs are in each carton?"), \
        total // (groups * (a + b))


NAMES = ("Mia", "Nora", "Lena", "Ada", "Iris", "Zoe", "Emma", "Sara")
LEVELS: dict[int, Maker] = {1: _one_step, 2: _two_steps, 3: _three_steps}


def builtin_problems(count: int, seed: int = 0) -> list[Problem]:
    """``count`` word problems, levels 1, 2, 3 in turn, each with its exact integer answer."""
    r = random.Random(f"hogwild-builtin-{seed}")
    problems = []
    for i in range(count):
        level = i % 3 + 1
        question, answer = LEVELS[level](r)
        problems.append(Problem(f"builtin-{seed}-{i:04d}", question, str(answer), level))
    return problems
