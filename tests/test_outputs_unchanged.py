"""Speed work must not change a single output byte: every method's PNGs and manifest, pinned.

``tests/data/outputs-0.3.0.json`` holds the sha256 of every PNG (``images/`` and ``init/``) and
of the manifest that fadrm 0.3.0 wrote for each method at a small shape with default settings
on the CPU. The manifest is hashed without what legitimately differs between two runs of the
same inputs (:data:`VOLATILE`: timings, memory, version strings), without the options added since
(:data:`ADDED_SINCE_0_3_0`, which must be at their defaults) and with the temporary paths and the
teachers' file hashes replaced by their roles. The hashes hold for the torch build and CPU kernel family recorded
in the file: float rounding of the CPU kernels differs between torch releases, instruction sets
(AVX2, AVX-512) and CPU models, so elsewhere the test skips and says why.

To pin on another machine, with 0.3.0's own code (this file runs on it unchanged)::

    git worktree add /tmp/fadrm-0.3.0 c42792e
    PYTHONPATH=/tmp/fadrm-0.3.0/src python tests/test_outputs_unchanged.py --write

A deliberate change of results is re-pinned the same way from its own code, and announced.
"""

from __future__ import annotations

import hashlib
import json
import platform
import sys
from pathlib import Path

import pytest
import torch

import fadrm
from fadrm.io import sha256_file
from fadrm.synthesis.methods import METHODS

PINNED = Path(__file__).parent / "data" / "outputs-0.3.0.json"
# The small shape: two stages of 6 iterations (single-stage methods run 12 at 28 px), two
# images per class, groups of five classes, everything else the preset's and the defaults.
SHAPE = dict(ipc=2, sizes=[24, 28], budgets=[6, 6], mipc=16, num_crop=2, classes_per_group=5)
# Manifest keys whose values differ between two runs of the same inputs.
VOLATILE = {
    "fadrm_version",
    "torch_version",
    "python_version",
    "wall_seconds_this_session",
    "synthesis_seconds_per_image",
    "peak_memory_bytes",
    "seconds",
    "seconds_per_image",
}
# Options added to the distill config since 0.3.0 (execution choices, recorded in the manifest's
# config): a default run must have them at these values, and is then compared without them.
ADDED_SINCE_0_3_0 = {"workers": None, "fused_statistics": False}


def canonical(value, roles: dict[str, str]):
    """``value`` without :data:`VOLATILE` keys and with each path in ``roles`` replaced by its role."""
    if isinstance(value, dict):
        if value.get("format") == "fadrm-distilled":
            config = value["config"]
            # (absent from 0.3.0's own manifests, which the re-pinning below hashes)
            assert all(config.get(key, value) == value for key, value in ADDED_SINCE_0_3_0.items()), config
            value = {**value, "config": {k: v for k, v in config.items() if k not in ADDED_SINCE_0_3_0}}
        # Image records name each PNG's sha256 since 0.4 (the PNGs themselves are hashed apart), and a
        # statistics file's description its dataset's digest.
        added = {"sha256"} if "ipc_index" in value else {"data_sha256"}
        return {key: canonical(item, roles) for key, item in value.items() if key not in VOLATILE | added}
    if isinstance(value, list):
        return [canonical(item, roles) for item in value]
    if isinstance(value, str):
        for path, role in roles.items():
            value = value.replace(path, role)
    return value


def output_hashes(out: Path, roles: dict[str, str]) -> dict[str, str]:
    """sha256 of every PNG under ``out`` and of its canonical manifest, by relative path."""
    hashes = {
        p.relative_to(out).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(out.rglob("*.png"))
    }
    manifest = canonical(json.loads((out / "manifest.json").read_text()), roles)
    hashes["manifest.json"] = hashlib.sha256(json.dumps(manifest, sort_keys=True).encode()).hexdigest()
    return hashes


def distill_every_method(data_root: Path, teacher: Path, second_teacher: Path, work: Path) -> dict[str, dict[str, str]]:
    """Each registered method distilled at :data:`SHAPE` (two teachers where it takes several): its hashes."""
    results = {}
    for method in METHODS.names():
        several = METHODS.get(method).max_teachers is None
        teachers = [teacher, second_teacher] if several else [teacher]
        out = work / method
        fadrm.distill(
            "fashion-mnist",
            [str(t) for t in teachers],
            out,
            method=method,
            data_root=str(data_root),
            log=lambda line: None,
            **SHAPE,
        )
        # A checkpoint's bytes name the temporary file it was written to: its hash is a role too.
        roles = {
            str(out): "<out>",
            str(data_root): "<data>",
            str(teacher): "<teacher>",
            str(second_teacher): "<teacher2>",
            sha256_file(teacher): "<teacher-sha256>",
            sha256_file(second_teacher): "<teacher2-sha256>",
        }
        results[method] = output_hashes(out, roles)
    return results


def cpu_model() -> str:
    """The CPU's model name (Linux), or the platform's processor string: kernels differ by model too."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def environment() -> dict[str, str]:
    """What the pinned hashes depend on besides the code."""
    return {"torch": torch.__version__, "cpu_capability": torch.backends.cpu.get_cpu_capability(), "cpu": cpu_model()}


def test_every_method_writes_the_same_bytes_as_0_3_0(fmnist_root, teacher_ckpt, second_teacher_ckpt, tmp_path):
    pinned = json.loads(PINNED.read_text())
    if pinned["environment"] != environment():
        pytest.skip(f"hashes pinned for {pinned['environment']}, this is {environment()}")
    results = distill_every_method(fmnist_root, teacher_ckpt, second_teacher_ckpt, tmp_path)
    assert set(results) == set(pinned["methods"]), "a method was added or removed: pin its outputs"
    for method, hashes in results.items():
        expected = pinned["methods"][method]
        assert hashes.keys() == expected.keys(), method
        changed = sorted(name for name in hashes if hashes[name] != expected[name])
        assert not changed, f"{method}: {len(changed)} of {len(hashes)} files differ from 0.3.0's, e.g. {changed[:3]}"


if __name__ == "__main__":
    if sys.argv[1:] != ["--write"]:
        sys.exit("usage: python tests/test_outputs_unchanged.py --write   (re-pins the hashes on this machine)")
    import tempfile

    sys.path.insert(0, str(Path(__file__).parent))
    from conftest import class_images, make_teacher_checkpoint, write_idx

    torch.set_num_threads(2)
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        # The same fixtures as conftest's fmnist_root, teacher_ckpt and second_teacher_ckpt.
        root = work / "fmnist"
        root.mkdir()
        for prefix, per_class, seed in (("train", 16, 0), ("t10k", 4, 1)):
            images, labels = class_images(10, per_class, 1, 28, seed)
            write_idx(root / f"{prefix}-images-idx3-ubyte.gz", images[..., 0])
            write_idx(root / f"{prefix}-labels-idx1-ubyte.gz", labels)
        first = make_teacher_checkpoint(work / "teacher.pt", width=8)
        second = make_teacher_checkpoint(work / "teacher2.pt", seed=1, width=6, depth=2)
        methods = distill_every_method(root, first, second, work / "out")
    PINNED.parent.mkdir(exist_ok=True)
    PINNED.write_text(json.dumps({"environment": environment(), "shape": SHAPE, "methods": methods}, indent=1) + "\n")
    print(f"pinned {sum(map(len, methods.values()))} files of {len(methods)} methods in {PINNED}")
