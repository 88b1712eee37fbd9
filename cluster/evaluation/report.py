"""The report of an evaluation folder: a Markdown table and a plot of accuracy vs sequential steps.

Accuracy per method and budget with a 95% Wilson score interval; mean sampled tokens and mean wall
time per problem to reach the budget (sessions share their host with the other sessions in flight,
so wall time is a throughput figure, not one session's latency); template echo and 4-gram
repetition of the sampled text per method (``metrics``).
"""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cache_service.errors import HogwildError
from cluster.evaluation.metrics import Readability
from cluster.evaluation.results import ResultsDir

Z95 = 1.959963984540054
REPORT = "report.md"
PLOT = "accuracy.png"


def wilson(correct: int, total: int, z: float = Z95) -> tuple[float, float]:
    """The Wilson score interval of a proportion (0, 0 for no trials)."""
    if total == 0:
        return 0.0, 0.0
    p = correct / total
    centre = (p + z * z / (2 * total)) / (1 + z * z / total)
    half = z / (1 + z * z / total) * math.sqrt(p * (1 - p) / total + z * z / (4 * total * total))
    return max(0.0, min(p, centre - half)), min(1.0, max(p, centre + half))  # p inside despite rounding


@dataclass
class Cell:
    """One method at one budget, over every problem."""

    n: int = 0
    correct: int = 0
    tokens: int = 0
    wall_s: float = 0.0

    @property
    def accuracy(self) -> float:
        return self.correct / self.n if self.n else 0.0


@dataclass
class MethodStats:
    cells: dict[int, Cell] = field(default_factory=lambda: defaultdict(Cell))
    readability: Readability = field(default_factory=Readability)
    problems: int = 0
    errors: int = 0
    wall_s: float = 0.0


def aggregate(records: Iterable[dict[str, Any]]) -> dict[str, MethodStats]:
    """Per method (in first-seen order), per budget."""
    stats: dict[str, MethodStats] = {}
    for record in records:
        method = stats.setdefault(record["method"], MethodStats())
        method.problems += 1
        method.wall_s += record.get("wall_s", 0.0)
        if record.get("error"):
            method.errors += 1
        method.readability.add(Readability(**record.get("readability", {})))
        for budget, result in record.get("budgets", {}).items():
            cell = method.cells[int(budget)]
            cell.n += 1
            cell.correct += bool(result["correct"])
            cell.tokens += result["tokens"]
            cell.wall_s += result["wall_s"]
    return stats


def markdown(stats: dict[str, MethodStats], config: dict[str, Any]) -> str:
    budgets = config.get("settings", {}).get("budgets") or sorted({b for s in stats.values() for b in s.cells})
    lines = [
        "# Evaluation report", "",
        f"Data `{config.get('data', '?')}` ({config.get('problems', '?')} problems) · model "
        f"`{config.get('settings', {}).get('model', '?')}` · budgets in decode steps (sequential steps) · "
        "accuracy with 95% Wilson interval · tokens and wall time: mean per problem up to that budget", "",
        "| method | budget | accuracy | 95% CI | correct/n | tokens | wall s |",
        "|---|---:|---:|---|---:|---:|---:|",
    ]
    for name, method in stats.items():
        for budget in budgets:
            cell = method.cells.get(budget)
            if cell is None or cell.n == 0:
                continue
            low, high = wilson(cell.correct, cell.n)
            lines.append(f"| {name} | {budget} | {cell.accuracy:.1%} | [{low:.1%}, {high:.1%}] | "
                         f"{cell.correct}/{cell.n} | {cell.tokens / cell.n:.0f} | {cell.wall_s / cell.n:.1f} |")
    lines += ["", "| method | problems | errors | template echo (lines) | 4-gram repetition | wall s / problem |",
              "|---|---:|---:|---:|---:|---:|"]
    for name, method in stats.items():
        r = method.readability
        lines.append(f"| {name} | {method.problems} | {method.errors} | {r.echo_rate:.1%} ({r.echo_lines}/{r.lines}) | "
                     f"{r.repetition_rate:.1%} | {method.wall_s / max(method.problems, 1):.1f} |")
    return "\n".join(lines) + "\n"


def plot(stats: dict[str, MethodStats], path: Path) -> Path:
    """Accuracy vs budget per method, with the 95% intervals as error bars (PNG)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(figsize=(6.4, 4.2), dpi=120)
    for name, method in stats.items():
        budgets = sorted(b for b, c in method.cells.items() if c.n)
        if not budgets:
            continue
        acc = [method.cells[b].accuracy for b in budgets]
        bounds = [wilson(method.cells[b].correct, method.cells[b].n) for b in budgets]
        errors = [[a - lo for a, (lo, _) in zip(acc, bounds)], [hi - a for a, (_, hi) in zip(acc, bounds)]]
        axes.errorbar(budgets, acc, yerr=errors, marker="o", capsize=3, label=name)
    axes.set_xscale("log", base=2)
    axes.set_xlabel("budget (sequential decode steps)")
    axes.set_ylabel("accuracy")
    axes.set_ylim(-0.02, 1.02)
    axes.grid(alpha=0.3)
    axes.legend()
    figure.tight_layout()
    figure.savefig(path)
    plt.close(figure)
    return path


def write_report(folder: Path) -> tuple[str, Path, Path]:
    """Write ``report.md`` and ``accuracy.png`` into ``folder``; returns (markdown, both paths)."""
    results = ResultsDir(folder)
    config = results.config()
    stats = aggregate(results.records())
    if not stats:
        raise HogwildError(f"{folder}: no results yet; run hogwild eval into it first")
    text = markdown(stats, config)
    report_path, plot_path = Path(folder) / REPORT, Path(folder) / PLOT
    plot(stats, plot_path)
    report_path.write_text(text + f"\n![accuracy vs sequential steps]({PLOT})\n", encoding="utf-8")
    return text, report_path, plot_path
