"""Batch evaluation (cluster.evaluation): answers at budgets from one run, resume, votes,
normalisation, metrics, report and plot, bad input. Tiny random models; the Ray job is in
tests/test_eval_ray.py."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from cache_service.errors import ConfigError
from cache_service.kv_store import PoolConfig
from cluster.cli import main
from cluster.evaluation.answers import majority, normalize, same
from cluster.evaluation.data import builtin_problems, load_problems
from cluster.evaluation.methods import EvalSettings, Method, Trace, parse_methods
from cluster.evaluation.metrics import header_pattern, readability, sampled_lines, scaffolding
from cluster.evaluation.report import wilson
from cluster.evaluation.run import evaluate, plan
from cluster.events import Delta, Finished, Probe, Started, Tick
from cluster.host import SessionHost
from cluster.prompts import Templates
from cluster.protocol import ProtocolConfig
from cluster.session import Session, SessionConfig
from tests.test_host import run_to_the_end
from tests.test_session import NO_ANSWERS
from workers.engine import HogwildEngine
from workers.model import load_model, tiny_config
from workers.sampling import SamplingParams

ROOT = Path(__file__).resolve().parents[1]
TINY = tiny_config("llama", initializer_range=0.15)


def save_tiny_model(folder: Path) -> Path:
    """A tiny random llama with a character-level tokenizer, saved so that any process loads it by path."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
    from transformers import AutoModelForCausalLM, PreTrainedTokenizerFast

    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(TINY).save_pretrained(folder)
    vocab = {"<unk>": 0, "</s>": 1, **{chr(i): i for i in range(2, TINY.vocab_size)}}
    tokenizer = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")
    tokenizer.decoder = decoders.Fuse()
    PreTrainedTokenizerFast(tokenizer_object=tokenizer, unk_token="<unk>", eos_token="</s>").save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def tiny():
    return load_model(TINY, dtype=torch.float32, device="cpu")


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    return save_tiny_model(tmp_path_factory.mktemp("tiny-model"))


# ---- answers ------------------------------------------------------------------------------------
@pytest.mark.parametrize("text, want", [
    ("42", "42"), ("\\boxed{42}", "42"), ("\\boxed{\\frac{3}{4}}", "3/4"), ("0.75", "3/4"), ("3/4", "3/4"),
    ("\\dfrac{10}{4}", "5/2"), ("1,234", "1234"), ("$1,234.00", "1234"), ("1234.", "1234"),
    ("1234 apples", "1234"), ("15%", "15"), ("-5", "-5"), ("x = 17", "17"), ("3 + 4 = 7", "7"),
    ("1 1/2", "3/2"), (".5", "1/2"), ("\\boxed{\\text{Paris}}", "paris"), (" Paris. ", "paris"),
    ("\\boxed{x^{2}}", "x^{2}"), ("", None), (None, None), ("1/0", "1/0"),
])
def test_normalize(text, want):
    assert normalize(text) == want


def test_same_compares_normalised_and_no_answer_is_wrong():
    assert same("\\boxed{12}", "12.0") and same("0.5", "1/2") and not same("13", "12")
    assert not same(None, "12") and not same("", "")


@pytest.mark.parametrize("answers, want", [
    (["4", "5", "5"], "5"),
    (["4", "5"], "4"),  # a tie goes to the answer given first ...
    (["5", "4"], "5"),  # ... whatever it is
    (["3", "7", "7", "3"], "3"),
    (["0.5", "3", "1/2"], "0.5"),  # equal after normalisation: one vote
    ([None, None, "9"], "9"),  # no answer abstains
    ([None, None], None),
])
def test_majority_vote(answers, want):
    assert majority(answers) == want


