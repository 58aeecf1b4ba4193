"""The ``fadrm`` command: one thin function per subcommand over the Python API."""

from __future__ import annotations

import argparse
import functools
import os
import signal
import sys
import threading
import types
import typing
from typing import Any, NoReturn, Sequence

from ._version import __version__
from .config import (
    STAGES,
    StageConfig,
    choices_of,
    dump_config,
    dump_yaml,
    flag_of,
    key_of,
    option_fields,
    option_type,
)
from .errors import SYSTEM_FAULT_EXIT, FadrmError, GroupRefusal, Stopped, one_line, system_fault
from .yaml_input import load_yaml


def _key_value(text: str) -> tuple[str, Any]:
    """One ``key=value`` option; the value is read as a YAML scalar (number, boolean, string)."""
    key, sep, value = text.partition("=")
    if not sep or not key:
        raise argparse.ArgumentTypeError(f"expected key=value, got {text!r}")
    try:
        return key, load_yaml(value, repr(text))
    except FadrmError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _add_options(parser: argparse.ArgumentParser, cls: type[StageConfig]) -> None:
    """One flag per option of a stage's config, generated from its declaration (:mod:`fadrm.config`).

    Every flag defaults to unset (None), so the preset and the config file keep their values.
    The options of a part (``synthesis``, ``patches``) are listed under its own heading.
    """
    groups: dict[str, Any] = {}
    for path, f in option_fields(cls):
        if len(path) > 1 and path[0] not in groups:
            part = typing.get_type_hints(cls)[path[0]]
            groups[path[0]] = parser.add_argument_group(f"{path[0]} options", (part.__doc__ or "").split("\n")[0])
        target = groups[path[0]] if len(path) > 1 else parser
        meta, hint = f.metadata, option_type(cls, path)
        item = typing.get_args(hint)[0] if typing.get_origin(hint) is list else hint
        kwargs: dict[str, Any] = {"help": meta["help"], "default": None}
        choices = choices_of(f)
        if choices:
            kwargs["help"] += f" (one of: {', '.join(choices)})"
        if meta["positional"]:
            target.add_argument(f.name, nargs="?", **kwargs)
            continue
        # Named after the flag (--teacher TEACHER), not the option's plural key.
        kwargs.update(dest=key_of(f), metavar=flag_of(f).lstrip("-").replace("-", "_").upper())
        if hint is bool:
            kwargs.update(action=argparse.BooleanOptionalAction, metavar=None)
        elif typing.get_origin(hint) is dict:
            kwargs.update(action="append", type=_key_value, metavar="KEY=VALUE")
        elif meta["repeat"]:
            kwargs.update(action="append", type=item)
        elif typing.get_origin(hint) is list:
            nargs = meta["nargs"]
            kwargs.update(nargs=nargs or "+", type=item)
            if nargs == 2:
                kwargs["metavar"] = ("LOW", "HIGH")
        else:
            # An option of several types (difficulty: a band's name or a quantile) is read as text.
            union = typing.get_origin(hint) in (typing.Union, types.UnionType)
            kwargs["type"] = typing.get_args(hint)[0] if union else hint
        target.add_argument(flag_of(f), **kwargs)


def _given(args: argparse.Namespace, cls: type[StageConfig]) -> dict[str, Any]:
    """The options given on the command line, by key (key=value pairs gathered into a mapping)."""
    given = {}
    for path, f in option_fields(cls):
        name = f.name if f.metadata["positional"] else key_of(f)
        value = getattr(args, name)
        if value is not None and typing.get_origin(option_type(cls, path)) is dict:
            value = dict(value)
        given[name] = value
    return given


def _add_config_flags(parser: argparse.ArgumentParser, replay: bool = True) -> None:
    if replay:
        parser.add_argument(
            "--config",
            metavar="FILE",
            help="options from a YAML file, e.g. the config.yaml a run wrote (replays it exactly); "
            "flags given as well override it",
        )
    parser.add_argument(
        "--print-config",
        action="store_true",
        help="print the resolved configuration (package defaults < the method's < the preset's "
        "section and its overrides for the method and IPC < --config < flags) and exit",
    )


