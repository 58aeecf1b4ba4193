"""fadrm writes only into folders it owns, and identifies what it reuses by content.

For each command with an output folder (``distill --out``, ``evaluate --out``) and each place a
user may point it at by mistake (a folder of unrelated files, another set, the set itself, the
dataset's folder, another set's evaluation), with and without ``--overwrite``: every file of the
user's is unchanged (a checksum of the folder before and after). Then the inputs: a changed image,
a changed teacher, a moved set.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import pytest

from conftest import make_teacher_checkpoint, rded_distill_argv, run_cli

EVAL_ARGS = ("--epochs", "1", "--device", "cpu")


def checksum(folder: Path) -> dict[str, str]:
    """Every file under ``folder`` by relative path, with the sha256 of its bytes."""
    return {
        p.relative_to(folder).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(folder.rglob("*"))
        if p.is_file()
    }


def user_folder(folder: Path) -> Path:
    """A folder of a user's files, some named as fadrm names its own."""
    for relative, text in {
        "notes.txt": "mine",
        "config.yaml": "mine: 1\n",
        "manifest.json": "{}",
        "results.json": "{}",
        "images/000_T-shirt_top/000.png": "not a png",
        "runs/x.json": "{}",
        "state/units/ipc0000-group0000.json": "{}",
    }.items():
        (folder / relative).parent.mkdir(parents=True, exist_ok=True)
        (folder / relative).write_text(text)
    return folder


@pytest.fixture(scope="module")
def two_sets(fmnist_root, teacher_ckpt, tmp_path_factory) -> dict[str, Path]:
    """Two evaluated sets of other seeds, each with a file of the user's in it and its evaluation."""
    root = tmp_path_factory.mktemp("owned")
    sets = {}
    for name, seed in (("a", "0"), ("b", "1")):
        sets[name] = root / name
        assert run_cli_status(rded_distill_argv(fmnist_root, teacher_ckpt, sets[name], "--seed", seed)) == 0
        assert run_cli_status(["evaluate", str(sets[name]), *EVAL_ARGS, "--data-root", str(fmnist_root)]) == 0
        (sets[name] / "notes.txt").write_text("mine")
        (sets[name] / "eval" / "notes.txt").write_text("mine")
    return sets


def run_cli_status(argv: list[str]) -> int:
    from fadrm.cli import main

    try:
        return main(argv)
    except SystemExit as exit_info:
        return int(exit_info.code or 0)


@pytest.mark.parametrize("overwrite", [False, True])
@pytest.mark.parametrize("target", ["unrelated", "dataset", "unrelated-in-dataset"])
def test_distill_never_writes_into_a_folder_it_does_not_own(
    target, overwrite, fmnist_root, teacher_ckpt, tmp_path, capsys
):
    data = tmp_path / "data"
    shutil.copytree(fmnist_root, data)
    out = {"unrelated": user_folder(tmp_path / "mine"), "dataset": data, "unrelated-in-dataset": data / "sub"}[target]
    before = checksum(tmp_path)
    argv = rded_distill_argv(data, teacher_ckpt, out, *(["--overwrite"] if overwrite else []))
    status, _, err = run_cli(argv, capsys)
    assert status == 2 and len(err) == 1 and "internal error" not in err[0], err
    assert ("holds files but no run.json" in err[0]) if target == "unrelated" else ("dataset's folder" in err[0])
    assert checksum(tmp_path) == before and not (data / "sub").exists()


