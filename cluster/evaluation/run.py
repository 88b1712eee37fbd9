"""``evaluate``: every (problem, method) not yet in the output folder, results appended as they finish.

Everything the user gave is checked (data file, methods, budgets, settings) before the folder is
touched; then the remaining items run on the executor (``hosts``), each result is appended, the
progress shown, and the report written at the end.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TextIO

from cluster.evaluation.data import Problem, load_problems
from cluster.evaluation.hosts import make_executor
from cluster.evaluation.methods import EvalSettings, Method, parse_methods
from cluster.evaluation.progress import Progress
from cluster.evaluation.report import write_report
from cluster.evaluation.results import ResultsDir


@dataclass(frozen=True)
class EvalPlan:
    """A checked evaluation: what runs, with which settings, into which folder."""

    source: str
    problems: tuple[Problem, ...]
    methods: tuple[Method, ...]
    settings: EvalSettings
    out: Path

    def config(self) -> dict:
        data = json.dumps([[p.id, p.question, p.answer] for p in self.problems]).encode()
        return {"data": self.source, "problems": len(self.problems), "data_sha256": hashlib.sha256(data).hexdigest(),
                "methods": [m.name for m in self.methods], "settings": self.settings.to_dict()}


def plan(source: str, kinds: Sequence[str], workers: Sequence[int], settings: EvalSettings, out: Path,
         limit: int | None = None) -> EvalPlan:
    """Check everything; raises ``ConfigError`` naming what is wrong, before anything is written."""
    methods = parse_methods(list(kinds), list(workers))
    problems = load_problems(source)
    return EvalPlan(source, tuple(problems[:limit] if limit else problems), tuple(methods), settings, Path(out))


def evaluate(plan: EvalPlan, *, concurrency: int = 8, hosts: int = 0, address: str | None = None,
             use_ray: bool = False, stream: TextIO | None = None, gang: int = 0) -> Path:
    """Run what is left of ``plan``; returns the report's path."""
    folder = ResultsDir(plan.out)
    done = folder.open(plan.config())
    items = [(p, m) for p in plan.problems for m in plan.methods if (p.id, m.name) not in done]
    total = len(plan.problems) * len(plan.methods)
    progress = Progress(total, total - len(items), stream)
    if items:
        executor = make_executor(plan.settings, concurrency, hosts, address, use_ray, gang)
        progress.note(f"{len(items)} of {total} (problem, method) runs left, on {executor.where}")
        try:
            for record in executor.run(items):
                folder.append(record)
                progress.update(record)
        finally:
            progress.close()
    return write_report(plan.out)[1]
