"""The config system: declarations, the one resolver and its layers, replay, identities, and the
published values every preset holds (synthesis, teachers, student recipe)."""

from __future__ import annotations

import dataclasses
import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from fadrm import api
from fadrm.distilled import DistilledSet
from fadrm.cli import build_parser
from fadrm.config import (
    DEFAULT_STUDENT_RECIPE,
    STAGES,
    DistillConfig,
    EvalConfig,
    RunConfig,
    SynthesisConfig,
    TeacherConfig,
    build,
    dump_config,
    flag_of,
    in_range,
    key_of,
    load_preset_section,
    option,
    option_fields,
    preset_names,
    resolve,
    student_recipe,
    validate,
    write_config,
)
from fadrm.data import get_dataset_spec
from fadrm.errors import FadrmError
from fadrm.models import MODELS
from fadrm.synthesis.methods import METHODS


def distill_config(dataset: str, **options) -> DistillConfig:
    return resolve(DistillConfig, {"dataset": dataset, "teachers": ["t.pt"], "out": "o", **options})


def eval_config(dataset: str, method: str, ipc: int, **options) -> EvalConfig:
    return resolve(EvalConfig, {"distilled": "set", **options}, dataset=dataset, method=method, ipc=ipc)


# ------------------------------------------------------------- declarations
@pytest.mark.parametrize("stage", sorted(STAGES))
def test_every_option_is_declared_once_with_help_and_a_unique_flag(stage):
    cls = STAGES[stage]
    keys = [key_of(f) for _, f in option_fields(cls)]
    assert len(keys) == len(set(keys))
    assert all(f.metadata["help"] for _, f in option_fields(cls))
    # Every option is a flag of its subcommand (or its positional argument), generated, not hand-copied.
    parser = build_parser()
    help_text = parser._subparsers._group_actions[0].choices[stage].format_help()
    for _, f in option_fields(cls):
        assert (f.name if f.metadata["positional"] else flag_of(f)) in help_text


def test_unset_flags_are_unset_in_every_subcommand():
    # --seed is not 0 in one command and None in another: every flag defaults to "not given".
    parser = build_parser()
    for argv in (["distill"], ["run"], ["train-teacher"], ["evaluate", "x"]):
        args = parser.parse_args(argv)
        assert args.seed is None and args.device is None


def test_identity_keys_are_those_of_fadrm_0_2():
    # run.json / labels.json / teacher checkpoints written by 0.2 stored these flat identities;
    # they must compare equal after the move to nested configs.
    distill = distill_config("fashion-mnist", factor=2)
    assert set(distill.identity()) == {
        "dataset",
        "method",
        "ipc",
        "seed",
        "holdout",
        "teacher_arch",
        "sizes",
        "budgets",
        "lr",
        "r_bn",
        "first_bn_multiplier",
        "jitter",
        "alpha",
        "crop_scale",
        "classes_per_group",
        "mipc",
        "num_crop",
        "factor",
        "difficulty",
        "patch_crop_scale",
        "patch_scoring",
    }
    assert "patch_scoring" not in distill_config("fashion-mnist").identity()  # inert at factor 1
    teacher = TeacherConfig(dataset="fashion-mnist", model="convnet-small", out="t.pt")
    assert set(teacher.identity()) == {
        "dataset",
        "model",
        "model_args",
        "epochs",
        "batch_size",
        "lr",
        "momentum",
        "weight_decay",
        "seed",
        "holdout",
    }
    # Since 0.4 without the set's folder and the teachers' paths: a job adds their content's hashes, and
    # the paths 0.3 recorded are not compared (fadrm.artifacts.PLACE_KEYS; an explicit teacher retrains).
    evaluation = EvalConfig(distilled="set")
    assert set(evaluation.identity()) == {
        "epochs",
        "batch_size",
        "accumulation",
        "optimizer",
        "lr",
        "weight_decay",
        "eta",
        "temperature",
        "mix",
        "mix_alpha",
        "crop_scale",
        "labels",
        "topk",
        "bssl",
        "teacher_weights",
        "seed",
        "holdout",
    }
    # Options added since are in the identity only away from their former behaviour.
    assert {"schedule", "loss"} <= set(EvalConfig(distilled="set", schedule="x", loss="y").identity())


