"""The ``hogwild`` command: bad input fails in one line, the demo runs, the live view renders."""

from __future__ import annotations

import io
import json
import shutil
import subprocess
import sys

import pytest

import workers.engine
from cluster.cli import EXIT_BUG, EXIT_ERROR, main
from cluster.events import Delta, Finished, Started, StepDone, Tick
from cluster.transcript import TranscriptBuilder
from cluster.view import ColumnView, LineView, progress_bar, render_columns, wrap

DEMO = "Alice has 3 boxes with 4 apples each. She gives away 5 apples. How many apples does she have left?"


def hogwild(*args: str, timeout: float = 600) -> subprocess.CompletedProcess:
    command = [shutil.which("hogwild")] if shutil.which("hogwild") else [sys.executable, "-m", "deploy.cli"]
    return subprocess.run(command + list(args), capture_output=True, text=True, timeout=timeout)


def assert_one_line_error(code: int, stderr: str, match: str) -> None:
    assert code == EXIT_ERROR
    lines = stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("hogwild: error: "), stderr
    assert match in lines[0] and "Traceback" not in stderr


# ---- bad input -------------------------------------------------------------------------------
@pytest.mark.parametrize("args, match", [
    (["run", ""], "problem is empty"),
    (["run", "   "], "problem is empty"),
    (["run", "2+2?", "--workers", "0"], "workers"),
    (["run", "2+2?", "--workers", "9"], "workers"),
    (["run", "2+2?", "--workers", "two"], "invalid int"),
    (["run", "2+2?", "--max-steps", "0"], "max_steps"),
    (["run", "2+2?", "--max-step-tokens", "-3"], "max_step_tokens"),
    (["run", "2+2?", "--check-every", "-1"], "check_every"),
    (["run", "2+2?", "--temperature", "-1"], "temperature"),
    (["run", "2+2?", "--layout", "diagonal"], "layout"),
    (["run", "2+2?", "--mode", "eventual"], "mode"),
    (["run", "2+2?", "--model", "/no/such/model"], "not found"),
    (["run", "2+2?", "--kv-tokens", "8"], "at least one page"),
    (["run", "2+2?", "--kv-page-size", "0"], "page size"),
    (["run", "2+2?", "--kv-memory-fraction", "1.5"], "memory fraction"),
    (["fly"], "invalid choice"),
    ([], "required"),
])
def test_bad_input_is_one_line(args, match, capsys):
    code = main(args)
    assert_one_line_error(code, capsys.readouterr().err, match)


def test_a_directory_that_is_no_model(tmp_path, capsys):
    code = main(["run", "2+2?", "--model", str(tmp_path)])
    assert_one_line_error(code, capsys.readouterr().err, "cannot load model")


@pytest.mark.slow
@pytest.mark.parametrize("debug", [False, True])
def test_an_unexpected_error_in_a_run_is_one_line(debug, monkeypatch, capsys):
    """A bug inside a run (here the engine's forward raising) ends in one line and exit status 1;
    the traceback only with --debug."""

    def broken(self, *args, **kwargs):
        raise RuntimeError("boom inside the forward")

    monkeypatch.setattr(workers.engine.HogwildEngine, "forward", broken)
    code = main((["--debug"] if debug else []) + ["run", "2+2?", "--max-steps", "2", "--json"])
    err = capsys.readouterr().err
    assert code == EXIT_BUG
    assert err.strip().splitlines()[-1].startswith("hogwild: error: unexpected RuntimeError: boom inside the forward")
    assert ("Traceback" in err) == debug
    if not debug:
        assert len(err.strip().splitlines()) == 1, err


def test_error_in_a_subprocess_has_no_traceback():
    done = hogwild("run", "", "--workers", "2")
    assert_one_line_error(done.returncode, done.stderr, "problem is empty")


