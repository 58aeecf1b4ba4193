"""Methods as registered objects: every part they name exists, the stage plans and the teacher
policy on known inputs, every initialiser on the fixture, and a new method made only of
registered parts runs end to end."""

from __future__ import annotations

import dataclasses

import pytest
import torch

import fadrm
from fadrm.distilled import Layout
from fadrm.config import DistillConfig, PatchConfig, SynthesisConfig
from fadrm.data import get_dataset_spec, load_split, normalize
from fadrm.distributed import Ranks
from fadrm.runtime import make_runtime
from fadrm.seeding import make_generator
from fadrm.synthesis.init import INITIALISERS, SynthesisRun
from fadrm.synthesis.methods import MATCHERS, METHODS, STAGE_PLANS, TEACHER_POLICIES
from fadrm.synthesis.units import UNIT_PLANS, plan_units
from fadrm.teachers import load_teacher

SPEC = get_dataset_spec("fashion-mnist")
CPU = make_runtime("cpu", "off")


@pytest.mark.parametrize("name", METHODS.names())
def test_every_method_names_registered_parts(name):
    method = METHODS.get(name)
    assert method.initialiser in INITIALISERS and method.stages in STAGE_PLANS
    assert method.matcher in MATCHERS and method.teacher_policy in TEACHER_POLICIES and method.units in UNIT_PLANS
    assert set(method.defaults) <= {"teacher", "distill", "evaluate", "run"}


def test_stage_plans_on_known_stages():
    configured = SynthesisConfig(sizes=[24, 28, 24, 28], budgets=[5, 6, 7, 8])
    plans = {name: STAGE_PLANS.get(name).stages(configured) for name in STAGE_PLANS.names()}
    assert [STAGE_PLANS.get(name).optimises for name in ("multi-resolution", "single-stage", "none")] == [
        True,
        True,
        False,
    ]
    assert (plans["multi-resolution"].sizes, plans["multi-resolution"].budgets) == ([24, 28, 24, 28], [5, 6, 7, 8])
    assert (plans["single-stage"].sizes, plans["single-stage"].budgets) == ([28], [26])
    assert (plans["none"].sizes, plans["none"].budgets) == ([28], [0])
    # Everything but the stages is the configured value; the configured object is untouched.
    assert all(plan.lr == configured.lr and plan.alpha == configured.alpha for plan in plans.values())
    assert configured.budgets == [5, 6, 7, 8]


def test_round_robin_cycles_through_the_teachers_in_order():
    config = DistillConfig(dataset="fashion-mnist", teachers=["a", "b", "c"], out="o")
    plans = TEACHER_POLICIES.get("round-robin").plans(config, 3)
    plan = plans(plan_units(10, 2, 5)[3])
    assert plan == plans(plan_units(10, 2, 5)[0])  # the same for every unit
    assert [plan.members(step) for step in range(7)] == [[(k, None)] for k in (0, 1, 2, 0, 1, 2, 0)]


@pytest.fixture(scope="module")
def synthesis_run(fmnist_root, teacher_ckpt, tmp_path_factory):
    config = DistillConfig(
        dataset="fashion-mnist",
        teachers=[str(teacher_ckpt)],
        out=str(tmp_path_factory.mktemp("init")),
        ipc=2,
        patches=PatchConfig(mipc=16, num_crop=2),
    )
    dataset = load_split(SPEC, "train", fmnist_root)
    layout = Layout(tmp_path_factory.mktemp("layout"), tuple(dataset.classes), config.ipc)
    return SynthesisRun(config, SPEC, dataset, [load_teacher(teacher_ckpt)], layout, CPU, Ranks(), lambda s: None)


@pytest.mark.parametrize("name", INITIALISERS.names())
def test_every_initialiser_gives_normalised_images_unit_by_unit(name, synthesis_run):
    initialiser = INITIALISERS.get(name)
    initialiser.prepare(synthesis_run)
    batch = plan_units(10, 2, 5)[:3]  # three groups of five classes
    generators = [make_generator(0, "synth", u.ipc_index, u.group) for u in batch]
    images = initialiser.initial_images(synthesis_run, batch, generators)
    assert images.shape == (15, 1, 28, 28) and images.dtype == torch.float32
    again = initialiser.initial_images(
        synthesis_run, batch, [make_generator(0, "synth", u.ipc_index, u.group) for u in batch]
    )
    assert torch.equal(images, again)  # a function of the units' own streams
    source = initialiser.source_file(synthesis_run, batch[0].classes[0], batch[0].ipc_index)
    if source is not None:
        # The image is the file's pixels, normalised.
        from fadrm.data.datasets import read_image

        pixels = read_image(source, 1).float().div(255)[None]
        assert torch.allclose(images[:1], normalize(pixels, SPEC.mean, SPEC.std))
        assert synthesis_run.layout.init_record(0).exists()


def test_a_new_method_of_registered_parts_needs_no_engine_change(fmnist_root, teacher_ckpt, tmp_path, monkeypatch):
    # Noise start, SRe2L's single stage, two teachers in round-robin, and a default of its own.
    method = dataclasses.replace(
        METHODS.get("sre2l"), name="noise-plus", max_teachers=None, defaults={"distill": {"crop_scale": [0.5, 1.0]}}
    )
    monkeypatch.setitem(METHODS._entries, "noise-plus", method)
    manifest = fadrm.distill(
        "fashion-mnist",
        [teacher_ckpt, teacher_ckpt],
        tmp_path / "o",
        method="noise-plus",
        ipc=1,
        data_root=str(fmnist_root),
        sizes=[28],
        budgets=[2],
        device="cpu",
        log=lambda s: None,
    )
    assert manifest["method"] == "noise-plus" and len(manifest["images"]) == 10
    assert manifest["config"]["synthesis"]["crop_scale"] == [0.5, 1.0] and not (tmp_path / "o" / "init").exists()


def test_a_methods_own_checks_are_its_problem_not_the_configs():
    """Resolving a distillation needs no method's strategies; the method refuses what it cannot run,
    before anything is read (fadrm distill, fadrm run's plan, --print-config)."""
    from fadrm import api
    from fadrm.config import resolve
    from fadrm.errors import FadrmError
    from fadrm.synthesis.methods import method_for

    two = {"dataset": "fashion-mnist", "teachers": ["a.pt", "b.pt"], "out": "o", "method": "sre2l"}
    config = resolve(DistillConfig, two)
    assert METHODS.get("sre2l").problem(config) == "uses at most 1 teacher(s), got 2; use fadrm+ for several"
    assert METHODS.get("fadrm+").problem(dataclasses.replace(config, method="fadrm+")) is None
    with pytest.raises(FadrmError, match=r"^sre2l: uses at most 1 teacher\(s\), got 2"):
        method_for(config)
    with pytest.raises(FadrmError, match=r"^sre2l: uses at most 1 teacher"):
        api.distill_config(**two)
    # A class-major method's groups must hold whole classes.
    g_vbsm = resolve(DistillConfig, {**two, "method": "g-vbsm", "ipc": 3, "group_slots": 2})
    assert "must divide" in METHODS.get("g-vbsm").problem(g_vbsm)