def _stage_parser(
    sub: argparse._SubParsersAction, command: str, help: str, description: str
) -> argparse.ArgumentParser:
    parser = sub.add_parser(command, help=help, description=description)
    _add_options(parser, STAGES[command])
    _add_config_flags(parser, replay=command != "run")
    parser.set_defaults(handler=_handle, stage=STAGES[command])
    return parser


def _handle(args: argparse.Namespace) -> int:
    """Resolve the stage's config from its layers, then print it or run the stage."""
    from . import api

    given = _given(args, args.stage)
    if args.command == "run":  # several stages, no --config
        plan = api.plan_run(**given)
        if args.print_config:
            print(dump_yaml(plan.to_dict()), end="")
        else:
            api.execute_run(plan)
        return 0
    resolve_config, run_stage = api.STAGE_COMMANDS[args.command]
    config = resolve_config(args.config, **given)
    if args.print_config:
        print(dump_config(config), end="")
    else:
        run_stage(config)
    return 0


def _stage_parsers(sub: argparse._SubParsersAction) -> None:
    from .synthesis.methods import METHODS

    methods = ", ".join(f"{m} ({METHODS.get(m).summary})" for m in METHODS.names())
    _stage_parser(
        sub,
        "train-teacher",
        "train a teacher on a full dataset (resumable)",
        "Train a teacher; rerun the same command to resume after an interruption. Unset options come from "
        "the dataset preset's teacher recipe.",
    )
    _stage_parser(
        sub,
        "distill",
        "build a distilled dataset (resumable)",
        f"Distill a dataset. Methods: {methods}. Unset options come from the dataset's preset (fadrm list "
        "presets); the resolved config is saved in --out as config.yaml.",
    )
    _stage_parser(
        sub,
        "evaluate",
        "train students on a distilled set, report validation accuracy",
        "Train fresh students only on a distilled set (soft labels from its teachers) and report top-1/top-5 "
        "on the real validation set. Finished runs are reused. A set made by another tool (an ImageFolder "
        "without manifest.json) needs --dataset and --teacher.",
    )
    _stage_parser(
        sub,
        "stats",
        "the statistics pass: the teachers' training-set statistics (G-VBSM, EDC; resumable)",
        "The statistics pass: one pass over the training split per teacher, recording the statistics at "
        "every convolution and BatchNorm input that G-VBSM and EDC match, globally and per class, into a file "
        "beside the teacher "
        "(fadrm distill computes a missing one itself). Rerun the same command to resume.",
    )
    _stage_parser(
        sub,
        "priors",
        "compute each teacher's prior for a committee method (CV-DD; resumable)",
        "For each teacher, distill an SRe2L++ set from it alone and train one fixed student on it; the "
        "student's last-epoch top-1 is the teacher's prior. Writes --out/priors.json and prints the --prior "
        "flags to pass to fadrm distill. Rerun the same command to resume.",
    )
    _stage_parser(
        sub,
        "run",
        "the whole pipeline: teacher, distill, evaluate with a baseline",
        "Train (or load) the teachers, distill, evaluate against the random-real baseline, each stage with "
        "its preset's options; a committee method without priors computes them first, as fadrm priors. "
        "Rerunning reuses every finished stage.",
    )


# -------------------------------------------------------------------- study
def _study_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "study",
        help="a grid of methods x IPCs x seeds run as one resumable queue, reported as one table",
        description="Run every cell of a study grid (a YAML file: dataset, methods, ipcs, seeds, students, "
        "protocol, baselines, repeats, teachers, data_root, distill, evaluate) as fadrm run runs one, into "
        "OUT/seed<S>/<method>-ipc<N>, then write OUT/study.md, study.json, accuracy-vs-ipc.png and "
        "grids/. Rerun the same command to resume.",
    )
    p.add_argument("grid", help="the study grid (YAML)")
    p.add_argument("--out", required=True, help="the study's folder")
    p.add_argument(
        "--jobs", default="1", help="students trained at once per cell (as fadrm evaluate --jobs; default: 1)"
    )
    p.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N (default: auto)")
    p.set_defaults(handler=_study)


