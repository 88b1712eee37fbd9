"""The collaboration protocol on a scripted fake backend and a one-character-per-token codec."""

from __future__ import annotations

import pickle
from collections.abc import Sequence

import pytest

from cache_service.errors import ConfigError
from cache_service.layout import View
from cluster.codec import CharCodec, TokenizerCodec
from cluster.detect import find_answer, step_ended
from cluster.events import Check, Delta, Finished, Started, StepDone, Tick
from cluster.layouts import BlockTable, Layout, get_layout, view
from cluster.prompts import Templates
from cluster.protocol import CHECK_SLACK, Program, ProtocolConfig, check_problem
from cluster.transcript import TranscriptBuilder

CODEC = CharCodec()
FILLER = "#"  # what a scripted worker "samples" once its script is used up (also the dropped token)


class ScriptedBackend:
    """A fake ``Backend``: each worker samples its script, one character per step; block contents
    are kept as token ids so tests can read what the cache holds."""

    def __init__(self, scripts: Sequence[str], answer: str | list[int] = "") -> None:
        self.scripts = [CODEC.encode(s) for s in scripts]
        self.answer = CODEC.encode(answer) if isinstance(answer, str) else list(answer)
        self.blocks: dict[int, list[int]] = {}
        self.calls: list[tuple[list, list[int], bool, tuple[int, ...]]] = []

    def new_block(self, reserve: int = 0) -> int:
        self.blocks[len(self.blocks)] = []
        return len(self.blocks) - 1

    def length(self, block: int) -> int:
        return len(self.blocks[block])

    def prefill(self, block: int, tokens: Sequence[int], context: Sequence[int] = ()) -> None:
        self.blocks[block] += list(tokens)

    def step(self, rows, workers, *, greedy=False, suppress=(), recent=()):
        self.calls.append((list(rows), list(workers), greedy, tuple(suppress)))
        for row_view, tokens in rows:
            self.blocks[row_view.target] += list(tokens)
        return [self._next(self.answer if greedy else self.scripts[w]) for w in workers]

    def commit(self, step_block: int, into: int) -> None:
        self.blocks[into] += self.blocks[step_block]
        self.blocks[step_block] = []

    def text(self, block: int) -> str:
        return CODEC.decode(self.blocks[block])

    @staticmethod
    def _next(script: list[int]) -> int:
        return script.pop(0) if script else ord(FILLER)


def run(scripts: Sequence[str], answer: str | list[int] = "", max_context: int = 100_000, **options):
    options.setdefault("check_every", 0)
    config = ProtocolConfig(workers=len(scripts), **options)
    program = Program("What is 2 + 3?", config, CODEC, max_context)
    backend = ScriptedBackend(scripts, answer)
    return program, backend, list(program.run(backend))


def of(events, kind):
    return [e for e in events if isinstance(e, kind)]


# ---- text rules ------------------------------------------------------------------------------
@pytest.mark.parametrize("text, ends", [
    (" It is 5.\n", True),
    (" It is 5\n", True),  # a line, sentence end or not
    (" Done!\n \n", True),
    ("\n", False),  # nothing written on the line yet
    (" \n  ", False),
    (" It is 5.", False),  # the line goes on
    (" It is 5.\nAnd", False),
    ("```\nx = 1.\n", False),  # inside a fenced code block
    ("```\nx = 1\n```\n", True),
])
def test_step_end_detection(text, ends):
    assert step_ended(text, Templates().step_end_re) is ends


def test_a_step_end_is_looked_for_after_the_step_prefix():
    """A prefix that ends its own line is no step of its own: the worker's line ends the step
    (before the fix, the prefix's line break ended every step at its first sampled token)."""
    templates = Templates(step_prefix="{name} (step {step}):\n")
    _, _, events = run([" One.\n" + FILLER + " Two.\n" + FILLER], max_steps=14, templates=templates)
    assert [e.text for e in of(events, StepDone)] == ["Alice (step 1):\n One.\n", "Alice (step 2):\n Two.\n"]


def test_paragraph_steps_are_a_template_away():
    paragraphs = Templates(step_end=r"[.!?][ \t]*\n[ \t]*\n\s*$", step_separator="\n\n")
    _, _, events = run([" One.\nTwo.\n\n" + FILLER + " Three"], max_steps=16, templates=paragraphs)
    assert [e.text for e in of(events, StepDone)] == ["Alice (step 1): One.\nTwo.\n\n"]


def test_answer_extraction():
    answer = Templates().answer_re
    assert find_answer(r"so \boxed{7}.", answer) == "7"
    assert find_answer(r"\boxed{1} then \boxed{ 2 }", answer) == "2"
    assert find_answer(r"\boxed{\frac{1}{2}}", answer) == r"\frac{1}{2}"
    assert find_answer(r"\boxed{7", answer) is None
    assert find_answer(r"\boxed{7} ok", answer, since=len(r"\boxed{7}")) is None
    custom = Templates(answer=r"ANSWER: (\d+)").answer_re
    assert find_answer("ANSWER: 42", custom) == "42"


