"""Byte check for a change that should move code only: every output of a fixed set of commands, hashed.

A layout change (modules moved, split or renamed) must not change one output byte. This script runs
the same commands with whatever ``fadrm`` is importable (point ``PYTHONPATH`` at the tree under
test), one thread on the CPU, and hashes what they write:

- a teacher trained on the Fashion-MNIST fixture;
- every registered method distilled at a small shape (two teachers where a method takes several),
  with the statistics pass's files of G-VBSM and EDC;
- a stored-label evaluation of the RDED set with the random-real baseline, and one of the G-VBSM
  set under its own protocol (MSE + cross-entropy, SGD) with live labels;
- a foreign ImageFolder (the RDED set's images in class folders) evaluated with stored labels.

Every PNG is hashed as bytes; every ``.pt`` file by its content (tensors and values, read with
``weights_only=True``: the archive's bytes name the temporary file it was written to); JSON, YAML
and Markdown files without the values that differ between two runs of the same inputs (timings,
memory, versions) and with the work and fixture folders replaced by their roles.

Usage (before and after a change; the fixtures are made once and shared)::

    python benchmarks/layout_bytes.py fixtures /tmp/lb/fixtures
    PYTHONPATH=<before>/src python benchmarks/layout_bytes.py outputs /tmp/lb/fixtures /tmp/lb/before
    PYTHONPATH=<after>/src python benchmarks/layout_bytes.py outputs /tmp/lb/fixtures /tmp/lb/after
    python benchmarks/layout_bytes.py compare /tmp/lb/before/hashes.json /tmp/lb/after/hashes.json \\
        --out benchmarks/results/layout-bytes.json

An evaluation folder of an older release must still resume its interrupted student and reuse its
finished ones (in place: a finished run's identity names the set's folder)::

    PYTHONPATH=<old>/src python benchmarks/layout_bytes.py interrupt /tmp/lb/fixtures /tmp/lb/old
    PYTHONPATH=<new>/src python benchmarks/layout_bytes.py resume /tmp/lb/fixtures /tmp/lb/old
"""

from __future__ import annotations

import argparse
import hashlib
import io
import json
import re
import shutil
import sys
from pathlib import Path
from typing import Any

import torch

torch.set_num_threads(1)

# Values that differ between two runs of the same inputs.
VOLATILE = {
    "fadrm_version",
    "torch_version",
    "python_version",
    "wall_seconds_this_session",
    "synthesis_seconds_per_image",
    "peak_memory_bytes",
    "seconds",
    "seconds_per_image",
    "seconds_per_epoch",
    "train_seconds",
    "created",
    "finished",
}
SHAPE = ["--ipc", "2", "--sizes", "24", "28", "--budgets", "6", "6", "--mipc", "16", "--num-crop", "2"]
QUICK = ["--epochs", "2", "--batch-size", "8", "--device", "cpu", "--amp", "off", "--workers", "0"]
RESUMED = "random-real-convnet-small-soft"


def make_fixtures(folder: Path) -> None:
    """The test suite's Fashion-MNIST fixture and its two tiny teachers, written to ``folder``."""
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
    from conftest import class_images, make_teacher_checkpoint, write_idx

    data = folder / "fmnist"
    data.mkdir(parents=True, exist_ok=True)
    for prefix, per_class, seed in (("train", 16, 0), ("t10k", 4, 1)):
        images, labels = class_images(10, per_class, 1, 28, seed)
        write_idx(data / f"{prefix}-images-idx3-ubyte.gz", images[..., 0])
        write_idx(data / f"{prefix}-labels-idx1-ubyte.gz", labels)
    make_teacher_checkpoint(folder / "teacher.pt", width=8)
    make_teacher_checkpoint(folder / "teacher2.pt", seed=1, width=6, depth=2)


def fadrm_cli(*argv: str) -> None:
    """``fadrm ARGV`` in this process; a non-zero exit stops the check."""
    from fadrm.cli import main

    print("$ fadrm " + " ".join(argv), flush=True)
    code = main(list(argv))
    if code:
        sys.exit(f"fadrm {argv[0]} exited with {code}")


