"""The ``hogwild`` command: ``hogwild run "PROBLEM" ...``, ``hogwild models pull``, ``hogwild eval
DATA --out DIR`` (batch evaluation, locally or as a Ray job) and ``hogwild report DIR``.

Other layers add subcommands without this module importing them (imports flow one way): a
``Command`` is ``(add_parser, run)``; ``deploy.cli`` (the console script) passes ``serve``.

Errors the user can fix end the program with one line, ``hogwild: error: ...``, and exit code 2;
anything unexpected also ends in one line (exit code 1), with the traceback only under ``--debug``.
"""

from __future__ import annotations

import argparse
import sys
import traceback
from pathlib import Path
from collections.abc import Callable, Mapping
from typing import Any, NoReturn

from cache_service.errors import ConfigError, HogwildError
from cluster.protocol import RECENT_TOKENS

EXIT_ERROR = 2
EXIT_BUG = 1
EXIT_INTERRUPTED = 130


class _Parser(argparse.ArgumentParser):
    """argparse whose errors are one ``ConfigError`` line, not a usage block and ``SystemExit``."""

    def error(self, message: str) -> NoReturn:
        raise ConfigError(message)


AddParser = Callable[[Any], None]  # given the subparsers action, adds one subcommand's parser
Command = tuple[AddParser, Callable[[argparse.Namespace], int]]


def build_parser(extra: Mapping[str, Command] | None = None) -> argparse.ArgumentParser:
    parser = _Parser(prog="hogwild", description="Hogwild! Inference: LLM workers sharing one KV cache.")
    parser.add_argument("--debug", action="store_true", help="print the traceback of unexpected errors")
    commands = parser.add_subparsers(dest="command", required=True)
    run = commands.add_parser("run", help="solve a problem with N workers, shown live")
    run.add_argument("problem", nargs="?", default=None, help="the problem to solve (none with --resume)")
    run.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help=argparse.SUPPRESS)
    run.add_argument("--workers", type=int, default=2, help="number of workers, 1..8 (default 2)")
    run.add_argument("--max-steps", type=int, default=256, help="decode steps, one token per worker each")
    _add_generation(run)
    run.add_argument("--kv-tokens", type=int, default=None,
                     help="KV pool size in tokens (default: 32k on CPU, 90%% of free GPU memory on CUDA)")
    run.add_argument("--kv-memory-fraction", type=float, default=None,
                     help="KV pool as this fraction of the device's free memory (instead of --kv-tokens)")
    run.add_argument("--kv-page-size", type=int, default=16, help="tokens per KV page (default 16)")
    run.add_argument("--actors", type=int, default=0,
                     help="run the workers on this many Ray worker actors (0: in this process)")
    run.add_argument("--placement", default="PACK", help="Ray placement strategy: PACK | SPREAD")
    run.add_argument("--ray-address", default=None, help="Ray cluster to join (default: $RAY_ADDRESS, else local)")
    run.add_argument("--json", action="store_true", help="print one JSON object instead of the live view")
    run.add_argument("--transcript", type=Path, help="also save the transcript (.json or .md)")
    run.add_argument("--save", type=Path, default=None,
                     help="save the session to this file every --save-every decode steps (resume with --resume)")
    run.add_argument("--save-every", type=int, default=16, help="decode steps between saves (default 16)")
    run.add_argument("--resume", type=Path, default=None, help="continue a session saved with --save")
    models = commands.add_parser("models", help="manage models")
    models.add_argument("action", choices=["pull"], help="pull: fetch the default model")
    models.add_argument("--force", action="store_true", help="fetch again even when present")
    _add_eval(commands)
    for add_parser, _ in (extra or {}).values():
        add_parser(commands)
    return parser