@pytest.mark.slow
def test_prompt_longer_than_the_context(capsys):
    code = main(["run", "apple " * 9000, "--model", "default"])
    assert_one_line_error(code, capsys.readouterr().err, "context")


# ---- the demo --------------------------------------------------------------------------------
@pytest.mark.slow
def test_demo_command_json(tmp_path):
    saved = tmp_path / "demo.md"
    done = hogwild("run", DEMO, "--workers", "2", "--model", "default", "--max-steps", "40", "--json",
                   "--transcript", str(saved))
    assert done.returncode == 0, done.stderr
    data = json.loads(done.stdout)
    assert {"answer", "workers", "steps", "wall_s"} <= set(data)
    assert [w["name"] for w in data["workers"]] == ["Alice", "Bob"]
    assert all(w["text"].startswith(f"{w['name']} (step 1):") and w["tokens"] > 0 for w in data["workers"])
    assert 0 < data["steps"] <= 40 and data["wall_s"] > 0
    assert data["reason"] in ("answer", "budget")
    assert saved.read_text().startswith("# Hogwild! session")


# ---- the live view ---------------------------------------------------------------------------
EVENTS = [
    Started(("Alice", "Bob"), "combined", 100, 4),
    Delta(0, 1, "Alice (step 1): Twelve apples.\n\n"),
    Delta(1, 1, "Bob (step 1): Then 5 go"),
    Tick(1, 4, (1, 1)),
    StepDone(0, 1, "Alice (step 1): Twelve apples.\n\n", 9, True),
    Tick(2, 4, (2, 2)),
    Finished("7", "budget", 0, 2),
]


def fold(events):
    builder = TranscriptBuilder(DEMO, 0.0)
    for i, event in enumerate(events):
        builder.add(event, float(i))
    return builder.result()


def test_columns_and_progress():
    rows = render_columns(("Alice", "Bob"), ["a\n" + "x" * 25, "b"], width=23, height=3)
    assert rows == ["Alice      │ Bob", "────────── │ ──────────",  # the last 3 lines of each worker
                    "xxxxxxxxxx │ b", "xxxxxxxxxx │", "xxxxx      │"]
    assert wrap("ab\x1b[2Jcd\tx", 40) == ["ab[2Jcd    x"]  # no control characters reach the terminal
    assert progress_bar(5, 10, 30) == "[########.........] 5/10 steps"


def test_column_view_redraws_with_ansi():
    out = io.StringIO()
    live = ColumnView(out)
    for event in EVENTS:
        live.update(event)
    live.close(fold(EVENTS))
    text = out.getvalue()
    assert "\x1b[H\x1b[J" in text and "Twelve apples." in text and "2/4 steps" in text
    assert text.rstrip().endswith("tok/s)") and "answer: 7" in text


def test_line_view_streams_plain_lines():
    out = io.StringIO()
    live = LineView(out)
    for event in EVENTS:
        live.update(event)
    live.close(fold(EVENTS))
    lines = out.getvalue().splitlines()
    assert "\x1b" not in out.getvalue()
    assert lines[1] == "[Alice] Alice (step 1): Twelve apples."
    assert lines[2] == "[Bob, unfinished] Bob (step 1): Then 5 go"
    assert lines[3].startswith("answer: 7  (budget, 2 steps")


@pytest.mark.slow
def test_converting_the_default_model_prints_nothing(tmp_path, capfd):
    """On a fresh machine the first command converts the GGUF; transformers' progress bar then
    reached stderr, so a one-line error came with a dozen lines before it."""
    from workers.model_store import _convert, default_model_path

    _convert(next(default_model_path().glob("*.gguf")), tmp_path / "model")
    assert (tmp_path / "model" / "config.json").is_file()
    assert capfd.readouterr().err == ""


@pytest.mark.slow
def test_models_pull_prints_the_model_directory(capsys):
    assert main(["models", "pull"]) == 0
    assert "SmolLM2-135M-Instruct" in capsys.readouterr().out