def _study(args: argparse.Namespace) -> int:
    from .study import read_grid, run_study

    run_study(read_grid(args.grid), args.out, jobs=args.jobs, device=args.device)
    return 0


# ----------------------------------------------------------------- download
def _download_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("download", help="fetch fashion-mnist, cifar10 or cifar100 with torchvision (needs network)")
    p.add_argument("dataset")
    p.add_argument("--data-root", required=True, help="folder to download into; pass it as --data-root later")
    p.set_defaults(handler=_download)


def _download(args: argparse.Namespace) -> int:
    from .data.specs import download_dataset

    print(f"{args.dataset} is ready in {download_dataset(args.dataset, args.data_root)}")
    return 0


# --------------------------------------------------------------------- list
def _list_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("list", help="list datasets, models, methods or presets")
    p.add_argument("what", choices=["datasets", "models", "methods", "presets"])
    p.set_defaults(handler=_list)


def _list(args: argparse.Namespace) -> int:
    from .config import preset_names
    from .data import DATASETS
    from .models import list_models
    from .synthesis.methods import METHODS

    if args.what == "datasets":
        for name in DATASETS.names():
            spec = DATASETS.get(name)
            classes = spec.num_classes or "any"
            print(f"{name:14s} {classes!s:>5} classes, {spec.channels} ch, {spec.image_size} px  ({spec.layout})")
    elif args.what == "models":
        print("\n".join(list_models()))
        print("timm:<name>  (any timm model, with pip install 'fadrm[timm]')")
    elif args.what == "methods":
        for name in METHODS.names():
            print(f"{name:8s} {METHODS.get(name).summary}")
    else:
        print("\n".join(preset_names()))
    return 0