# ---- data ---------------------------------------------------------------------------------------
def test_jsonl_with_gsm8k_answers_and_default_ids(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_text('{"id": "a", "question": "Q1?", "answer": "so 3+4=7.\\n#### 1,234"}\n\n'
                    '{"question": "Q2?", "answer": 5}\n')
    problems = load_problems(str(path))
    assert [(p.id, p.question, p.answer) for p in problems] == [("a", "Q1?", "1,234"), ("3", "Q2?", "5")]
    assert same("1234", problems[0].answer)


@pytest.mark.parametrize("text, message", [
    ('{"question": "Q", "answer": "1"}\n{"question": "Q", \n', "d.jsonl:2: not valid JSON"),
    ('{"question": "Q", "answer": "1"}\n{"question": "Q2"}\n', "d.jsonl:2: no answer"),
    ('{"answer": "1"}\n', "d.jsonl:1: no question"),
    ('[1, 2]\n', "d.jsonl:1: expected a JSON object"),
    ('{"id": 1, "question": "Q", "answer": "1"}\n{"id": 1, "question": "R", "answer": "2"}\n',
     "d.jsonl:2: id '1' was already used on line 1"),
    ('\n\n', "holds no problems"),
])
def test_bad_data_files_name_file_and_line(tmp_path, text, message):
    path = tmp_path / "d.jsonl"
    path.write_text(text)
    with pytest.raises(ConfigError, match=message):
        load_problems(str(path))


def test_builtin_problems_are_seeded_exact_and_levelled():
    problems = builtin_problems(30)
    assert problems == builtin_problems(30) and problems != builtin_problems(30, seed=1)
    assert [p.level for p in problems[:6]] == [1, 2, 3, 1, 2, 3]
    assert len({p.question for p in problems}) == 30
    for p in problems:
        numbers = [int(n) for n in __import__("re").findall(r"\d+", p.question)]
        if "marbles" in p.question:
            assert int(p.answer) == numbers[0] + numbers[1]
        elif "eggs" in p.question:
            red, blue, each, cartons = numbers
            assert int(p.answer) * cartons == (red + blue) * each
        assert int(p.answer) > 0


# ---- answers at budgets from one run ------------------------------------------------------------
def _session(tiny, max_steps, checkpoints=(), templates=NO_ANSWERS, sampling=SamplingParams(temperature=0.9, seed=3)):
    protocol = ProtocolConfig(workers=2, max_steps=max_steps, max_step_tokens=6, check_every=5,
                              checkpoints=checkpoints, templates=templates)
    program = Session("What is 2 + 3?", SessionConfig(protocol=protocol), lm=tiny).program
    host = SessionHost(HogwildEngine(tiny, pool=PoolConfig(tokens=1 << 15)))
    return list(host.submit(program, sampling).events())


def _finisher_text(events) -> str:
    """What the finisher wrote after the finisher prompt (from worker 0's last deltas)."""
    finisher = Templates().finisher
    text = "".join(e.text for e in events if isinstance(e, Delta) and e.worker == 0)
    return text[text.rindex(finisher) + len(finisher):]


@pytest.mark.parametrize("sampling", [SamplingParams(), SamplingParams(temperature=0.9, top_p=0.9, seed=3)])
def test_answers_at_checkpoints_equal_runs_cut_at_each_budget(tiny, sampling):
    budgets = (5, 12, 21)
    one = _session(tiny, 30, budgets, sampling=sampling)
    probes = {e.steps: e for e in one if isinstance(e, Probe)}
    assert sorted(probes) == list(budgets)
    for budget in budgets:
        cut = _session(tiny, budget, sampling=sampling)
        finished = cut[-1]
        assert isinstance(finished, Finished) and finished.reason == "budget" and finished.steps == budget
        assert probes[budget].answer == finished.answer
        assert probes[budget].text == _finisher_text(cut)
    assert any(p.answer for p in probes.values())  # the tiny model does write something to compare
    # the probes leave the session untouched: the same events as a run without checkpoints
    plain = _session(tiny, 30, sampling=sampling)
    assert [e for e in one if not isinstance(e, Probe)] == plain


def test_checkpoints_are_checked():
    with pytest.raises(ConfigError, match="checkpoints must lie between 1 and max_steps - 1"):
        ProtocolConfig(max_steps=64, checkpoints=(32, 64))
    assert ProtocolConfig(max_steps=64, checkpoints=(32, 8, 32)).checkpoints == (8, 32)


def test_a_session_that_answered_early_gives_that_answer_at_later_budgets():
    trace = Trace()
    for now, event in enumerate([Started(("Alice",), "combined", 10, 64), Tick(4, 64, (4,)),
                                 Probe(4, "7", 0, "7}"), Tick(5, 64, (5,)), Finished("8", "answer", 0, 5)]):
        trace.add(event, float(now))
    assert [trace.answer_at(b) for b in (3, 4, 5, 64)] == [None, "7", "8", "8"]
    assert [trace.tokens_at(b) for b in (3, 4, 64)] == [0, 4, 5]
    assert [trace.clock_at(b) for b in (4, 64)] == [2.0, 4.0]


# ---- metrics ------------------------------------------------------------------------------------
def test_template_echo_and_repetition_count_sampled_lines_only():
    t = Templates()
    events = [Delta(0, 1, "Alice (step 1):", True), Delta(0, 1, " We have 3 boxes.\n"),
              Delta(0, 1, "Meanwhile, the others are writing:\n"), Delta(0, 1, "Bob (step 7): hi\n"),
              Delta(0, 1, "Work in short steps.\n\n"), Delta(0, 2, "Alice (step 2):", True),
              Delta(0, 2, " add add add add add add"), Delta(1, 1, "Carol (step 1): other worker\n")]
    lines = sampled_lines(events, 0)
    assert lines == ["We have 3 boxes.", "Meanwhile, the others are writing:", "Bob (step 7): hi",
                     "Work in short steps.", "add add add add add add"]
    counts = readability(lines, scaffolding(t, ("Alice", "Bob"), "combined"), header_pattern(t))
    assert (counts.lines, counts.echo_lines) == (5, 3)
    assert counts.ngrams > 0 and counts.repeated_ngrams == 2  # "add add add add" thrice in a row


# ---- the harness --------------------------------------------------------------------------------
def _plan(model_dir, out, n=4, methods=("hogwild", "single", "independent"), budgets=(4, 8, 16), **settings):
    settings = EvalSettings(budgets=budgets, model=str(model_dir), max_step_tokens=6, check_every=5,
                            kv_tokens=1 << 14, **settings)
    return plan(f"builtin:{n}", list(methods), [2], settings, out)


def _lines(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]


def test_eval_writes_results_report_and_plot(model_dir, tmp_path):
    out = tmp_path / "run"
    report = evaluate(_plan(model_dir, out), concurrency=6)
    records = _lines(out)
    assert sorted((r["id"], r["method"]) for r in records) == sorted(
        (f"builtin-0-{i:04d}", m) for i in range(4) for m in ("hogwild-2", "single", "independent-2"))
    for r in records:
        assert r["error"] is None and sorted(r["budgets"], key=int) == ["4", "8", "16"]
        tokens = [r["budgets"][b]["tokens"] for b in ("4", "8", "16")]
        assert tokens == sorted(tokens) and tokens[0] > 0
        if r["method"] == "independent-2":
            for result in r["budgets"].values():
                assert len(result["votes"]) == 2 and result["answer"] == majority(result["votes"])
        assert len(r["texts"]) == (2 if r["method"] == "independent-2" else 1)
    text = report.read_text()
    for method in ("hogwild-2", "single", "independent-2"):
        for budget in (4, 8, 16):
            assert f"| {method} | {budget} |" in text
    assert "template echo" in text
    assert (out / "accuracy.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # hogwild report DIR rewrites both from the results alone
    (out / "report.md").unlink()
    (out / "accuracy.png").unlink()
    assert main(["report", str(out)]) == 0
    assert (out / "report.md").exists() and (out / "accuracy.png").exists()


def test_resume_after_a_kill_loses_only_what_was_in_flight(model_dir, tmp_path):
    """A CLI run killed with SIGKILL mid-way (plus a line torn by the kill), then rerun: every
    (problem, method) once, the lines written before the kill kept, the same answers as a clean run."""
    clean, killed = tmp_path / "clean", tmp_path / "killed"
    evaluate(_plan(model_dir, clean, n=8, methods=("hogwild", "single")), concurrency=2)
    command = [sys.executable, "-m", "deploy.cli", "eval", "builtin:8", "--methods", "hogwild", "single",
               "--workers", "2", "--budgets", "4", "8", "16", "--model", str(model_dir), "--max-step-tokens", "6",
               "--check-every", "5", "--kv-tokens", str(1 << 14), "--concurrency", "2", "--out", str(killed)]
    child = subprocess.Popen(command, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    results = killed / "results.jsonl"
    deadline = time.monotonic() + 60
    while not (results.exists() and len(results.read_text().splitlines()) >= 2):
        assert child.poll() is None and time.monotonic() < deadline, "the run ended before it could be killed"
        time.sleep(0.05)
    os.kill(child.pid, signal.SIGKILL)
    child.wait()
    before = results.read_text().splitlines()
    assert 2 <= len(before) < 16
    with results.open("a") as f:
        f.write('{"id": "builtin-0-0007", "meth')  # a line the kill cut short
    assert main(command[3:]) == 0
    after = _lines(killed)
    assert [json.dumps(r, sort_keys=True, ensure_ascii=False) for r in after[: len(before)]] == before
    key = lambda r: (r["id"], r["method"])  # noqa: E731
    assert sorted(map(key, after)) == sorted(map(key, _lines(clean)))
    answers = lambda rs: {key(r): {b: v["answer"] for b, v in r["budgets"].items()} for r in rs}  # noqa: E731
    assert answers(after) == answers(_lines(clean))


def test_rerun_with_other_settings_is_refused(model_dir, tmp_path):
    out = tmp_path / "run"
    evaluate(_plan(model_dir, out, n=1, methods=("single",), budgets=(4, 8)), concurrency=1)
    with pytest.raises(ConfigError, match="another evaluation .*settings"):
        evaluate(_plan(model_dir, out, n=1, methods=("single",), budgets=(4, 16)), concurrency=1)
    assert evaluate(_plan(model_dir, out, n=1, methods=("single",), budgets=(4, 8)), concurrency=1).exists()
    assert len(_lines(out)) == 1  # nothing left to do


# ---- bad input ----------------------------------------------------------------------------------
@pytest.mark.parametrize("argv, message", [
    (["{missing}"], "missing.jsonl: no such data file"),
    (["{bad}"], "bad.jsonl:2: no answer"),
    (["builtin:3", "--methods", "hogwild", "ensemble"], "unknown methods ['ensemble']"),
    (["builtin:3", "--budgets", "64", "0"], "budgets must be decode steps > 0"),
    (["builtin:3", "--budgets", "-4"], "budgets must be decode steps > 0"),
    (["builtin:3", "--workers", "1"], "--workers must lie between 2"),
    (["builtin:zero"], "builtin:N"),
])
def test_bad_input_is_one_line_and_writes_nothing(tmp_path, capsys, argv, message):
    (tmp_path / "bad.jsonl").write_text('{"question": "Q", "answer": "1"}\n{"question": "Q2"}\n')
    argv = [a.format(missing=tmp_path / "missing.jsonl", bad=tmp_path / "bad.jsonl") for a in argv]
    out = tmp_path / "out"
    assert main(["eval", *argv, "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("hogwild: error: ") and message in err and err.count("\n") == 1
    assert not out.exists()


def test_report_of_a_folder_without_results_is_an_error(tmp_path, capsys):
    assert main(["report", str(tmp_path)]) == 2
    assert "not an evaluation folder" in capsys.readouterr().err


def test_wilson_interval():
    low, high = wilson(5, 10)
    assert low == pytest.approx(0.2366, abs=1e-4) and high == pytest.approx(0.7634, abs=1e-4)
    assert wilson(0, 10)[0] == 0.0 and wilson(0, 10)[1] == pytest.approx(0.2775, abs=1e-4)
    assert wilson(0, 0) == (0.0, 0.0)
    # the interval holds its proportion despite rounding (0/12 once gave a lower bound of 1e-17 > 0,
    # a negative error bar that stopped the plot)
    assert all(wilson(0, n)[0] == 0.0 and wilson(n, n)[1] == 1.0 for n in range(1, 200))


def test_methods_are_parsed():
    assert [m.name for m in parse_methods(["hogwild", "single", "independent"], [2, 4])] == [
        "hogwild-2", "hogwild-4", "single", "independent-2", "independent-4"]
    assert Method("independent", 3).sessions == 3 and Method("hogwild", 3).session_workers == 3


@pytest.mark.parametrize("max_steps, every", [(40, 5), (2000, 40)])  # 2000: the context ends the run
def test_probes_stay_within_the_worst_case_a_session_is_admitted_by(tiny, max_steps, every):
    protocol = ProtocolConfig(workers=3, max_steps=max_steps, max_step_tokens=12, check_every=0,
                              templates=NO_ANSWERS, checkpoints=tuple(range(every, max_steps, every)))
    prog = Session("Spell 'cat' backwards.", SessionConfig(protocol=protocol), lm=tiny).program
    h = SessionHost(HogwildEngine(tiny, pool=PoolConfig(tokens=1 << 16)))
    events, peak = run_to_the_end(h, prog, SamplingParams(temperature=1.0, seed=2))
    assert 0 < peak <= prog.worst_case_pages(16)
    assert sum(isinstance(e, Probe) for e in events) >= 2
    assert events[-1].reason == ("context" if max_steps == 2000 else "budget")


def test_progress_bar_on_a_terminal_and_lines_in_a_log():
    import io

    from cluster.evaluation.progress import Progress

    record = {"id": "p1", "method": "single", "error": None, "budgets": {"32": {"correct": True}}}
    bar, log = io.StringIO(), io.StringIO()
    for stream, tty in ((bar, True), (log, False)):
        progress = Progress(4, done=1, stream=stream, tty=tty)
        progress.update(record)
        progress.close()
    assert bar.getvalue().startswith("\r[##############..............] 2/4 (50%)") and "ETA" in bar.getvalue()
    assert log.getvalue().startswith("eval: 2/4 (50%)") and log.getvalue().endswith("p1 single: 32:ok\n")