def test_distill_overwrite_replaces_only_its_own_files(two_sets, fmnist_root, teacher_ckpt, tmp_path, capsys):
    out = tmp_path / "b"
    shutil.copytree(two_sets["b"], out)
    for mine in ("images/README.txt", "images/000_T-shirt_top/mine.png", "state/notes.txt"):
        (out / mine).write_text("mine")
    before = checksum(out)
    status, _, err = run_cli(rded_distill_argv(fmnist_root, teacher_ckpt, out, "--seed", "0"), capsys)
    assert status == 2 and "different settings (seed)" in err[0] and checksum(out) == before
    status, _, err = run_cli(rded_distill_argv(fmnist_root, teacher_ckpt, out, "--seed", "0", "--overwrite"), capsys)
    assert status == 0, err
    after = checksum(out)
    # The user's files and the set's evaluation are kept; the images are now the seed-0 set's.
    users = [k for k in before if "notes.txt" in k or "mine" in k or "README" in k or k.startswith("eval/")]
    assert {k: after[k] for k in users} == {k: before[k] for k in users}
    ours = {k: v for k, v in checksum(out / "images").items() if "mine" not in k and "README" not in k}
    assert ours == checksum(two_sets["a"] / "images")


@pytest.mark.parametrize("overwrite", [False, True])
@pytest.mark.parametrize("target", ["unrelated", "the set", "the set's images", "another set", "dataset"])
def test_evaluate_never_writes_into_a_folder_it_does_not_own(
    target, overwrite, two_sets, fmnist_root, tmp_path, capsys
):
    data = tmp_path / "data"
    shutil.copytree(fmnist_root, data)
    evaluated = tmp_path / "a"
    shutil.copytree(two_sets["a"], evaluated)
    other = tmp_path / "b"
    shutil.copytree(two_sets["b"], other)
    out = {
        "unrelated": user_folder(tmp_path / "mine"),
        "the set": evaluated,
        "the set's images": evaluated / "images",
        "another set": other,
        "dataset": data,
    }[target]
    before = checksum(tmp_path)
    argv = ["evaluate", str(evaluated), *EVAL_ARGS, "--data-root", str(data), "--out", str(out)]
    status, _, err = run_cli(argv + (["--overwrite"] if overwrite else []), capsys)
    assert status == 2 and len(err) == 1 and "internal error" not in err[0], err
    assert checksum(tmp_path) == before


def test_an_evaluation_folder_keeps_its_set_apart(two_sets, fmnist_root, tmp_path, capsys):
    """Evaluating a second set into another set's evaluation is refused; with --overwrite it replaces only the
    files an evaluation writes."""
    evaluation = tmp_path / "eval-of-a"
    shutil.copytree(two_sets["a"] / "eval", evaluation)
    before = checksum(evaluation)
    argv = ["evaluate", str(two_sets["b"]), *EVAL_ARGS, "--data-root", str(fmnist_root), "--out", str(evaluation)]
    status, _, err = run_cli(argv, capsys)
    assert status == 2 and "holds the evaluation of another set" in err[0] and checksum(evaluation) == before
    status, _, err = run_cli([*argv, "--overwrite"], capsys)
    assert status == 0, err
    assert (evaluation / "notes.txt").read_text() == "mine"
    results = json.loads((evaluation / "results.json").read_text())
    assert results["distilled"] == str(two_sets["b"])
    assert not list(evaluation.glob("*.damaged")) and checksum(evaluation) != before


def test_a_changed_image_is_named_then_remade(two_sets, fmnist_root, teacher_ckpt, tmp_path, capsys):
    folder = tmp_path / "a"
    shutil.copytree(two_sets["a"], folder)
    image = "images/003_Dress/001.png"
    shutil.copyfile(two_sets["b"] / image, folder / image)
    argv = ["evaluate", str(folder), *EVAL_ARGS, "--data-root", str(fmnist_root)]
    status, _, err = run_cli(argv, capsys)
    assert status == 2 and f"{folder / image} is not the image the set's manifest records" in err[0], err
    status, out, err = run_cli(rded_distill_argv(fmnist_root, teacher_ckpt, folder), capsys)
    assert status == 0 and checksum(folder / "images") == checksum(two_sets["a"] / "images"), err
    status, out, err = run_cli(argv, capsys)
    assert status == 0 and any("reusing finished run" in line for line in out), (out, err)