# --------------------------------------------------------------------- main
class _Parser(argparse.ArgumentParser):
    """An argument parser whose usage errors are one line (``fadrm: error: ...``), exit status 2."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"fadrm: error: {one_line(message)} (see {self.prog} --help)\n")


# Set to show the traceback of an unexpected error (as --debug does).
DEBUG_VARIABLE = "FADRM_DEBUG"


# What each exit status of ``fadrm`` means (``fadrm --help`` lists them).
EXIT_STATUSES = {
    0: "done",
    1: "a bug in fadrm (the message says how to report it)",
    2: "a mistake in the command or its inputs (the message names it)",
    SYSTEM_FAULT_EXIT: "the operating system refused (disk full, permissions, ...; the message names the path)",
    130: "interrupted (Ctrl-C)",
    141: "the reader of the output went away",
    143: "terminated (SIGTERM: kill, a scheduler's time limit)",
    137: "killed (SIGKILL), or a --jobs student process was (128 + N: by signal N)",
}


def build_parser() -> argparse.ArgumentParser:
    """The full argument parser (also used to render the docs)."""
    parser = _Parser(
        prog="fadrm",
        description="Dataset distillation: FADRM, FADRM+, SRe2L, SRe2L++, RDED, G-VBSM, EDC, CV-DD.",
        epilog="exit status: "
        + "; ".join(f"{code} {meaning}" for code, meaning in EXIT_STATUSES.items())
        + ". A command stopped by 3, 130 or a signal resumes when run again.",
    )
    parser.add_argument("--version", action="version", version=f"fadrm {__version__}")
    parser.add_argument(
        "--debug", action="store_true", help=f"show the traceback of an unexpected error (or set {DEBUG_VARIABLE}=1)"
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for add in (_stage_parsers, _study_parser, _download_parser, _list_parser):
        add(sub)
    return parser


STOP_SIGNALS = (signal.SIGINT,)


def _stopping(message: str, status: int) -> int:
    """Say why the command stopped, ignoring a second Ctrl-C meanwhile: the unwinding and the interpreter's
    exit handlers must not end in a traceback. Ctrl-C reaches the whole process group, so data-loading
    processes end too: PyTorch's SIGCHLD handler, which would report each of them as a failed worker
    while the loaders shut down, is set back to the default."""
    for number in STOP_SIGNALS:
        signal.signal(number, signal.SIG_IGN)
    signal.signal(signal.SIGCHLD, signal.SIG_DFL)
    print(f"fadrm: {message}; run the same command again to resume", file=sys.stderr)
    return status


def _terminated(number: int, frame: types.FrameType | None, *, main_process: int) -> None:
    """SIGTERM (``kill``, a scheduler's time limit): say so in one line, then end as the signal ends a
    process (status 143 to the shell), at once and without unwinding, so that nothing can swallow it.
    Every file is complete or under a temporary name, so the same command resumes. A data-loading
    process that inherited the handler ends silently."""
    if os.getpid() == main_process:
        print("fadrm: terminated (SIGTERM); run the same command again to resume", file=sys.stderr, flush=True)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    os.kill(os.getpid(), signal.SIGTERM)


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point; its exit status says what happened (:data:`EXIT_STATUSES`, listed in ``--help``):
    user errors print one line and exit 2; the operating system's refusals (disk full, permissions)
    one line and exit 3; Ctrl-C exits 130 with a resume hint; a closed output pipe exits 141 quietly;
    any other exception is a bug in fadrm: one line saying so (exit 1), the traceback with --debug.

    Without ``argv`` (the ``fadrm`` command, ``python -m fadrm``) the process is about to exit: a
    second Ctrl-C stays ignored to the end. Called with ``argv`` (in-process), the signal handlers
    are given back as they were.
    """
    args = build_parser().parse_args(argv)
    if hasattr(sys.stdout, "reconfigure"):
        sys.stdout.reconfigure(line_buffering=True)  # progress lines reach logs as they happen
    handlers = {}
    if threading.current_thread() is threading.main_thread():
        handlers = {number: signal.getsignal(number) for number in (*STOP_SIGNALS, signal.SIGCHLD)}
        if argv is None:  # the command itself, not a call in a caller's process
            signal.signal(signal.SIGTERM, functools.partial(_terminated, main_process=os.getpid()))
    try:
        return _run(args)
    finally:
        if argv is not None:
            for number, handler in handlers.items():
                signal.signal(number, handler)


def _run(args: argparse.Namespace) -> int:
    """The command ``args`` names, every way it can end mapped to its exit status (see :func:`main`)."""
    debug = args.debug or os.environ.get(DEBUG_VARIABLE, "") not in ("", "0")
    try:
        return args.handler(args)
    except FadrmError as exc:
        # Under torchrun a refusal every process meets alike is printed once, by rank 0.
        if not (isinstance(exc, GroupRefusal) and os.environ.get("RANK", "0") != "0"):
            print(f"fadrm: error: {one_line(str(exc))}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return _stopping("interrupted", 130)
    except Stopped as exc:
        return _stopping(one_line(str(exc)), exc.status)
    except BrokenPipeError:
        # The reader of our output went away (`fadrm list models | head -1`): as any pipeline producer,
        # stop quietly; stdout goes to /dev/null so the interpreter's final flush cannot fail again.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 141
    except Exception as exc:
        fault = system_fault(exc)
        if debug:
            raise
        if fault is not None:
            print(f"fadrm: error: {one_line(fault)}", file=sys.stderr)
            return SYSTEM_FAULT_EXIT
        detail = " ".join(str(exc).split())[:200]
        print(
            f"fadrm: internal error, a bug in fadrm {__version__} ({type(exc).__name__}: {detail}); please report "
            f"it with the command you ran and the traceback that `fadrm --debug {args.command} ...` (or "
            f"{DEBUG_VARIABLE}=1) prints",
            file=sys.stderr,
        )
        return 1