def test_a_flat_0_2_manifest_and_a_nested_one_have_the_same_set_id():
    config = distill_config("fashion-mnist")
    nested = {"config": config.to_dict(), "images": [{"class": 0, "file": "a.png"}]}
    flat_config = {key_of(f): value for _, f, value in config.leaves()}
    flat = {"config": flat_config, "images": nested["images"]}

    def set_id(manifest):
        return DistilledSet(Path("set"), manifest).set_id()

    assert set_id(nested) == set_id(flat)
    assert set_id({**nested, "config": {**flat_config, "alpha": 0.4}}) != set_id(flat)


# ------------------------------------------------------------------ resolver
def test_layers_in_order_defaults_method_preset_override_file_flags(tmp_path, monkeypatch):
    # A method that brings its own default, under the preset's values.
    monkeypatch.setitem(
        METHODS._entries,
        "test-method",
        dataclasses.replace(METHODS.get("fadrm"), name="test-method", defaults={"distill": {"jitter": 7, "r_bn": 0.5}}),
    )
    assert distill_config("imagenet-1k", method="test-method").synthesis.jitter == 32  # preset over method
    assert distill_config("imagenet-1k", method="test-method").synthesis.r_bn == 0.01
    assert distill_config("fashion-mnist", method="test-method").synthesis.first_bn_multiplier == 10.0  # preset
    assert SynthesisConfig().jitter == 4  # package default
    # tiny-imagenet: preset lr 0.25, overrides.fadrm@50 lr 0.01, a file 0.02, a flag 0.03.
    assert distill_config("tiny-imagenet", ipc=10).synthesis.lr == 0.25
    assert distill_config("tiny-imagenet", ipc=50).synthesis.lr == 0.01
    file = tmp_path / "c.yaml"
    file.write_text(yaml.safe_dump({"synthesis": {"lr": 0.02}, "ipc": 50}))
    from_file = resolve(DistillConfig, {"dataset": "tiny-imagenet", "teachers": ["t"], "out": "o"}, file)
    assert from_file.ipc == 50 and from_file.synthesis.lr == 0.02 and from_file.synthesis.sizes == [64, 64]
    flags = resolve(DistillConfig, {"dataset": "tiny-imagenet", "teachers": ["t"], "out": "o", "lr": 0.03}, file)
    assert flags.synthesis.lr == 0.03


def test_a_written_config_replays_exactly(tmp_path):
    original = distill_config(
        "imagenette",
        method="fadrm+",
        ipc=50,
        alpha=0.3,
        patch_crop_scale=[0.2, 0.9],
        groups_per_batch=3,
        equal_budget=False,
    )
    path = tmp_path / "config.yaml"
    write_config(path, original)
    assert resolve(DistillConfig, {}, path) == original
    # Flags given with --config win over it.
    assert resolve(DistillConfig, {"alpha": 0.9}, path).synthesis.alpha == 0.9
    # A flat config.yaml as fadrm 0.2 wrote it replays too.
    flat = tmp_path / "flat.yaml"
    flat.write_text(yaml.safe_dump({key_of(f): value for _, f, value in original.leaves()}))
    assert resolve(DistillConfig, {}, flat) == original


