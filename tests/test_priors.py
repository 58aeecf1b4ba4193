"""CV-DD's priors: computed per teacher (``fadrm priors``), reused on a rerun, computed by ``fadrm run``
where none are given, and the presets' published priors kept to the presets' own teachers."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

import fadrm
from fadrm import api
from fadrm.artifacts import read_priors, write_priors
from fadrm.cli import main
from fadrm.config import PriorsConfig, resolve
from fadrm.errors import FadrmError
from fadrm.data.digest import data_digest
from fadrm.io import default_cache, sha256_file
from fadrm.priors import fixed_student
from fadrm.teachers import load_teacher

CIFAR100_PRIORS = [64.0, 60.6, 51.6, 59.4, 56.4]
# Tiny sets and students: what each stage does is tested with the stage; here, what the priors are made of.
SETS = {"sizes": [28], "budgets": [2], "mipc": 16, "num_crop": 2}
STUDENTS = {"epochs": 2, "batch_size": 8, "workers": 0}


def _results(folder: Path) -> dict:
    return json.loads((folder / "eval" / "results.json").read_text())


@pytest.mark.slow
def test_priors_are_each_teachers_last_epoch_top1_and_a_rerun_reuses_everything(
    fmnist_root, teacher_ckpt, second_teacher_ckpt, tmp_path
):
    teachers = [teacher_ckpt, second_teacher_ckpt]
    options = dict(
        ipc=1,
        student="convnet",
        data_root=str(fmnist_root),
        device="cpu",
        amp="off",
        distill_options=SETS,
        eval_options=STUDENTS,
    )
    lines: list[str] = []
    record = fadrm.compute_priors("fashion-mnist", teachers, tmp_path / "p", log=lines.append, **options)
    assert json.loads((tmp_path / "p" / "priors.json").read_text()) == record
    assert record["data_sha256"] == data_digest(fmnist_root, default_cache(), print)
    for teacher, entry, prior in zip(teachers, record["teachers"], record["priors"]):
        sha = sha256_file(teacher)
        folder = tmp_path / "p" / f"sre2l++-{teacher.stem}-{sha[:8]}"
        assert entry["set"] == str(folder) and entry["sha256"] == sha and entry["source"] == str(teacher)
        manifest = json.loads((folder / "manifest.json").read_text())
        assert manifest["method"] == "sre2l++" and [t["sha256"] for t in manifest["teachers"]] == [sha]
        assert manifest["ipc"] == 1 and manifest["config"]["synthesis"]["budgets"] == [2]
        # The prior is the last epoch's top-1 of the one student on the teacher's own set, validated only then.
        (run,) = _results(folder)["runs"]
        assert run["student"] == "convnet" and run["epochs"] == 2 and run["evaluated_epochs"] == [2]
        assert prior == entry["prior"] == round(run["top1"], 2)
    assert record["student"] == "convnet" and record["protocol"]["epochs"] == 2
    assert record["flags"] == " ".join(f"--prior {p:g}" for p in record["priors"])
    assert record["flags"] in lines[-1]
    # The same command again trains nothing: both sets resume finished, both students are reused.
    lines.clear()
    again = fadrm.compute_priors("fashion-mnist", teachers, tmp_path / "p", log=lines.append, **options)
    text = "\n".join(lines)
    assert again["priors"] == record["priors"]
    assert text.count("resuming in") == 2 and text.count("reusing finished run") == 2
    assert "groups to synthesise" not in text and "selecting realistic patches" not in text
    # fadrm distill reads them from the file, each teacher's by its hash whatever the order.
    code = main(
        [
            "distill",
            "--dataset",
            "fashion-mnist",
            "--teacher",
            str(second_teacher_ckpt),
            "--teacher",
            str(teacher_ckpt),
            "--method",
            "cv-dd",
            "--ipc",
            "1",
            "--priors-from",
            str(tmp_path / "p" / "priors.json"),
            "--out",
            str(tmp_path / "cv-dd"),
            "--data-root",
            str(fmnist_root),
            "--sizes",
            "28",
            "--budgets",
            "1",
            "--mipc",
            "16",
            "--num-crop",
            "2",
            "--device",
            "cpu",
        ]
    )
    manifest = json.loads((tmp_path / "cv-dd" / "manifest.json").read_text())
    assert code == 0 and manifest["config"]["synthesis"]["priors"] == record["priors"][::-1]


def test_one_student_for_every_teacher(teacher_ckpt, second_teacher_ckpt):
    first, second = load_teacher(teacher_ckpt), load_teacher(second_teacher_ckpt)

    def config(**options) -> PriorsConfig:
        return resolve(PriorsConfig, {"dataset": "fashion-mnist", "teachers": ["t.pt"], "out": "p", **options})

    # By default the first teacher's architecture, built as fadrm evaluate builds it on that teacher's set.
    assert fixed_student(config(), [first]) == ("convnet-small", {"width": 8})
    assert fixed_student(config(student="convnet"), [first, second]) == ("convnet", {})
    # Both fixture teachers are convnet-small of other widths: a convnet-small student would differ per set.
    with pytest.raises(
        FadrmError,
        match=r"convnet-small would be built with \{'width': 8\} on the set of .* but "
        r"with \{'width': 6, 'depth': 2\} on that of .*; give --student",
    ):
        fixed_student(config(), [first, second])


def test_fadrm_priors_refuses_a_student_that_differs_before_any_work(
    fmnist_root, teacher_ckpt, second_teacher_ckpt, tmp_path, capsys
):
    argv = [
        "priors",
        "--dataset",
        "fashion-mnist",
        "--teacher",
        str(teacher_ckpt),
        "--teacher",
        str(second_teacher_ckpt),
        "--out",
        str(tmp_path / "p"),
        "--data-root",
        str(fmnist_root),
        "--ipc",
        "1",
    ]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "give --student another architecture" in err[0]
    assert not (tmp_path / "p").exists()


@pytest.mark.slow
def test_run_computes_a_committees_priors_and_passes_them_to_distill(
    fmnist_root, teacher_ckpt, second_teacher_ckpt, tmp_path
):
    lines: list[str] = []
    summary = fadrm.run(
        "fashion-mnist",
        1,
        tmp_path / "r",
        method="cv-dd",
        teachers=[teacher_ckpt, second_teacher_ckpt],
        prior_student="convnet",
        data_root=str(fmnist_root),
        device="cpu",
        amp="off",
        distill_options=SETS,
        eval_options={**STUDENTS, "eval_at": []},
        log=lines.append,
    )
    priors_file = tmp_path / "r" / "priors" / "ipc1" / "priors.json"
    computed = json.loads(priors_file.read_text())
    assert summary["priors"] == {"values": computed["priors"], "source": f"computed: {priors_file}"}
    assert f"committee priors: {', '.join(f'{p:g}' for p in computed['priors'])} (computed: " in "\n".join(lines)
    # The priors' sets and students took the run's extra options, and weigh the committee as CV-DD does.
    for entry in computed["teachers"]:
        assert _results(Path(entry["set"]))["runs"][0]["epochs"] == 2
    manifest = json.loads((tmp_path / "r" / "cv-dd-ipc1" / "manifest.json").read_text())
    assert manifest["config"]["synthesis"]["priors"] == computed["priors"]
    weights = torch.softmax(torch.tensor(computed["priors"], dtype=torch.float64) / 5, 0).tolist()
    assert manifest["units"][0]["committee_weights"] == pytest.approx(weights, abs=1e-6)
    assert list(summary["seconds"]) == ["teacher", "priors", "distill", "evaluate"]


def test_preset_priors_are_for_the_presets_own_teachers_only(tmp_path):
    mine = [tmp_path / "a.pt", tmp_path / "b.pt"]
    for path in mine:
        path.write_bytes(b"")
    models = ["cifar_resnet18", "cifar_resnet50", "cifar_shufflenet_v2_x0_5", "cifar_mobilenet_v2", "cifar_densenet121"]

    def plan(**options) -> api.RunPlan:
        return api.plan_run(dataset="cifar100", method="cv-dd", ipc=1, out=tmp_path / "r", **options)

    # The preset's five teachers, trained by the run (or named as the preset names them): its published values.
    for own in (plan(), plan(teacher_models=models)):
        assert own.distill.synthesis.priors == CIFAR100_PRIORS and own.distill.synthesis.fixed_committee == [2, 3]
        assert own.priors is None and own.priors_source == "the cifar100 preset's published values for its teachers"
    # Your own teachers, or the preset's architectures in another order: computed, and no fixed pair by position.
    for other in (plan(teachers=mine), plan(teacher_models=models[::-1])):
        assert other.distill.synthesis.priors is None and other.distill.synthesis.fixed_committee is None
        assert other.priors is not None and other.priors.teachers == other.distill.teachers
        assert other.priors.out == str(tmp_path / "r" / "priors" / "ipc1") and other.priors.ipc == 1
    assert plan(teachers=mine, prior_student="convnet").priors.student == "convnet"
    shown = plan(teachers=mine).to_dict()  # what fadrm run --print-config shows: the priors stage too
    assert list(shown) == ["run", "teachers", "priors", "distill", "evaluate"] and shown["priors"]["ipc"] == 1
    assert "priors" not in plan().to_dict()
    # Priors given are used as given, and must be one per teacher.
    given = plan(teachers=mine, priors=[50.0, 60.0])
    assert given.distill.synthesis.priors == [50.0, 60.0] and given.priors is None and given.priors_source == "given"
    with pytest.raises(FadrmError, match=r"got 1 --prior values for 2 teacher\(s\)"):
        plan(teachers=mine, priors=[50.0])
    # fadrm distill has no teacher list of the preset's: no published prior or pair applies to its teachers.
    distill = api.distill_config(dataset="cifar100", teachers=["t.pt"] * 5, out="o", method="cv-dd", ipc=1)
    assert distill.synthesis.priors is None and distill.synthesis.fixed_committee is None


def test_priors_from_a_file_of_other_teachers_or_other_values_are_one_line(
    fmnist_root, teacher_ckpt, second_teacher_ckpt, tmp_path, capsys
):
    path = tmp_path / "priors.json"
    write_priors(
        path,
        {
            "teachers": [
                {"source": "t.pt", "sha256": sha256_file(teacher_ckpt), "prior": 61.5},
                {"source": "other.pt", "sha256": "0" * 64, "prior": 40.0},
            ]
        },
    )
    (tmp_path / "notes.json").write_text("{}")
    both = [{"source": str(t), "sha256": sha256_file(t), "prior": 50.0} for t in (teacher_ckpt, second_teacher_ckpt)]
    write_priors(tmp_path / "other-data.json", {"data_sha256": "0" * 64, "teachers": both})
    argv = [
        "distill",
        "--dataset",
        "fashion-mnist",
        "--teacher",
        str(teacher_ckpt),
        "--teacher",
        str(second_teacher_ckpt),
        "--method",
        "cv-dd",
        "--ipc",
        "1",
        "--out",
        str(tmp_path / "o"),
        "--data-root",
        str(fmnist_root),
        "--sizes",
        "28",
        "--budgets",
        "1",
        "--mipc",
        "16",
        "--num-crop",
        "2",
        "--device",
        "cpu",
    ]
    for extra, message in (
        (["--priors-from", str(path)], "holds the priors of other teachers (t.pt, other.pt); compute these teachers'"),
        (["--priors-from", str(tmp_path / "notes.json")], "is not a priors.json written by fadrm priors"),
        (["--priors-from", str(tmp_path / "other-data.json")], "was computed on other data than this run's"),
    ):
        assert main([*argv, *extra]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and message in err[0], err
        assert not (tmp_path / "o").exists()
    # Given with --prior as well (a written config replays both): they must agree.
    assert read_priors(path, [sha256_file(teacher_ckpt)], [61.5]) == [61.5]
    with pytest.raises(FadrmError, match=r"--prior 60 and --priors-from .* \(61.5\) disagree; give one of them"):
        read_priors(path, [sha256_file(teacher_ckpt)], [60.0])


def test_priors_of_the_wrong_count_for_run_are_one_line(tmp_path, teacher_ckpt, second_teacher_ckpt, capsys):
    argv = [
        "run",
        "--dataset",
        "fashion-mnist",
        "--method",
        "cv-dd",
        "--ipc",
        "1",
        "--out",
        str(tmp_path / "r"),
        "--teacher",
        str(teacher_ckpt),
        "--teacher",
        str(second_teacher_ckpt),
        "--prior",
        "60",
    ]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "got 1 --prior values for 2 teacher(s)" in err[0]
    assert not (tmp_path / "r").exists()