def _add_generation(parser: argparse.ArgumentParser) -> None:
    """The model, protocol and sampling options that ``run`` and ``eval`` share."""
    parser.add_argument("--model", default="default", help="'default' (SmolLM2-135M-Instruct) or a model path")
    parser.add_argument("--max-step-tokens", type=int, default=128, help="longest step before it is cut")
    parser.add_argument("--check-every", type=int, default=64, help="redundancy check every N tokens (0: off)")
    parser.add_argument("--layout", default="combined", help="combined | contiguous | interleaved")
    parser.add_argument("--mode", default="instant", help="instant | lagged")
    parser.add_argument("--temperature", type=float, default=0.6, help="0 for greedy")
    parser.add_argument("--top-p", type=float, default=0.95)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--repetition-penalty", type=float, default=1.1,
                        help=f"divides the logits of each worker's last {RECENT_TOKENS} sampled tokens "
                             "(1: off; default 1.1)")


def _add_eval(commands) -> None:
    ev = commands.add_parser("eval", help="accuracy vs sequential steps: hogwild vs single vs independent")
    ev.add_argument("data", help="a JSONL file of {id, question, answer}, or builtin:N[:SEED] word problems")
    ev.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help=argparse.SUPPRESS)
    ev.add_argument("--out", type=Path, required=True, help="output folder (reused to resume)")
    ev.add_argument("--methods", nargs="+", default=["hogwild", "single", "independent"],
                    help="any of hogwild single independent (default: all three)")
    ev.add_argument("--workers", nargs="+", type=int, default=[2], help="worker counts of hogwild/independent")
    ev.add_argument("--budgets", nargs="+", type=int, default=[64, 128, 256],
                    help="decode-step budgets; all read from one run per method")
    ev.add_argument("--limit", type=int, default=None, help="only the first N problems")
    _add_generation(ev)
    ev.add_argument("--kv-tokens", type=int, default=None, help="KV pool of each host, in tokens")
    ev.add_argument("--concurrency", type=int, default=8, help="problems in flight per host (default 8)")
    ev.add_argument("--ray", action="store_true", help="run on Ray (automatic inside a Ray job)")
    ev.add_argument("--hosts", type=int, default=0, help="Ray session hosts (0: one per GPU, else one)")
    ev.add_argument("--gang", type=int, default=0,
                    help="on Ray, each session host a gang of N worker actors (a device each; 0: no gangs)")
    ev.add_argument("--ray-address", default=None, help="Ray cluster to join (default: $RAY_ADDRESS)")
    rep = commands.add_parser("report", help="Markdown table and plot of an eval folder")
    rep.add_argument("out", type=Path, help="the folder given to hogwild eval --out")
    rep.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help=argparse.SUPPRESS)