@pytest.mark.parametrize("override", [
    {"answer": r"\boxed{"},  # not a regex
    {"answer": r"\\boxed"},  # no group
    {"step_end": "("},
    {"step_prefix": "{name} {bogus}"},
    {"step_prefix": "  "},
])
def test_templates_are_checked(override):
    with pytest.raises(ConfigError):
        Templates(**override)


@pytest.mark.parametrize("override", [
    {"workers": 0}, {"workers": 9}, {"max_steps": 0}, {"max_step_tokens": -1},
    {"answer_tokens": 0}, {"check_every": -1}, {"layout": "diagonal"},
])
def test_config_is_checked(override):
    with pytest.raises(ConfigError):
        ProtocolConfig(**override)


@pytest.mark.parametrize("problem", ["", "   \n"])
def test_empty_problem(problem):
    with pytest.raises(ConfigError, match="empty"):
        check_problem(problem)


def test_prompt_longer_than_context():
    with pytest.raises(ConfigError, match="context"):
        Program("x" * 500, ProtocolConfig(), CODEC, max_context=400)


# ---- layouts ---------------------------------------------------------------------------------
def table(n: int) -> BlockTable:
    workers = tuple({"step": 10 + w, "peer_tail": 20 + w, "own_header": 30 + w, "peer_header": 40 + w}
                    for w in range(n))
    return BlockTable(0, {"others_header": 1}, workers)


def test_layout_views():
    t = table(3)
    assert view(get_layout("combined"), t, 0) == View((0, 1, 11, 21, 12, 22, 30, 10), 10)
    assert view(get_layout("contiguous"), t, 1) == View((0, 40, 10, 20, 42, 12, 22, 31, 11), 11)
    assert view(get_layout("interleaved"), t, 2) == View((0, 12), 12)
    assert view(get_layout("combined"), table(1), 0) == View((0, 30, 10), 10)  # no peers: no header


def test_custom_layout_is_data():
    solo = Layout("solo", lead=(), peer=(), own=("own_header", "step"), commits=False)
    assert view(solo, table(2), 1) == View((0, 31, 11), 11)
    with pytest.raises(ConfigError):
        Layout("bad", lead=(), peer=("step",), own=("own_header",), commits=True)
    with pytest.raises(ConfigError):
        get_layout("nope")


# ---- steps and commits -----------------------------------------------------------------------
def test_steps_commit_to_common_history():
    program, backend, events = run([" One.\n" + FILLER + " Two.\n" + FILLER, " Hi.\n" + FILLER],
                                   max_steps=30)
    done = of(events, StepDone)
    assert [(e.worker, e.step) for e in done] == [(1, 1), (0, 1), (0, 2)]  # Bob's step is shorter
    assert done[0].text == "Bob (step 1): Hi.\n"
    assert all(e.committed for e in done)
    common = backend.text(0)
    texts = [e.text for e in done]
    assert common.endswith("".join(texts))  # commit order, after the prompt
    assert FILLER not in common  # the sample drawn after a step end is never written


def test_next_step_starts_with_its_prefix():
    _, _, events = run([" A.\n" + FILLER + " B"], max_steps=12)
    text = "".join(e.text for e in of(events, Delta))
    assert text.startswith("Alice (step 1): A.\nAlice (step 2): B")
    assert [e.forced for e in of(events, Delta)][:2] == [True, False]


def test_contiguous_keeps_steps_in_the_stream():
    _, backend, events = run([" One.\n" + FILLER + " Two.", "x"], max_steps=20, layout="contiguous")
    done = of(events, StepDone)
    assert [e.committed for e in done] == [False]
    streams = [backend.text(b) for b in backend.blocks]
    assert any(s.startswith("Alice (step 1): One.\nAlice (step 2): Two.") for s in streams)
    assert "One." not in backend.text(0)  # nothing went to the common block


def test_no_step_end_inside_code():
    script = "```\nx = 1.\n\ny = 2\n```\n" + FILLER
    _, _, events = run([script], max_steps=len(script) + 5)
    done = of(events, StepDone)
    assert [e.text for e in done] == ["Alice (step 1):```\nx = 1.\n\ny = 2\n```\n"]


def test_long_step_is_cut_with_a_separator():
    _, _, events = run(["abcdefghijklmnop"], max_steps=10, max_step_tokens=4)
    first = of(events, StepDone)[0]
    assert first.text == "Alice (step 1):abcd\n"


def test_redundancy_check_cadence():
    _, _, events = run(["abcd,efgh,ijkl,mnop,qrst,uvwxyz"], max_steps=28, check_every=5)
    checks = of(events, Check)
    assert [c.after_tokens for c in checks] == [5, 10, 15, 20, 25]
    text = "".join(e.text for e in of(events, Delta))
    check = Templates().check
    assert text.count(check) == 5 and "abcd," + check + "efgh," + check in text
    _, _, quiet = run(["abcd,efgh,ijkl,mnop,qrst,uvwxyz"], max_steps=28, check_every=0)
    assert not of(quiet, Check)