@pytest.mark.parametrize("stage", ["train-teacher", "distill"])
def test_print_config_shows_the_resolved_config_and_runs_nothing(stage, tmp_path):
    out = tmp_path / ("t.pt" if stage == "train-teacher" else "o")
    argv = ["--dataset", "fashion-mnist", "--out", str(out), "--seed", "3"]
    argv += ["--model", "convnet-small"] if stage == "train-teacher" else ["--teacher", "missing.pt", "--alpha", "0.2"]
    shown = subprocess.run(
        [sys.executable, "-m", "fadrm", stage, *argv, "--print-config"], capture_output=True, text=True, check=True
    ).stdout
    printed = yaml.safe_load(shown)
    assert printed["seed"] == 3 and printed["dataset"] == "fashion-mnist"
    if stage == "distill":
        assert printed["synthesis"]["alpha"] == 0.2 and printed["synthesis"]["sizes"] == [24, 28, 24, 28]
    else:
        assert printed["epochs"] == 7  # the preset's teacher recipe
    assert not out.exists()
    # What it prints is a config file that replays the same configuration.
    (tmp_path / "shown.yaml").write_text(shown)
    again = subprocess.run(
        [sys.executable, "-m", "fadrm", stage, "--config", str(tmp_path / "shown.yaml"), "--print-config"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    assert again == shown


def test_print_config_of_run_resolves_every_stage(tmp_path):
    shown = subprocess.run(
        [
            sys.executable,
            "-m",
            "fadrm",
            "run",
            "--dataset",
            "cifar100",
            "--method",
            "fadrm+",
            "--ipc",
            "10",
            "--out",
            str(tmp_path / "r"),
            "--print-config",
        ],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    plan = yaml.safe_load(shown)
    assert [t["model"] for t in plan["teachers"]] == [
        "cifar_resnet18",
        "cifar_densenet121",
        "cifar_shufflenet_v2_x0_5",
        "cifar_mobilenet_v2",
    ]
    assert plan["distill"]["teachers"] == [t["out"] for t in plan["teachers"]]
    assert plan["evaluate"]["epochs"] == 1000 and plan["evaluate"]["baselines"] == ["random-real"]
    assert not (tmp_path / "r").exists()


@pytest.mark.parametrize(
    "contents,message",
    [
        ({"nonsense": 1}, "config file .* sets unknown option 'nonsense'"),
        ({"synthesis": {"nonsense": 1}}, "sets unknown option synthesis.nonsense"),
        ({"alpha": 3}, r"--alpha must be in \[0, 1\], got 3"),
        ({"sizes": "big"}, "--sizes must be a list"),
    ],
)
def test_bad_config_files_are_one_line(tmp_path, contents, message):
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump({"dataset": "fashion-mnist", "teachers": ["t"], "out": "o", **contents}))
    with pytest.raises(FadrmError, match=message):
        resolve(DistillConfig, {}, path)
    path.write_text("- a list")
    with pytest.raises(FadrmError, match="does not hold a mapping"):
        resolve(DistillConfig, {}, path)
    with pytest.raises(FadrmError, match="not found"):
        resolve(DistillConfig, {}, tmp_path / "missing.yaml")


def test_required_options_name_their_flag():
    with pytest.raises(FadrmError, match="give --teacher"):
        resolve(DistillConfig, {"dataset": "fashion-mnist", "out": "o"})
    with pytest.raises(FadrmError, match="give --dataset"):
        resolve(TeacherConfig, {"model": "convnet", "out": "t.pt"})


@dataclasses.dataclass(frozen=True)
class SynthesisWithBeta(SynthesisConfig):
    beta: float = option(0.5, help="a new synthesis hyperparameter", check=in_range(0.0, 1.0))


@dataclasses.dataclass(frozen=True)
class DistillWithBeta(DistillConfig):
    synthesis: SynthesisWithBeta = dataclasses.field(default_factory=SynthesisWithBeta)


def test_a_new_synthesis_hyperparameter_is_one_declaration():
    """What adding a hyperparameter takes: declare the field (and use it). Its flag, its check, its
    place in config files, the identity and --print-config follow from the declaration."""
    import argparse

    from fadrm.cli import _add_options

    parser = argparse.ArgumentParser()
    _add_options(parser, DistillWithBeta)
    assert parser.parse_args(["--beta", "0.25"]).beta == 0.25
    config = resolve(DistillWithBeta, {"dataset": "fashion-mnist", "teachers": ["t"], "out": "o", "beta": 0.25})
    assert config.synthesis.beta == 0.25 and config.identity()["beta"] == 0.25
    assert yaml.safe_load(dump_config(config))["synthesis"]["beta"] == 0.25
    with pytest.raises(FadrmError, match=r"--beta must be in \[0, 1\], got 2"):
        resolve(DistillWithBeta, {"dataset": "fashion-mnist", "teachers": ["t"], "out": "o", "beta": 2.0})


# ------------------------------------------------------------- the presets
@pytest.mark.parametrize("dataset", preset_names())
@pytest.mark.parametrize("method", METHODS.names())
def test_presets_resolve(dataset, method):
    # A method that takes several teachers gets as many as the published committees hold.
    teachers = ["t.pt"] * (5 if METHODS.get(method).max_teachers is None else 1)
    config = distill_config(dataset, method=method, ipc=10, teachers=teachers)
    assert len(config.synthesis.sizes) == len(config.synthesis.budgets)
    assert config.synthesis.sizes[-1] == get_dataset_spec(dataset).image_size
    eval_config(dataset, method, 10)
    resolve(RunConfig, {"dataset": dataset, "out": "o", "method": method})
    if load_preset_section(dataset, "teacher").get("model"):
        resolve(TeacherConfig, {"dataset": dataset, "out": "t.pt"})


def test_published_values_and_overrides():
    imagenet = distill_config("imagenet-1k", method="fadrm", ipc=10)
    assert imagenet.synthesis.sizes == [200, 224, 200, 224] and imagenet.synthesis.budgets == [500] * 4
    assert imagenet.synthesis.jitter == 32 and imagenet.patches.factor == 2
    assert imagenet.synthesis.classes_per_group == 100 and imagenet.synthesis.lr == 0.25
    assert distill_config("imagenette", method="fadrm", ipc=10).synthesis.lr == 0.05
    assert distill_config("imagenette", method="fadrm+", ipc=10).synthesis.lr == 0.25
    tiny50 = distill_config("tiny-imagenet", method="fadrm", ipc=50)
    assert tiny50.synthesis.sizes == [64, 64] and tiny50.synthesis.lr == 0.01
    assert distill_config("cifar100", method="fadrm", ipc=10, lr=0.1, alpha=None).synthesis.lr == 0.1


@pytest.mark.parametrize("dataset", preset_names())
def test_student_recipe_is_the_published_one(dataset):
    recipe = eval_config(dataset, "fadrm", 10)
    # Loader batches of 16 (10 for ImageNette / ImageWoof) in two micro-batches, one step each.
    assert (recipe.batch_size, recipe.accumulation) == ((10 if dataset in ("imagenette", "imagewoof") else 16), 2)
    assert (recipe.optimizer, recipe.weight_decay, recipe.temperature) == ("adamw", 0.01, 20.0)
    assert recipe.lr is None and recipe.eta is None  # from the students table, per student and IPC
    assert recipe.mix == "cutmix" and recipe.crop_scale == [0.08, 1.0]
    assert (recipe.schedule, recipe.loss) == ("stretched-cosine", "kl")
    assert recipe.epochs == (1000 if dataset == "cifar100" else 300)


# The published lr / eta per (dataset, student, IPC 1 / 10 / 50), typed in from the reference's
# validate/train_fkd.py; the test checks the shipped presets against it.
PUBLISHED = {
    "cifar100": {
        "cifar_resnet18": [(5e-4, 2), (1e-3, 2), (1e-3, 1)],
        "cifar_resnet50": [(1e-3, 1), (1e-3, 2), (1e-3, 1)],
        "cifar_resnet101": [(5e-4, 1), (5e-4, 1), (5e-4, 1)],
    },
    "tiny-imagenet": {
        "cifar_resnet18": [(1e-3, 2), (1e-3, 2), (1e-3, 1)],
        "cifar_resnet50": [(5e-4, 2), (5e-4, 2), (5e-4, 1)],
        "cifar_resnet101": [(5e-4, 2), (5e-4, 2), (5e-4, 1)],
    },
    "imagewoof": {
        "resnet18": [(5e-4, 2), (5e-4, 1), (1e-3, 2)],
        "resnet50": [(5e-4, 2), (5e-3, 1), (5e-4, 1)],
        "resnet101": [(1e-3, 1), (5e-4, 2), (5e-4, 1)],
    },
    "imagenette": {
        "resnet18": [(5e-4, 2), (5e-4, 1), (5e-4, 2)],
        "resnet50": [(5e-4, 2), (5e-4, 1), (5e-4, 1)],
        "resnet101": [(5e-4, 2), None, (1e-3, 2)],  # IPC 10: not published (checked below)
    },
    "imagenet-1k": {
        "resnet18": [(1e-3, 2), (1e-3, 2), (1e-3, 1)],
        "resnet50": [(5e-4, 2), (1e-3, 2), (1e-3, 1)],
        "resnet101": [(3.5e-3, 2), (1e-3, 2), (5e-4, 1)],
    },
}


@pytest.mark.parametrize("dataset", preset_names())
def test_student_tables_hold_the_published_values(dataset):
    table = load_preset_section(dataset, "students")
    assert set(table) == set(PUBLISHED.get(dataset, {}))
    for student, values in PUBLISHED.get(dataset, {}).items():
        for ipc, published in zip((1, 10, 50), values):
            recipe = student_recipe(dataset, student, ipc)
            if published is None:
                assert "not published" in recipe["source"]
            else:
                assert (recipe["lr"], recipe["eta"]) == pytest.approx(published)
                assert recipe["source"] == f"{dataset} preset, {student} at IPC {ipc}"


def test_student_recipe_fallbacks():
    # An IPC between the published ones takes the one below; below them all, the smallest.
    assert student_recipe("cifar100", "cifar_resnet18", 20)["lr"] == 1e-3
    assert student_recipe("cifar100", "cifar_resnet18", 49)["eta"] == 2
    assert student_recipe("cifar100", "cifar_resnet18", 100)["eta"] == 1
    assert student_recipe("imagenet-1k", "resnet101", 2)["lr"] == 3.5e-3
    # A student without a published recipe, or a dataset without a table: the documented default.
    for dataset, student in (("imagenet-1k", "swin_t"), ("fashion-mnist", "convnet-small")):
        recipe = student_recipe(dataset, student, 10)
        assert (recipe["lr"], recipe["eta"]) == (DEFAULT_STUDENT_RECIPE["lr"], DEFAULT_STUDENT_RECIPE["eta"])
        assert recipe["source"].startswith("default")


@pytest.mark.parametrize("dataset", preset_names())
@pytest.mark.parametrize("method", METHODS.names())
@pytest.mark.parametrize("ipc", [1, 10, 50])
def test_bssl_is_the_default_wherever_the_reference_uses_it(dataset, method, ipc):
    # Every published FADRM-family relabel script uses BSSL but Tiny-ImageNet FADRM IPC 50's; G-VBSM's
    # and EDC's teachers relabel in eval mode. Fashion-MNIST is not in the paper: its preset chose
    # eval-mode teachers on the held-out split.
    off = (
        (dataset == "tiny-imagenet" and method == "fadrm" and ipc == 50)
        or dataset == "fashion-mnist"
        or method in ("g-vbsm", "edc")
    )
    assert eval_config(dataset, method, ipc).bssl is not off
    assert eval_config(dataset, method, ipc, bssl=not off).bssl is not off


@pytest.mark.parametrize("dataset", ["cifar100", "tiny-imagenet", "imagenet-1k", "imagenette", "imagewoof"])
def test_baselines_run_their_authors_budgets_unless_equal_budget(dataset):
    full = get_dataset_spec(dataset).image_size
    sre2l = distill_config(dataset, method="sre2l", ipc=10).synthesis
    small = dataset in ("cifar100", "tiny-imagenet")
    assert (sre2l.sizes, sre2l.budgets) == ([full], [1000 if small else 4000])
    plus = distill_config(dataset, method="sre2l++", ipc=10)
    assert (plus.synthesis.sizes, plus.synthesis.budgets, plus.amp) == ([full], [4000], "off")
    # "auto" (the CLI's and run()'s default) is the published precision: fp32 for SRe2L++ ...
    assert distill_config(dataset, method="sre2l++", ipc=10, amp="auto").amp == "off"
    # ... and an explicit choice still wins.
    assert distill_config(dataset, method="sre2l++", ipc=10, amp="bf16").amp == "bf16"
    fadrm = distill_config(dataset, method="fadrm", ipc=10)
    equal = distill_config(dataset, method="sre2l++", ipc=10, equal_budget=True)
    assert sum(equal.synthesis.budgets) == sum(fadrm.synthesis.budgets) == 2000
    assert METHODS.get("sre2l++").stage_plan(equal.synthesis).budgets == [2000]
    # The flag acts through sizes and budgets: it is not part of the set's identity.
    assert "equal_budget" not in equal.identity()


def test_fadrm_plus_presets_name_the_published_teachers():
    teachers = {
        (dataset, ipc): load_preset_section(dataset, "run", "fadrm+", ipc).get("teacher_models")
        for dataset in ("cifar100", "tiny-imagenet", "imagenet-1k")
        for ipc in (1, 10)
    }
    cifar_four = ["cifar_resnet18", "cifar_densenet121", "cifar_shufflenet_v2_x0_5", "cifar_mobilenet_v2"]
    assert teachers[("cifar100", 1)] == teachers[("cifar100", 10)] == teachers[("tiny-imagenet", 10)] == cifar_four
    assert teachers[("tiny-imagenet", 1)] == ["cifar_resnet18", "cifar_shufflenet_v2_x0_5", "cifar_mobilenet_v2"]
    assert [t.split(":")[0] for t in teachers[("imagenet-1k", 1)]] == [
        "resnet18",
        "mobilenet_v2",
        "shufflenet_v2_x1_0",
        "alexnet",
    ]
    for models in teachers.values():
        for model in models:
            assert model.split(":")[0] in MODELS  # every named teacher is registered
    # ImageNette / ImageWoof teachers are trained on the 10-class subset.
    for dataset in ("imagenette", "imagewoof"):
        assert load_preset_section(dataset, "teacher")["model"] == "resnet18"
        assert "teacher_models" not in load_preset_section(dataset, "run", "fadrm", 10)


def test_run_plans_the_presets_teachers(tmp_path):
    plan = api.plan_run(dataset="cifar100", method="fadrm+", ipc=10, out=tmp_path, seed=4)
    assert [t.out for t in plan.teachers] == [
        str(tmp_path / name)
        for name in (
            "teacher.pt",
            "teacher-cifar_densenet121.pt",
            "teacher-cifar_shufflenet_v2_x0_5.pt",
            "teacher-cifar_mobilenet_v2.pt",
        )
    ]
    assert all(t.epochs == 200 and t.seed == 4 for t in plan.teachers)  # the preset's recipe, the run's seed
    assert plan.distill.teachers == [t.out for t in plan.teachers] and plan.distill.seed == 4
    assert api.plan_run(dataset="imagenet-1k", method="fadrm", ipc=10, out=tmp_path).teachers == [
        "resnet18:IMAGENET1K_V1"
    ]
    mine = tmp_path / "mine.pt"
    mine.write_bytes(b"")
    given = api.plan_run(dataset="cifar100", ipc=10, out=tmp_path, teachers=[mine])
    assert given.teachers == [str(mine)] and given.distill.teachers == [str(mine)]
    with pytest.raises(FadrmError, match="no default teacher recipe"):
        api.plan_run(dataset="imagefolder", ipc=10, out=tmp_path)


def test_train_teacher_takes_the_presets_recipe_for_unset_options():
    configs = [
        api.teacher_config(dataset="imagenette", model="densenet121", out="t.pt"),  # any architecture
        api.teacher_config(dataset="imagenette", model="resnet18", out="t.pt", epochs=3, lr=None),
        api.teacher_config(dataset="imagefolder", model="resnet18", out="t.pt"),  # no recipe: the package defaults
        api.teacher_config(dataset="imagenette", out="t.pt"),  # the preset's architecture
    ]
    assert [(c.model, c.epochs, c.batch_size, c.lr) for c in configs] == [
        ("densenet121", 100, 128, 0.1),
        ("resnet18", 3, 128, 0.1),
        ("resnet18", 10, 256, 0.1),
        ("resnet18", 100, 128, 0.1),
    ]


def test_validation_is_shared_by_every_entry_point(tmp_path):
    # A config built by hand is checked by the same declarations as a resolved one.
    bad = build(EvalConfig, {"distilled": "set", "temperature": float("nan")})
    with pytest.raises(FadrmError, match="--temperature must be a finite number, got nan"):
        validate(bad)
    with pytest.raises(FadrmError, match="--student-lr must be a positive number, got -1"):
        eval_config("fashion-mnist", "fadrm", 10, lr=-1.0)
    assert json.loads(json.dumps(eval_config("fashion-mnist", "fadrm", 10).to_dict()))  # plain data


# ------------------------------------------------------------ review cases
@pytest.fixture()
def fake_presets(tmp_path, monkeypatch):
    """Write presets into a folder the resolver reads instead of the package's."""
    import fadrm.config.presets as presets_module

    (tmp_path / "presets").mkdir()
    monkeypatch.setattr(presets_module.resources, "files", lambda package: tmp_path)

    def write(dataset: str, contents: str) -> None:
        (tmp_path / "presets" / f"{dataset}.yaml").write_text(contents)

    return write


def test_each_preset_layer_is_read_on_its_own_and_mappings_are_replaced_whole(fake_presets):
    fake_presets(
        "fashion-mnist",
        """
distill:
  sizes: [28]
  budgets: [1]
  patches: {crop_scale: [0.5, 1.0]}
  overrides:
    fadrm: {patch_crop_scale: [0.2, 1.0]}
teacher:
  model: convnet
  model_args: {width: 32, depth: 3}
""",
    )
    assert distill_config("fashion-mnist").patches.crop_scale == [0.2, 1.0]  # the override wins, however spelled
    teacher = resolve(TeacherConfig, {"dataset": "fashion-mnist", "out": "t.pt", "model_args": {"width": 64}})
    assert teacher.model_args == {"width": 64}  # a key=value option is replaced, not merged


@pytest.mark.parametrize(
    "contents,message",
    [
        ("defaults: {lr: 0.5}", r"unknown sections \['defaults'\]"),
        ("distill: [1, 2]", r"\(distill\) is not a mapping of options"),
        ("distill: {overrides: [1]}", r"\(distill.overrides\) is not a mapping of options"),
        ("distill: {overrides: {fadrm: 3}}", r"\(distill.overrides.fadrm\) is not a mapping of options"),
        ("distill: {lr: [", "is not valid YAML"),
    ],
)
def test_a_malformed_preset_is_one_line(fake_presets, contents, message):
    fake_presets("fashion-mnist", contents.replace("distill: {", "distill: {sizes: [28], "))
    with pytest.raises(FadrmError, match=message):
        distill_config("fashion-mnist")


def test_written_configs_never_replay_overwrite(tmp_path):
    config = distill_config("fashion-mnist", overwrite=True)
    assert config.overwrite and yaml.safe_load(dump_config(config))["overwrite"] is False


def test_difficulty_is_a_band_name_or_a_quantile():
    assert distill_config("fashion-mnist", difficulty=0.3).patches.difficulty == 0.3  # kept as given (identity)
    assert distill_config("fashion-mnist", difficulty="0.3").patches.difficulty == "0.3"
    with pytest.raises(FadrmError, match=r"--difficulty must be easy, medium, hard or a number in \[0, 1\]"):
        distill_config("fashion-mnist", difficulty="harder")
    with pytest.raises(FadrmError, match="--difficulty must be non-empty text or a finite number"):
        distill_config("fashion-mnist", difficulty=[1])


def test_config_file_shapes(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump({"dataset": "fashion-mnist", "teachers": "t.pt", "out": "o"}))
    assert resolve(DistillConfig, {}, path).teachers == ["t.pt"]  # one teacher need not be a list
    path.write_text(yaml.safe_dump({"dataset": "fashion-mnist", "teachers": "t.pt", "out": "o", "synthesis": 5}))
    with pytest.raises(FadrmError, match="synthesis must be a mapping of its options, got 5"):
        resolve(DistillConfig, {}, path)
    path.write_text(yaml.safe_dump({"distilled": 5}))
    with pytest.raises(FadrmError, match="folder must be a path, got 5"):
        api.eval_config(path)


def test_every_option_kept_out_of_older_identities_is_a_defining_option_of_its_stage():
    """The table of options added later (fadrm.config.identity) names real, defining options: a
    misspelt key would silently put the option into every identity and retrain finished runs."""
    from fadrm.config import UNCHANGED_SINCE

    sections = {stage.SECTION: stage for stage in STAGES.values()}
    for section, rules in UNCHANGED_SINCE.items():
        declared = {key_of(f): f for _, f in option_fields(sections[section])}
        for key in rules:
            assert key in declared and declared[key].metadata["defines"], (section, key)
    # At their former behaviour they are out of the identity, otherwise in.
    distill = api.distill_config(dataset="fashion-mnist", teachers=["t.pt"], out="o")
    assert "stat_ema" not in distill.identity()
    assert (
        dataclasses.replace(distill, synthesis=dataclasses.replace(distill.synthesis, stat_ema=0.5)).identity()[
            "stat_ema"
        ]
        == 0.5
    )
    evaluation = EvalConfig(distilled="d")
    assert "momentum" not in evaluation.identity()  # AdamW: no momentum
    assert dataclasses.replace(evaluation, optimizer="sgd", momentum=0.8).identity()["momentum"] == 0.8


def test_stage_configs_are_frozen():
    config = TeacherConfig(dataset="fashion-mnist", model="convnet", out="t.pt")
    with pytest.raises(dataclasses.FrozenInstanceError):
        config.seed = 3  # type: ignore[misc]
    assert dataclasses.replace(config, seed=3).seed == 3 and config.seed == 0


@pytest.mark.parametrize(
    "text,message",
    [
        ("dataset: fashion-mnist\nipc: 1\nipc: 50\n", r"the key 'ipc' appears twice \(lines 2 and 3\)"),
        ("synthesis: {lr: 0.1, lr: 0.2}\n", r"the key 'lr' appears twice \(lines 1 and 1\)"),
        ("sizes: &s [28]\nbudgets: *s\n", r"it uses the alias \*s: write the value out at line 2"),
        ("budgets: " + "[" * 40 + "1" + "]" * 40 + "\n", "it nests deeper than 32 levels"),
    ],
)
def test_a_config_file_is_read_strictly(tmp_path, text, message):
    """A repeated key is refused rather than the last one winning silently; aliases (a kilobyte of
    nested ones expands to gigabytes) and deep nesting are refused before anything is built."""
    path = tmp_path / "c.yaml"
    path.write_text(text)
    with pytest.raises(FadrmError, match=rf"^config file {path} is not valid YAML \({message}"):
        resolve(DistillConfig, {"teachers": ["t.pt"], "out": "o"}, path)


def test_a_binary_or_bomb_config_is_one_line_in_a_real_process(tmp_path):
    binary = tmp_path / "binary.yaml"
    binary.write_bytes(b"dataset: \xff\xfe\x00")
    bomb = tmp_path / "bomb.yaml"
    levels = ["a: &a [x, x, x, x, x, x, x, x, x]"] + [
        f"{c}: &{c} [{', '.join(['*' + p] * 9)}]" for p, c in zip("abcdefgh", "bcdefghi")
    ]
    bomb.write_text("\n".join(levels) + "\nbudgets: *i\n")
    for path, message in ((binary, "is not UTF-8 text (byte 0xff at offset 9)"), (bomb, "it uses the alias *a")):
        result = subprocess.run(
            [
                sys.executable,
                "-m",
                "fadrm",
                "distill",
                "--dataset",
                "fashion-mnist",
                "--config",
                str(path),
                "--print-config",
            ],
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert result.returncode == 2 and result.stderr.count("\n") == 1 and message in result.stderr, result.stderr


def test_a_bad_model_arg_value_is_argparse_usage_not_a_traceback(capsys):
    from fadrm.cli import main

    with pytest.raises(SystemExit) as exit_info:
        main(["train-teacher", "--dataset", "fashion-mnist", "--out", "t.pt", "--model-arg", "width=[1"])
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and "Traceback" not in err
    assert "argument --model-arg: 'width=[1' is not valid YAML (" in err
