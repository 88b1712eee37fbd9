"""The output folder of an evaluation: its settings, and one JSON line per (problem, method).

``DIR/config.json`` holds what the results depend on (model, methods, budgets, sampling, data); a
rerun into the same folder must agree with it, then skips every (problem, method) already in
``DIR/results.jsonl``. Each result is appended as one line in one write and flushed to disk, so a
killed run loses at most the problems in flight; a last line cut short by a kill is dropped when
the folder is opened again.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from pathlib import Path

from cache_service.errors import ConfigError, HogwildError

CONFIG = "config.json"
RESULTS = "results.jsonl"


class ResultsDir:
    """An evaluation's folder (created on ``open``)."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)

    @property
    def results_path(self) -> Path:
        return self.path / RESULTS

    def open(self, config: dict) -> set[tuple[str, str]]:
        """Create or reopen the folder for ``config``; the (problem id, method) pairs already done."""
        try:
            self.path.mkdir(parents=True, exist_ok=True)
            stored = self.path / CONFIG
            if stored.exists():
                self._check_same(json.loads(stored.read_text(encoding="utf-8")), config)
            else:
                _write_atomic(stored, json.dumps(config, indent=2, sort_keys=True) + "\n")
            self._drop_partial_line()
        except OSError as err:
            raise HogwildError(f"{self.path}: cannot use the output folder ({err.strerror})") from None
        return {(r["id"], r["method"]) for r in self.records()}

    def _check_same(self, stored: dict, config: dict) -> None:
        differ = sorted(k for k in set(stored) | set(config) if stored.get(k) != config.get(k))
        if differ:
            raise ConfigError(
                f"{self.path} holds results of another evaluation (different {', '.join(differ)}); "
                "give a new --out folder, or the same settings to resume"
            )

    def _drop_partial_line(self) -> None:
        """Cut a last line that a kill left without its newline."""
        path = self.results_path
        if not path.exists():
            return
        data = path.read_bytes()
        if data and not data.endswith(b"\n"):
            with path.open("r+b") as f:
                f.truncate(data.rfind(b"\n") + 1)

    def config(self) -> dict:
        try:
            return json.loads((self.path / CONFIG).read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise ConfigError(f"{self.path}: not an evaluation folder (no {CONFIG}); run hogwild eval first") from None

    def records(self) -> Iterator[dict]:
        """Every complete result line, in the order written."""
        if not self.results_path.exists():
            return
        with self.results_path.open(encoding="utf-8") as f:
            for number, line in enumerate(f, 1):
                if not line.endswith("\n"):
                    return  # cut by a kill: not a result
                try:
                    yield json.loads(line)
                except json.JSONDecodeError:
                    raise ConfigError(f"{self.results_path}:{number}: not a result line (invalid JSON)") from None

    def append(self, record: dict) -> None:
        """Add one result: one line, one write, flushed to disk."""
        line = json.dumps(record, ensure_ascii=False, sort_keys=True) + "\n"
        with self.results_path.open("a", encoding="utf-8") as f:
            f.write(line)
            f.flush()
            os.fsync(f.fileno())


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)
