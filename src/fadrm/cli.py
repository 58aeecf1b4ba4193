"""The ``fadrm`` command: one thin function per subcommand over the Python API."""

from __future__ import annotations

import argparse
import sys
from typing import Any, Sequence

import yaml

from ._version import __version__
from .errors import FadrmError


def _key_values(pairs: Sequence[str] | None) -> dict[str, Any]:
    """Parse ``key=value`` options; values are read as YAML scalars (numbers, booleans, strings)."""
    out: dict[str, Any] = {}
    for pair in pairs or []:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise FadrmError(f"expected key=value, got {pair!r}")
        out[key] = yaml.safe_load(value)
    return out


# The stage whose published precision --amp auto stands for, per subcommand.
_AMP_STAGE = {"train-teacher": "teacher", "distill": "synthesis", "evaluate": "evaluate"}


def _auto_amp_help(command: str) -> str:
    from .runtime import CUDA_AUTO_AMP

    stages = [_AMP_STAGE[command]] if command in _AMP_STAGE else list(CUDA_AUTO_AMP)
    return ", ".join(f"{stage} {CUDA_AUTO_AMP[stage]}" for stage in stages) + " on CUDA"


def _add_runtime_flags(parser: argparse.ArgumentParser, command: str) -> None:
    parser.add_argument("--device", default="auto", help="auto (CUDA when present), cpu, cuda or cuda:N")
    parser.add_argument("--amp", default="auto", choices=["auto", "off", "fp16", "bf16"],
                        help=f"mixed precision (auto: {_auto_amp_help(command)}; off on the CPU)")  # fmt: skip


# ------------------------------------------------------------ train-teacher
def _train_teacher_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("train-teacher", help="train a teacher on a full dataset (resumable)",
                       description="Train a teacher; rerun the same command to resume after an interruption.")  # fmt: skip
    p.add_argument("--dataset", required=True, help="registered dataset name (fadrm list datasets)")
    p.add_argument("--model", required=True, help="registered model name (fadrm list models) or timm:<name>")
    p.add_argument("--out", required=True, help="checkpoint file to write")
    p.add_argument("--data-root", help="dataset folder (default: the dataset's usual place, if any)")
    p.add_argument("--model-arg", action="append", metavar="KEY=VALUE", help="architecture option, e.g. width=64")
    # Unset options come from the dataset preset's teacher recipe, then the package defaults.
    p.add_argument("--epochs", type=int, help="default: the dataset preset's recipe, else 10")
    p.add_argument("--batch-size", type=int, help="default: the dataset preset's recipe, else 256")
    p.add_argument("--lr", type=float,
                   help="peak learning rate of the one-cycle schedule (default: the preset's, else 0.1)")  # fmt: skip
    p.add_argument("--weight-decay", type=float, help="default: the preset's, else 5e-4")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--holdout", type=int, default=0, help="hold out the last N training images per class as val")
    p.add_argument("--workers", type=int, help="data-loading processes (default: 0 on <= 2 cores)")
    p.add_argument("--overwrite", action="store_true", help="discard an existing checkpoint or unfinished run")
    _add_runtime_flags(p, "train-teacher")
    p.set_defaults(handler=_train_teacher)


def _train_teacher(args: argparse.Namespace) -> int:
    from .api import train_teacher

    train_teacher(
        args.dataset, args.model, args.out, data_root=args.data_root, model_args=_key_values(args.model_arg),
        epochs=args.epochs, batch_size=args.batch_size, lr=args.lr, weight_decay=args.weight_decay, seed=args.seed,
        holdout=args.holdout, workers=args.workers, device=args.device, amp=args.amp, overwrite=args.overwrite,
    )  # fmt: skip
    return 0