def test_redundancy_check_waits_for_a_clause_end():
    _, _, events = run(["abcdefg. hijklmnopqrstuvwxyzabcdefghijklmnop"], max_steps=40, check_every=4)
    assert [c.after_tokens for c in of(events, Check)] == [8, 8 + 4 + CHECK_SLACK]


# ---- the end ---------------------------------------------------------------------------------
def test_answer_in_a_stream_ends_the_session():
    program, backend, events = run(["Let me think about it", r"So \boxed{5}"], max_steps=50)
    end = events[-1]
    assert isinstance(end, Finished)
    assert (end.answer, end.reason, end.by) == ("5", "answer", 1)
    assert end.steps == len(r"So \boxed{5}")
    assert not any(greedy for _, _, greedy, _ in backend.calls)


def test_finisher_asks_and_decodes_greedily():
    program, backend, events = run(["abc", "def"], answer="12} and more", max_steps=6)
    end = events[-1]
    assert (end.answer, end.reason, end.by, end.steps) == ("12", "budget", 0, 6)
    finisher = [c for c in backend.calls if c[2]]
    assert len(finisher) == 3  # "1", "2", "}" then the answer is complete
    assert all(workers == [0] and suppress == () for _, workers, _, suppress in finisher)
    assert backend.text(finisher[0][0][0][0].target).endswith(Templates().finisher + "12")


def test_finisher_without_a_closed_answer():
    _, _, events = run(["abc"], answer="seven\nmore", max_steps=3, answer_tokens=5)
    assert events[-1].answer == "seven"
    _, _, events = run(["abc"], answer="", max_steps=3)  # "#" forever, never closed
    assert events[-1].answer == FILLER * 16


def test_finisher_stops_at_a_stop_token():
    _, backend, events = run(["abc"], answer=[ord("4"), 0], max_steps=3)
    assert events[-1].answer == "4"


def test_reasoning_steps_suppress_stop_tokens():
    _, backend, _ = run(["abc", "def"], max_steps=5)
    reasoning = [c for c in backend.calls if not c[2]]
    assert len(reasoning) == 5 and all(c[3] == CODEC.stop_ids for c in reasoning)


def test_context_limit_hands_over_to_the_finisher():
    probe = Program("What is 2 + 3?", ProtocolConfig(workers=2), CODEC, 100_000)
    limit = len(probe.prompt_ids) + 600
    program, backend, events = run(["a" * 500, "b" * 500], answer="3}", max_context=limit,
                                   max_steps=400, max_step_tokens=1000)
    end = events[-1]
    assert end.reason == "context" and end.answer == "3" and end.steps < 400
    for rows, _, _, _ in backend.calls:
        for row_view, _ in rows:
            assert sum(backend.length(b) for b in row_view.blocks) <= limit


# ---- events, determinism ---------------------------------------------------------------------
def test_events_tell_the_whole_story():
    _, _, events = run([" One.\n" + FILLER + " Two", " Three"], max_steps=15)
    assert isinstance(events[0], Started) and events[0].workers == ("Alice", "Bob")
    ticks = of(events, Tick)
    assert [t.step for t in ticks] == list(range(1, 16))
    assert ticks[-1].tokens == (14, 15)  # Alice's sample after her step end was dropped
    builder = TranscriptBuilder("What is 2 + 3?", 0.0)
    for i, event in enumerate(events):
        builder.add(event, float(i))
    result = builder.result()
    assert result.workers[0].text.startswith("Alice (step 1): One.\nAlice (step 2): Two")
    assert [r.finished for r in result.transcript] == [True, False, False]
    assert result.transcript[0].text == "Alice (step 1): One.\n"


def test_program_is_picklable_and_deterministic():
    program, _, events = run(["One.\n\n" + FILLER + "Two", r"\boxed{x"], max_steps=12, check_every=3)
    clone = pickle.loads(pickle.dumps(program))
    again = list(clone.run(ScriptedBackend(["One.\n\n" + FILLER + "Two", r"\boxed{x"])))
    assert again == events


# ---- codecs ----------------------------------------------------------------------------------
class _ThinkingTokenizer:
    """A stand-in for a reasoning model's tokenizer (chat template without the think tag)."""

    chat_template = "..."
    all_special_ids = [0, 1]
    eos_token_id, bos_token_id = 1, 0

    def get_vocab(self):
        return {"<think>": 7, "</think>": 8, "a": 9}

    def apply_chat_template(self, messages, tokenize, add_generation_prompt):
        return "".join(f"<{m['role']}>{m['content']}" for m in messages) + "<assistant>"


def test_reasoning_models_get_the_think_tag():
    codec = TokenizerCodec(_ThinkingTokenizer())
    assert codec.render_chat("S", "U") == "<system>S<user>U<assistant><think>\n"
    assert codec.stop_ids == (0, 1, 8)


def test_char_codec_round_trip():
    assert CODEC.decode(CODEC.encode("Hi (step 2):\n")) == "Hi (step 2):\n"
    with pytest.raises(ConfigError):
        CharCodec(64)