def main(argv: list[str] | None = None, extra: Mapping[str, Command] | None = None) -> int:
    """Run the command line ``argv``; ``extra`` adds subcommands by name."""
    argv = sys.argv[1:] if argv is None else argv
    handlers = {"run": _run, "models": _models, "eval": _eval, "report": _report,
                **{name: run for name, (_, run) in (extra or {}).items()}}
    try:
        args = build_parser(extra).parse_args(argv)
        return handlers[args.command](args)
    except HogwildError as err:
        print(f"hogwild: error: {err}", file=sys.stderr)
        return EXIT_ERROR
    except KeyboardInterrupt:
        print("hogwild: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    except Exception as err:  # a bug: one line for the user, the traceback on request
        if "--debug" in argv:
            traceback.print_exc()
        reason = str(err).strip().splitlines()[0] if str(err).strip() else ""
        print(f"hogwild: error: unexpected {type(err).__name__}: {reason} (a bug: rerun with --debug "
              "for the traceback and report it)", file=sys.stderr)
        return EXIT_BUG


def _run(args: argparse.Namespace) -> int:
    from transformers.utils import logging as hf_logging

    from cluster.session import Session

    hf_logging.disable_progress_bar()  # the terminal belongs to the live view (and stderr to errors)
    hf_logging.set_verbosity_error()
    session = _saved_session(args) if args.save or args.resume else Session(args.problem, _config(args),
                                                                             runner=_runner(args))
    view = None if args.json else _live_view()
    for event in session.events():
        if view:
            view.update(event)
    result = session.result()
    if view:
        view.close(result)
    else:
        print(result.to_json(indent=None))
    if args.transcript:
        _save(result, args.transcript)
    return 0


def _config(args: argparse.Namespace):
    from cache_service.kv_store import PoolConfig
    from cluster.protocol import ProtocolConfig
    from cluster.session import SessionConfig
    from workers.sampling import SamplingParams

    protocol = ProtocolConfig(workers=args.workers, layout=args.layout, max_steps=args.max_steps,
                              max_step_tokens=args.max_step_tokens, check_every=args.check_every)
    sampling = SamplingParams(temperature=args.temperature, top_p=args.top_p, seed=args.seed,
                              repetition_penalty=args.repetition_penalty)
    pool = PoolConfig(tokens=args.kv_tokens, page_size=args.kv_page_size, memory_fraction=args.kv_memory_fraction)
    return SessionConfig(protocol=protocol, sampling=sampling, model=args.model, mode=args.mode, pool=pool)


def _saved_session(args: argparse.Namespace):
    """A session that saves itself (``--save``) or continues a saved one (``--resume``)."""
    from cluster.resume import RaySavedSession, SavedSession

    if args.resume and args.problem is not None:
        raise ConfigError("--resume continues the saved problem; leave out the problem")
    if _runner(args) is not None:  # on Ray worker actors (the address checked before anything loads)
        options = {"strategy": args.placement.upper(), "address": args.ray_address}
        if args.resume:
            return RaySavedSession.resume(args.resume, args.actors, save_to=args.save, every=args.save_every,
                                          **options)
        return RaySavedSession.new(args.problem, _config(args), args.actors, save_to=args.save,
                                   every=args.save_every, **options)
    if args.resume:
        return SavedSession.resume(args.resume, save_to=args.save, every=args.save_every)
    return SavedSession.new(args.problem, _config(args), save_to=args.save, every=args.save_every)


def _runner(args: argparse.Namespace):
    """A Ray runner when ``--actors`` is given, else None (all workers in this process)."""
    if args.actors < 0:
        raise ConfigError(f"--actors must be >= 0, got {args.actors}")
    if not args.actors:
        return None
    from cluster.gang import RayRunner

    return RayRunner(args.actors, strategy=args.placement.upper(), address=args.ray_address)


def _live_view():
    from cluster.view import ColumnView, LineView

    return ColumnView(sys.stdout) if sys.stdout.isatty() else LineView(sys.stdout)


def _save(result, path: Path) -> None:
    text = result.to_json() if path.suffix == ".json" else result.to_markdown()
    try:
        path.write_text(text, encoding="utf-8")
    except OSError as err:
        raise HogwildError(f"cannot write the transcript to {path}: {err.strerror}") from None


def _models(args: argparse.Namespace) -> int:
    from workers.model_store import pull_default_model

    print(pull_default_model(force=args.force))
    return 0


def _eval(args: argparse.Namespace) -> int:
    import os

    from cluster.evaluation.methods import EvalSettings
    from cluster.evaluation.run import evaluate, plan

    if args.limit is not None and args.limit <= 0:
        raise ConfigError(f"--limit must be > 0, got {args.limit}")
    settings = EvalSettings(budgets=tuple(args.budgets), model=args.model, temperature=args.temperature,
                            top_p=args.top_p, seed=args.seed, layout=args.layout, mode=args.mode,
                            max_step_tokens=args.max_step_tokens, check_every=args.check_every,
                            kv_tokens=args.kv_tokens, repetition_penalty=args.repetition_penalty)
    checked = plan(args.data, args.methods, args.workers, settings, args.out, args.limit)
    in_job = bool(os.environ.get("RAY_JOB_ID") or os.environ.get("RAY_ADDRESS"))
    _quiet_transformers()
    report = evaluate(checked, concurrency=args.concurrency, hosts=args.hosts, address=args.ray_address,
                      use_ray=args.ray or in_job, gang=args.gang)
    print(report.read_text(encoding="utf-8"))
    print(f"report: {report}\nplot: {report.parent / 'accuracy.png'}\nresults: {args.out / 'results.jsonl'}")
    return 0


def _report(args: argparse.Namespace) -> int:
    from cluster.evaluation.report import write_report

    text, report, plot = write_report(args.out)
    print(text)
    print(f"report: {report}\nplot: {plot}")
    return 0


def _quiet_transformers() -> None:
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    hf_logging.set_verbosity_error()


if __name__ == "__main__":
    sys.exit(main())