def run_commands(fixtures: Path, work: Path) -> None:
    """The commands whose outputs are hashed."""
    from fadrm.synthesis.methods import METHODS

    data, teacher, second = str(fixtures / "fmnist"), str(fixtures / "teacher.pt"), str(fixtures / "teacher2.pt")
    fadrm_cli(
        "train-teacher",
        *("--dataset", "fashion-mnist", "--model", "convnet-small", "--model-arg", "width=8"),
        *("--epochs", "2", "--batch-size", "32", "--data-root", data, "--device", "cpu", "--workers", "0"),
        *("--out", str(work / "teacher" / "teacher.pt")),
    )
    for method in METHODS.names():
        several = METHODS.get(method).max_teachers is None
        teachers = [teacher, second] if several else [teacher]
        flags = [arg for t in teachers for arg in ("--teacher", t)]
        fadrm_cli(
            "distill",
            *("--dataset", "fashion-mnist", "--method", method, *flags, *SHAPE, "--classes-per-group", "5"),
            *("--data-root", data, "--device", "cpu", "--out", str(work / "sets" / method)),
            # The statistics pass's files (G-VBSM, EDC) in the work folder, so they are hashed too.
            *("--stats-dir", str(work / "statistics")),
        )
    rded = work / "sets" / "rded"
    fadrm_cli("evaluate", str(rded), "--data-root", data, "--labels", "stored", "--baseline", "random-real", *QUICK)
    fadrm_cli("evaluate", str(work / "sets" / "g-vbsm"), "--data-root", data, "--protocol", "own", *QUICK)
    foreign = work / "foreign"
    manifest = json.loads((rded / "manifest.json").read_text())
    for png in sorted((rded / "images").rglob("*.png")):
        target = foreign / png.parent.name / png.name
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(png, target)
    assert manifest["format"] == "fadrm-distilled"
    fadrm_cli(
        "evaluate",
        *(str(foreign), "--dataset", "fashion-mnist", "--teacher", teacher, "--data-root", data),
        *("--labels", "stored", *QUICK),
    )


def canonical(value: Any, roles: dict[str, str]) -> Any:
    """``value`` without :data:`VOLATILE` keys, each path in ``roles`` replaced by its role."""
    if isinstance(value, dict):
        return {str(k): canonical(v, roles) for k, v in value.items() if k not in VOLATILE}
    if isinstance(value, (list, tuple)):
        return [canonical(v, roles) for v in value]
    if isinstance(value, torch.Tensor):
        return {"tensor": str(value.dtype), "shape": list(value.shape), "sha256": tensor_sha(value)}
    if isinstance(value, str):
        for path, role in roles.items():
            value = value.replace(path, role)
    return value


def tensor_sha(tensor: torch.Tensor) -> str:
    """sha256 of a tensor's values."""
    buffer = io.BytesIO()
    buffer.write(tensor.detach().contiguous().cpu().numpy().tobytes())
    return hashlib.sha256(buffer.getvalue()).hexdigest()


def file_hash(path: Path, roles: dict[str, str]) -> str:
    """The hash of one output file, by its kind (see the module's docstring)."""
    if path.suffix == ".pt":
        content = canonical(torch.load(path, weights_only=True, map_location="cpu"), roles)
        return hashlib.sha256(json.dumps(content, sort_keys=True).encode()).hexdigest()
    if path.suffix == ".json":
        content = canonical(json.loads(path.read_text()), roles)
        return hashlib.sha256(json.dumps(content, sort_keys=True).encode()).hexdigest()
    if path.suffix in (".yaml", ".md", ".txt", ".csv"):
        text = canonical(path.read_text(), roles)
        # Seconds and dates printed in tables and logs.
        text = re.sub(r"\d+(\.\d+)? ?(s|min|h)\b", "<time>", text)
        return hashlib.sha256(text.encode()).hexdigest()
    return hashlib.sha256(path.read_bytes()).hexdigest()


def output_hashes(fixtures: Path, work: Path) -> dict[str, str]:
    """Every file under ``work`` (but the hashes themselves), by relative path."""
    roles = {str(work): "<work>", str(fixtures): "<fixtures>"}
    for name in ("teacher.pt", "teacher2.pt"):
        roles[hashlib.sha256((fixtures / name).read_bytes()).hexdigest()] = f"<{name}-sha256>"
    return {
        p.relative_to(work).as_posix(): file_hash(p, roles)
        for p in sorted(work.rglob("*"))
        if p.is_file() and p.name != "hashes.json" and p.name != "curves.png"
    }