def test_a_changed_teacher_is_never_taken_for_the_one_recorded(two_sets, fmnist_root, tmp_path, capsys):
    """The set's teacher file replaced by another teacher: evaluating with the set's teachers is refused. A
    teacher given by --teacher is identified by its bytes: changed in place, its labels and students are
    made again, exactly as a fresh evaluation with the new teacher makes them."""
    folder = tmp_path / "a"
    shutil.copytree(two_sets["a"], folder)
    manifest = json.loads((folder / "manifest.json").read_text())
    recorded = Path(manifest["teachers"][0]["source"])
    teacher = tmp_path / "teacher.pt"
    shutil.copyfile(recorded, teacher)
    manifest["teachers"][0]["source"] = str(teacher)
    (folder / "manifest.json").write_text(json.dumps(manifest))
    make_teacher_checkpoint(teacher, width=8, seed=5)
    argv = ["evaluate", str(folder), *EVAL_ARGS, "--data-root", str(fmnist_root), "--labels", "stored"]
    status, _, err = run_cli(argv, capsys)
    assert status == 2 and "is not the teacher the set" in err[0], err

    shutil.copyfile(recorded, teacher)
    given = [*argv, "--teacher", str(teacher), "--out", str(tmp_path / "given")]
    assert run_cli(given, capsys)[0] == 0
    make_teacher_checkpoint(teacher, width=8, seed=5)
    status, out, err = run_cli(given, capsys)
    assert status == 0 and not any("reusing" in line for line in out), (out, err)
    fresh = [*argv, "--teacher", str(teacher), "--out", str(tmp_path / "fresh")]
    assert run_cli(fresh, capsys)[0] == 0
    runs = [json.loads((tmp_path / name / "results.json").read_text())["runs"] for name in ("given", "fresh")]
    assert [r["top1"] for r in runs[0]] == [r["top1"] for r in runs[1]]
    assert [r["history"] for r in runs[0]] == [r["history"] for r in runs[1]]


def test_a_moved_set_keeps_its_finished_students(two_sets, fmnist_root, tmp_path, capsys):
    moved = tmp_path / "elsewhere" / "a"
    shutil.copytree(two_sets["a"], moved)
    status, out, err = run_cli(["evaluate", str(moved), *EVAL_ARGS, "--data-root", str(fmnist_root)], capsys)
    assert status == 0 and any("reusing finished run" in line for line in out), (out, err)


def test_a_name_with_control_characters_is_shown_escaped_in_one_line(fmnist_root, teacher_ckpt, tmp_path, capsys):
    out = user_folder(tmp_path / "mi\nne\x1b[2J")
    status, _, err = run_cli(rded_distill_argv(fmnist_root, teacher_ckpt, out), capsys)
    assert status == 2 and len(err) == 1 and "mi\\nne\\x1b[2J" in err[0], err


def test_an_image_of_another_kind_in_a_set_is_one_line(two_sets, fmnist_root, tmp_path, capsys):
    """A colour PNG, or one of another size, in a grey 28 px set: named, also in a set whose manifest records no
    image digests (made by fadrm 0.3)."""
    from PIL import Image

    for kind, image in (("colour", Image.new("RGB", (28, 28), (200, 10, 10))), ("size", Image.new("L", (32, 32)))):
        folder = tmp_path / kind
        shutil.copytree(two_sets["a"], folder)
        manifest = json.loads((folder / "manifest.json").read_text())
        for record in manifest["images"]:
            record.pop("sha256")
        (folder / "manifest.json").write_text(json.dumps(manifest))
        image.save(folder / "images" / "004_Coat" / "000.png")
        status, _, err = run_cli(["evaluate", str(folder), *EVAL_ARGS, "--data-root", str(fmnist_root)], capsys)
        words = "is a colour image" if kind == "colour" else "is 32 x 32 px"
        assert status == 2 and len(err) == 1 and words in err[0] and "004_Coat/000.png" in err[0], err


def change_one_image(data: Path, split: str) -> None:
    """Change one pixel of one image in an IDX images file (``train`` or ``t10k``) of a copied dataset."""
    import gzip

    path = data / f"{split}-images-idx3-ubyte.gz"
    raw = bytearray(gzip.decompress(path.read_bytes()))
    raw[16 + 28 * 28 * 5 + 400] ^= 0xFF  # image 5, a pixel near its middle
    path.write_bytes(gzip.compress(bytes(raw)))