# ------------------------------------------------------------------ distill
def _distill_parser(sub: argparse._SubParsersAction) -> None:
    from .synthesis.methods import METHODS

    methods = ", ".join(f"{m} ({METHODS.get(m).summary})" for m in METHODS.names())
    p = sub.add_parser("distill", help="build a distilled dataset (resumable)",
                       description=f"Distill a dataset. Methods: {methods}. Unset options come from the "
                       "dataset's preset (fadrm list presets); the resolved config is saved in --out.")  # fmt: skip
    p.add_argument("--dataset", required=True)
    p.add_argument("--teacher", action="append", required=True, dest="teachers",
                   help="teacher checkpoint, .safetensors, or torchvision weights arch:WEIGHTS; repeat for fadrm+")  # fmt: skip
    p.add_argument("--teacher-arch", help="architecture of a plain state-dict teacher")
    p.add_argument("--method", default=None, help="fadrm (default), fadrm+, sre2l, sre2l++ or rded")
    p.add_argument("--ipc", type=int, required=True, help="images per class")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--data-root")
    p.add_argument("--seed", type=int)
    p.add_argument("--holdout", type=int, help="validate on the last N training images per class, not the test set")
    p.add_argument("--sizes", type=int, nargs="+", help="input size of each stage")
    p.add_argument("--budgets", type=int, nargs="+", help="iterations of each stage")
    p.add_argument("--lr", type=float)
    p.add_argument("--r-bn", type=float, help="weight of the BN-statistics loss")
    p.add_argument("--first-bn-multiplier", type=float)
    p.add_argument("--jitter", type=int, help="largest random shift in pixels")
    p.add_argument("--alpha", type=float, help="ARC merge ratio in [0, 1] (1: no residual)")
    p.add_argument("--crop-scale", type=float, nargs=2, metavar=("LOW", "HIGH"))
    p.add_argument("--classes-per-group", type=int, help="classes sharing BN statistics in one group")
    p.add_argument("--groups-per-batch", type=int, help="groups optimised in one forward pass")
    p.add_argument("--mipc", type=int, help="candidate real images per class for patch selection")
    p.add_argument("--num-crop", type=int, help="crops scored per candidate image")
    p.add_argument("--factor", type=int, help="patches per side of a stitched image")
    p.add_argument("--difficulty", help="easy, medium, hard, or a quantile in [0, 1]")
    p.add_argument("--patch-crop-scale", type=float, nargs=2, metavar=("LOW", "HIGH"))
    p.add_argument("--patch-scoring", choices=["pad", "resize"],
                   help="score a patch smaller than the image (factor > 1) zero-padded into the full canvas "
                   "(pad, RDED's) or upsampled to it (resize)")  # fmt: skip
    p.add_argument("--equal-budget", action="store_true", default=None,
                   help="give SRe2L / SRe2L++ FADRM's iteration budget instead of the one their authors ran")  # fmt: skip
    p.add_argument("--overwrite", action="store_true", help="replace a different run already in --out")
    p.add_argument("--compile", action="store_true",
                   help="torch.compile the teachers: minutes of compiling per input size first; "
                   "3%% faster per iteration for a CPU ResNet-18, no gain for small ConvNets")  # fmt: skip
    _add_runtime_flags(p, "distill")
    p.set_defaults(handler=_distill)


def _distill(args: argparse.Namespace) -> int:
    from .api import distill

    options = {k: v for k, v in vars(args).items() if k not in ("handler", "command", "dataset", "teachers", "out")}
    for key in ("crop_scale", "patch_crop_scale"):
        if options[key] is not None:
            options[key] = list(options[key])
    distill(args.dataset, args.teachers, args.out, **options)
    return 0


# ----------------------------------------------------------------- evaluate
def _add_eval_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--student", action="append", dest="students", help="student model; repeat for a cross-architecture table")
    p.add_argument("--epochs", type=int)
    p.add_argument("--batch-size", type=int, help="loader batch: one view draw and one optimiser step each (16)")
    p.add_argument("--accumulation", type=int,
                   help="micro-batches each loader batch is forwarded in, gradients summed (2: BatchNorm sees 8)")  # fmt: skip
    p.add_argument("--optimizer", choices=["adamw", "sgd"])
    p.add_argument("--student-lr", type=float, dest="lr",
                   help="default: the published value for the dataset, student and IPC (the preset's students table)")  # fmt: skip
    p.add_argument("--weight-decay", type=float, help="on multi-dimensional weights only (0.01)")
    p.add_argument("--eta", type=float,
                   help="cosine stretch: lr factor 0.5(1 + cos(pi e / (eta E))); default as --student-lr")  # fmt: skip
    p.add_argument("--temperature", type=float, help="KL temperature (20 as published)")
    p.add_argument("--mix", choices=["cutmix", "mixup", "none"])
    p.add_argument("--mix-alpha", type=float,
                   help="mixing weight ~ Beta(a, a): 1 as published for CutMix; the reference's MixUp uses 0.8")  # fmt: skip
    p.add_argument("--labels", choices=["live", "stored"], help="teacher in the loop, or labels stored once and reused")
    p.add_argument("--labels-dir",
                   help="where stored labels live (default: <out>/labels; repeat r > 0 uses <dir>-repeat<r>)")  # fmt: skip
    p.add_argument("--topk", type=int, help="store only the top-k probabilities per view")
    p.add_argument("--bssl", action=argparse.BooleanOptionalAction, default=None,
                   help="batch-specific soft labels: teachers in train mode on each half of the loader batch "
                   "(the published default; --no-bssl: eval-mode teachers)")  # fmt: skip
    p.add_argument("--teacher-weight", type=float, action="append", dest="teacher_weights")
    p.add_argument("--eval-every", type=int,
                   help="validate after epochs 1, 1+k, 1+2k, ... and the last (published: 10; 0: the last only); "
                   "the best of these is reported beside the last epoch's")  # fmt: skip
    p.add_argument("--eval-at", type=int, nargs="+", help="also validate after these epochs")
    p.add_argument("--baseline", action="append", dest="baselines", choices=["random-real"],
                   help="also train on a random real subset of the same IPC, with soft and hard labels")  # fmt: skip
    p.add_argument("--workers", type=int)
    _add_repeats_flag(p)