def compare(before: Path, after: Path, out: Path | None = None) -> int:
    """Print the files that differ or exist on one side only (and write it as JSON to ``out``); 0 when none."""
    a, b = json.loads(before.read_text()), json.loads(after.read_text())
    only_a, only_b = sorted(a.keys() - b.keys()), sorted(b.keys() - a.keys())
    changed = sorted(k for k in a.keys() & b.keys() if a[k] != b[k])
    for title, names in (("only before", only_a), ("only after", only_b), ("differ", changed)):
        for name in names:
            print(f"{title}: {name}")
    same = len(a.keys() & b.keys()) - len(changed)
    print(f"{same} files identical, {len(changed)} differ, {len(only_a)} only before, {len(only_b)} only after")
    if out is not None:
        kinds: dict[str, int] = {}
        for name in a.keys() & b.keys():
            suffix = Path(name).suffix or Path(name).name
            kinds[suffix] = kinds.get(suffix, 0) + 1
        record = {
            "identical": same,
            "by_kind": dict(sorted(kinds.items())),
            "differ": changed,
            "only_before": only_a,
            "only_after": only_b,
            "torch": torch.__version__,
            "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        }
        out.write_text(json.dumps(record, indent=1) + "\n")
    return 1 if changed or only_a or only_b else 0


def stored_label_evaluation(fixtures: Path, work: Path, stop_at: str | None) -> list[str]:
    """The RDED set's stored-label evaluation with the random-real baseline (three students, three
    epochs), stopped with an interrupt once the student ``stop_at`` logs its epoch 2; its log lines."""
    import fadrm

    data = str(fixtures / "fmnist")
    rded = work / "sets" / "rded"
    if not rded.exists():
        teacher = ("--teacher", str(fixtures / "teacher.pt"))
        fadrm_cli(
            "distill",
            "--dataset",
            "fashion-mnist",
            "--method",
            "rded",
            *teacher,
            *SHAPE,
            "--data-root",
            data,
            "--device",
            "cpu",
            "--out",
            str(rded),
        )
    lines: list[str] = []

    def log(line: str) -> None:
        lines.append(line)
        print(line, flush=True)
        if stop_at and line.startswith(f"{stop_at}: epoch 2:"):
            raise KeyboardInterrupt

    options = dict(epochs=3, eval_every=1, batch_size=8, device="cpu", amp="off", workers=0)
    try:
        fadrm.evaluate(rded, data_root=data, labels="stored", baselines=["random-real"], log=log, **options)
    except KeyboardInterrupt:
        print(f"(interrupted during {stop_at})")
    return lines


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("fixtures").add_argument("folder", type=Path)
    for name in ("outputs", "interrupt", "resume"):
        p = sub.add_parser(name)
        p.add_argument("fixtures", type=Path)
        p.add_argument("work", type=Path)
    p = sub.add_parser("compare")
    p.add_argument("before", type=Path)
    p.add_argument("after", type=Path)
    p.add_argument("--out", type=Path, help="also write the comparison as JSON")
    args = parser.parse_args()
    if args.command == "fixtures":
        make_fixtures(args.folder)
        return 0
    if args.command == "compare":
        return compare(args.before, args.after, args.out)
    fixtures, work = args.fixtures.resolve(), args.work.resolve()
    if args.command == "outputs":
        run_commands(fixtures, work)
        hashes = output_hashes(fixtures, work)
        (work / "hashes.json").write_text(json.dumps(hashes, indent=1, sort_keys=True) + "\n")
        print(f"{len(hashes)} files hashed in {work / 'hashes.json'}")
        return 0
    if args.command == "interrupt":
        # The set's student finishes; the random-real soft student stops after its epoch 1.
        stored_label_evaluation(fixtures, work, stop_at=RESUMED)
        return 0
    lines = stored_label_evaluation(fixtures, work, stop_at=None)
    reused = [line for line in lines if "reusing" in line]
    resumed = [line for line in lines if line == f"{RESUMED}: resuming after epoch 1"]
    print(f"{len(reused)} finished student(s) reused, {len(resumed)} interrupted student resumed")
    return 0 if reused and resumed else 1


if __name__ == "__main__":
    sys.exit(main())
