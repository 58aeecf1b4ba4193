"""``fadrm study``: a small grid end to end (every cell in the table), resumed without training again, and
grid files with mistakes refused in one line before any work."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from conftest import run_cli


def write_grid(path: Path, **grid: object) -> Path:
    path.write_text(yaml.safe_dump(grid))
    return path


@pytest.fixture
def grid(fmnist_root, teacher_ckpt, tmp_path) -> Path:
    return write_grid(
        tmp_path / "grid.yaml",
        dataset="fashion-mnist",
        methods=["rded", "sre2l"],
        ipcs=[1, 2],
        seeds=[0, 1],
        teachers=[str(teacher_ckpt)],
        data_root=str(fmnist_root),
        baselines=["random-real"],
        distill={"mipc": 16, "num_crop": 2, "sizes": [28], "budgets": [2], "amp": "off"},
        evaluate={"epochs": 2, "batch_size": 8, "workers": 0, "amp": "off"},
    )


def test_a_study_runs_every_cell_writes_one_table_and_resumes_without_work(grid, tmp_path, capsys):
    out = tmp_path / "study"
    status, lines, err = run_cli(["study", str(grid), "--out", str(out), "--device", "cpu"], capsys)
    assert status == 0, err
    for seed in (0, 1):
        for method in ("rded", "sre2l"):
            for ipc in (1, 2):
                assert (out / f"seed{seed}" / f"{method}-ipc{ipc}" / "manifest.json").exists()
    record = json.loads((out / "study.json").read_text())
    rows = {(r["arm"], r["ipc"], r["labels"]): r for r in record["rows"]}
    # Every method and baseline arm at every IPC, over the two seeds' students.
    expected = {
        (arm, ipc, labels)
        for ipc in (1, 2)
        for arm, labels in (("rded", "soft"), ("sre2l", "soft"), ("random-real", "soft"), ("random-real", "hard"))
    }
    assert set(rows) == expected and all(r["n"] == 2 for r in rows.values())
    cell = next(c for c in record["cells"] if (c["method"], c["ipc"], c["seed"]) == ("rded", 2, 1))
    (run,) = [r for r in cell["runs"] if r["train_set"] == "distilled"]
    assert run["seed"] == 1  # a set's students start at its seed
    table = (out / "study.md").read_text()
    assert "| rded | 2 | convnet-small | soft |" in table and "| random-real | 1 | convnet-small | hard |" in table
    assert "| sre2l | 2 |" in table.split("Synthesis time per image")[1]
    assert (out / "accuracy-vs-ipc.png").stat().st_size > 0
    assert sorted(p.name for p in (out / "grids").iterdir()) == [
        "rded-ipc1.png",
        "rded-ipc2.png",
        "sre2l-ipc1.png",
        "sre2l-ipc2.png",
    ]
    # The same command again: every set resumes finished, every student is reused, the table is the same.
    status, lines, _ = run_cli(["study", str(grid), "--out", str(out), "--device", "cpu"], capsys)
    trained = [line for line in lines if "% at the last epoch (best" in line]
    assert status == 0 and not trained and sum("reusing finished run" in line for line in lines) == 16, trained
    assert json.loads((out / "study.json").read_text())["rows"] == record["rows"]


@pytest.mark.parametrize(
    "change,message",
    [
        ({"ipcs": [0]}, "ipcs must be a list of whole numbers >= 1"),
        ({"methods": ["fadrm", "nope"]}, "unknown methods nope"),
        ({"colour": "red"}, "unknown keys (colour)"),
        ({"seeds": [0, 0]}, "seeds must be a list of whole numbers (without repeats)"),
        ({"distill": {"ipc_typo": 3}}, "ipc_typo"),
    ],
)
def test_a_grid_with_a_mistake_is_one_line_before_any_work(change, message, grid, tmp_path, capsys):
    contents = {**yaml.safe_load(grid.read_text()), **change}
    bad = write_grid(tmp_path / "bad.yaml", **contents)
    out = tmp_path / "study"
    status, _, err = run_cli(["study", str(bad), "--out", str(out), "--device", "cpu"], capsys)
    assert status == 2 and len(err) == 1 and message in err[0], err
    assert not out.exists()


def test_a_grid_without_its_required_keys_is_one_line(tmp_path, capsys):
    bad = write_grid(tmp_path / "bad.yaml", dataset="fashion-mnist")
    status, _, err = run_cli(["study", str(bad), "--out", str(tmp_path / "s")], capsys)
    assert status == 2 and err == [f"fadrm: error: the study grid {bad} lacks methods, ipcs"]


def test_the_example_grid_plans_every_cell(tmp_path):
    """examples/fashion-mnist-study.yaml resolves for every method and IPC, before anything runs."""
    from fadrm.study import plan_study, read_grid

    grid = read_grid(Path(__file__).parents[1] / "examples" / "fashion-mnist-study.yaml")
    plan = plan_study(grid, tmp_path / "study", device="cpu")
    assert [(m, i) for m, i, _ in plan.checked] == [(m, i) for m in grid.methods for i in (1, 10, 50)]
    assert all(cell.evaluate.protocol == "common" for *_, cell in plan.checked)
    assert plan.teachers and set(plan.method_teachers) == set(grid.methods)
    assert not (tmp_path / "study").exists()


def test_a_study_over_two_jobs_trains_every_set_in_one_pool_and_gives_the_table_of_one(grid, tmp_path, capsys):
    """--jobs 2: every set is made first, then all their students go to one pool of two workers; the table is
    that of one job at one thread per process, and the cells' reports reuse the pool's runs."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        assert run_cli(["study", str(grid), "--out", str(tmp_path / "one"), "--device", "cpu"], capsys)[0] == 0
    finally:
        torch.set_num_threads(threads)
    status, lines, err = run_cli(
        ["study", str(grid), "--out", str(tmp_path / "two"), "--device", "cpu", "--jobs", "2"], capsys
    )
    assert status == 0, err
    assert "training 16 students of 8 sets in 2 processes" in lines
    assert sum("reusing finished run" in line for line in lines) == 16
    rows = [json.loads((tmp_path / name / "study.json").read_text())["rows"] for name in ("one", "two")]
    assert rows[0] == rows[1]


def test_a_study_writes_only_into_its_own_folder_and_its_grid_replays(grid, fmnist_root, tmp_path, capsys):
    """A folder of other files is refused in one line, unchanged; so is the dataset's folder. The study's own
    folder holds the grid it was made from, which replays the study (everything reused)."""
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "study.md").write_text("my notes")
    status, _, err = run_cli(["study", str(grid), "--out", str(mine), "--device", "cpu"], capsys)
    assert status == 2 and len(err) == 1 and "is not a fadrm study (no grid.yaml)" in err[0], err
    assert sorted(p.name for p in mine.iterdir()) == ["study.md"] and (mine / "study.md").read_text() == "my notes"
    status, _, err = run_cli(["study", str(grid), "--out", str(fmnist_root / "s"), "--device", "cpu"], capsys)
    assert status == 2 and len(err) == 1 and not (fmnist_root / "s").exists(), err

    out = tmp_path / "study"
    assert run_cli(["study", str(grid), "--out", str(out), "--device", "cpu"], capsys)[0] == 0
    status, lines, _ = run_cli(["study", str(out / "grid.yaml"), "--out", str(out), "--device", "cpu"], capsys)
    assert status == 0 and not [line for line in lines if "% at the last epoch (best" in line]