def _add_repeats_flag(p: argparse.ArgumentParser) -> None:
    p.add_argument("--repeats", type=int, help="repeat each comparison with seeds seed, seed+1, ... "
                   "(new student init, views and random real subset) and report mean ± std")  # fmt: skip


def _evaluate_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("evaluate", help="train students on a distilled set, report validation accuracy",
                       description="Train fresh students only on a distilled set (soft labels from its teachers) "
                       "and report top-1/top-5 on the real validation set. Finished runs are reused.")  # fmt: skip
    p.add_argument("distilled", help="folder written by fadrm distill")
    p.add_argument("--out", help="results folder (default: <distilled>/eval)")
    p.add_argument("--teacher", action="append", dest="teachers", help="relabelling teacher (default: the set's own)")
    p.add_argument("--data-root")
    p.add_argument("--seed", type=int)
    p.add_argument("--holdout", type=int, help="validate on the last N training images per class, not the test set")
    _add_eval_flags(p)
    _add_runtime_flags(p, "evaluate")
    p.set_defaults(handler=_evaluate)


def _evaluate(args: argparse.Namespace) -> int:
    from .api import evaluate

    options = {k: v for k, v in vars(args).items() if k not in ("handler", "command", "distilled")}
    evaluate(args.distilled, **options)
    return 0


# ---------------------------------------------------------------------- run
def _run_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("run", help="the whole pipeline: teacher, distill, evaluate with a baseline",
                       description="Train (or load) the teacher, distill, evaluate against the random-real "
                       "baseline. Rerunning reuses every finished stage.")  # fmt: skip
    p.add_argument("--dataset", required=True)
    p.add_argument("--ipc", type=int, required=True)
    p.add_argument("--method", default="fadrm")
    p.add_argument("--out", required=True)
    p.add_argument("--teacher", action="append", dest="teachers", help="use these teachers instead of training one")
    p.add_argument("--data-root")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--holdout", type=int, default=0, help="validate on the last N training images per class")
    _add_repeats_flag(p)
    _add_runtime_flags(p, "run")
    p.set_defaults(handler=_run)


def _run(args: argparse.Namespace) -> int:
    from .api import run

    run(args.dataset, args.ipc, args.out, method=args.method, teachers=args.teachers, data_root=args.data_root,
        seed=args.seed, holdout=args.holdout, device=args.device, amp=args.amp,
        eval_options=None if args.repeats is None else {"repeats": args.repeats})  # fmt: skip
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
def build_parser() -> argparse.ArgumentParser:
    """The full argument parser (also used to render the docs)."""
    parser = argparse.ArgumentParser(prog="fadrm", description="Dataset distillation: FADRM, FADRM+, SRe2L, SRe2L++, RDED.")
    parser.add_argument("--version", action="version", version=f"fadrm {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for add in (
        _train_teacher_parser, _distill_parser, _evaluate_parser, _run_parser, _download_parser, _list_parser,
    ):  # fmt: skip
        add(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point: user errors print one line and exit 2; Ctrl-C exits 130 with a resume hint."""
    args = build_parser().parse_args(argv)
    if hasattr(sys.stdout, "reconfigure"):
        sys.stdout.reconfigure(line_buffering=True)  # progress lines reach logs as they happen
    try:
        return args.handler(args)
    except FadrmError as exc:
        print(f"fadrm: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("fadrm: interrupted; run the same command again to resume", file=sys.stderr)
        return 130