def test_a_changed_dataset_file_is_never_taken_for_the_data_a_result_was_made_from(
    fmnist_root, teacher_ckpt, tmp_path, capsys
):
    """One training image changed after a set was distilled: the resume is refused naming the data, and
    --overwrite gives the set a fresh run on the changed data gives. One validation image changed after an
    evaluation: its students are trained again, as a fresh evaluation on the changed data trains them."""
    data = tmp_path / "data"
    shutil.copytree(fmnist_root, data)
    out = tmp_path / "set"
    assert run_cli(rded_distill_argv(data, teacher_ckpt, out), capsys)[0] == 0
    evaluate = ["evaluate", str(out), *EVAL_ARGS, "--data-root", str(data)]
    assert run_cli(evaluate, capsys)[0] == 0
    change_one_image(data, "train")
    status, _, err = run_cli(rded_distill_argv(data, teacher_ckpt, out), capsys)
    assert status == 2 and "different settings (data)" in err[0], err
    assert run_cli(rded_distill_argv(data, teacher_ckpt, out, "--overwrite"), capsys)[0] == 0
    assert run_cli(rded_distill_argv(data, teacher_ckpt, tmp_path / "fresh-set"), capsys)[0] == 0
    assert checksum(out / "images") == checksum(tmp_path / "fresh-set" / "images")

    change_one_image(data, "t10k")
    status, lines, err = run_cli(evaluate, capsys)
    assert status == 0 and not any("reusing" in line for line in lines), (lines, err)
    assert run_cli([*evaluate, "--out", str(tmp_path / "fresh-eval")], capsys)[0] == 0
    runs = [
        json.loads((folder / "results.json").read_text())["runs"] for folder in (out / "eval", tmp_path / "fresh-eval")
    ]
    assert [(r["top1"], r["history"]) for r in runs[0]] == [(r["top1"], r["history"]) for r in runs[1]]


def test_teachers_and_full_data_students_are_keyed_by_the_data(fmnist_root, distilled, tmp_path, capsys):
    """A trained teacher, an unfinished one, and the full-data student of the shared cache, after one training
    image changed: the teacher is refused naming the data; the full-data student is trained again for the new
    data (the former kept), as a fresh cache trains it."""
    from fadrm.config import TeacherConfig
    from fadrm.errors import FadrmError
    from fadrm.teachers import train_teacher

    data = tmp_path / "data"
    shutil.copytree(fmnist_root, data)
    quick = dict(dataset="fashion-mnist", model="convnet-small", data_root=str(data), epochs=1, device="cpu")
    train_teacher(TeacherConfig(out=str(tmp_path / "t.pt"), **quick), log=lambda line: None)
    evaluate = ["evaluate", str(distilled), *EVAL_ARGS, "--data-root", str(data), "--baseline", "full-data"]
    evaluate += ["--full-data-dir", str(tmp_path / "cache"), "--out", str(tmp_path / "e")]
    assert run_cli(evaluate, capsys)[0] == 0
    change_one_image(data, "train")
    with pytest.raises(FadrmError, match=r"the teacher .*t.pt was made with different settings \(data_sha256\)"):
        train_teacher(TeacherConfig(out=str(tmp_path / "t.pt"), **quick), log=lambda line: None)
    assert run_cli(evaluate, capsys)[0] == 0
    assert len(list((tmp_path / "cache").glob("*.pt"))) == 2
    fresh = [*evaluate[:-4], "--full-data-dir", str(tmp_path / "fresh-cache"), "--out", str(tmp_path / "fresh")]
    assert run_cli(fresh, capsys)[0] == 0
    top1 = [
        [r["top1"] for r in json.loads((tmp_path / name / "results.json").read_text())["runs"]]
        for name in ("e", "fresh")
    ]
    assert top1[0] == top1[1]
