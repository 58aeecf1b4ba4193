"""The students and relabelling of G-VBSM, EDC and CV-DD: teacher balancing, committee weights,
EMA of the student's weights, RandAugment views, and each method's published protocol."""

from __future__ import annotations

import dataclasses
import importlib
import math

import pytest
import torch
from torch import nn

from fadrm.baselines import TrainingSet
from fadrm.config import EvalConfig
from fadrm.data import get_dataset_spec
from fadrm.errors import FadrmError
from fadrm.labels import TeacherLabeller, balanced_norms, prior_weights
from fadrm.runtime import make_runtime
from fadrm.students import EmaWeights

CPU = make_runtime("cpu", "off")
ST = importlib.import_module("fadrm.students")
SMALL = dataclasses.replace(get_dataset_spec("fashion-mnist"), image_size=8)


def _tiny_set(n: int) -> TrainingSet:
    gen = torch.Generator().manual_seed(0)
    return TrainingSet("distilled", torch.randint(0, 256, (n, 1, 8, 8), generator=gen, dtype=torch.uint8),
                       torch.arange(n) % 10)  # fmt: skip


class Constant(nn.Module):
    """A 'teacher' whose logits are fixed rows, whatever the input."""

    def __init__(self, rows: list[list[float]]) -> None:
        super().__init__()
        self.rows = torch.tensor(rows)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.rows[: len(x)]


# ---------------------------------------------------------------- relabelling
def test_frobenius_balancing_rescales_each_teacher_to_the_mean_norm():
    # ||A||_F = sqrt(9 + 16) = 5, ||B||_F = sqrt(100 + 0 + 0 + 0) = 10: mean 7.5; A x 1.5, B x 0.75.
    a, b = torch.tensor([[3.0, 0.0], [0.0, 4.0]]), torch.tensor([[0.0, 10.0], [0.0, 0.0]])
    balanced = balanced_norms([a, b])
    assert torch.allclose(balanced[0], torch.tensor([[4.5, 0.0], [0.0, 6.0]]))
    assert torch.allclose(balanced[1], torch.tensor([[0.0, 7.5], [0.0, 0.0]]))
    labeller = TeacherLabeller([Constant(a.tolist()), Constant(b.tolist())], balance=True)
    # The mean of the balanced logits: [[2.25, 3.75], [0, 3]]; unbalanced it would be [[1.5, 5], [0, 2]].
    assert torch.allclose(labeller(torch.zeros(2, 1), CPU), torch.tensor([[2.25, 3.75], [0.0, 3.0]]))
    assert torch.allclose(TeacherLabeller([Constant(a.tolist()), Constant(b.tolist())])(torch.zeros(2, 1), CPU),
                          torch.tensor([[1.5, 5.0], [0.0, 2.0]]))  # fmt: skip


def test_committee_weights_are_the_softmax_of_prior_over_ten():
    # CV-DD's CIFAR-100 priors; by hand: exp(p / 10) normalised (math.exp, plain floats).
    priors = [64.0, 60.6, 51.6, 59.4, 56.4]
    exps = [math.exp(p / 10) for p in priors]
    expected = [e / sum(exps) for e in exps]  # 0.3226, 0.2296, 0.0933, 0.2036, 0.1509
    weights = prior_weights(priors, 10.0, 5)
    assert weights == pytest.approx(expected, rel=1e-12)
    assert weights[0] == pytest.approx(0.32257, abs=1e-5) and sum(weights) == pytest.approx(1.0)
    # The labeller then sums the weighted logits (the weights already sum to one).
    teachers = [Constant([[float(k), 1.0]]) for k in range(5)]
    labels = TeacherLabeller(teachers, weights)(torch.zeros(1, 1), CPU)
    assert labels[0, 0] == pytest.approx(sum(k * w for k, w in enumerate(expected)), rel=1e-6)
    assert labels[0, 1] == pytest.approx(1.0, rel=1e-6)
    with pytest.raises(FadrmError, match="^2 teacher priors for 5 teachers"):
        prior_weights(priors[:2], 10.0, 5)


# ------------------------------------------------------------- weight EMA
def _model_with_batchnorm() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(2, 2), nn.BatchNorm1d(2))


def test_ema_averages_parameters_and_lends_them_without_the_buffers():
    model = _model_with_batchnorm()
    ema = EmaWeights(model, 0.9)
    start = [p.detach().clone() for p in model.parameters()]
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1.0)
    model.train()(torch.tensor([[1.0, 2.0], [3.0, 5.0]]))  # moves the running statistics
    ema.update(model)
    # 0.9 * start + 0.1 * (start + 1) = start + 0.1, exactly what the average holds.
    assert all(torch.allclose(a, s + 0.1) for a, s in zip(ema.averages, start))
    live = [p.detach().clone() for p in model.parameters()]
    buffers = {k: v.clone() for k, v in model.named_buffers()}
    with ema.swapped_in(model) as swapped:
        assert swapped is model
        assert all(torch.equal(p, a) for p, a in zip(model.parameters(), ema.averages))
        # BatchNorm's running statistics are the live model's (EDC swaps parameters only).
        assert all(torch.equal(v, buffers[k]) for k, v in model.named_buffers())
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), live))
    with pytest.raises(RuntimeError), ema.swapped_in(model):
        raise RuntimeError("validation failed")
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), live))  # restored after an error too


def test_ema_state_resumes_to_identical_averages():
    model = _model_with_batchnorm()
    whole, first = EmaWeights(model, 0.99), EmaWeights(model, 0.99)
    steps = [torch.randn(2, 2, generator=torch.Generator().manual_seed(s)) for s in range(4)]
    for k, step in enumerate(steps):
        with torch.no_grad():
            model[0].weight.add_(step)
        whole.update(model)
        if k < 2:
            first.update(model)
        if k == 1:
            resumed = EmaWeights(_model_with_batchnorm(), 0.5)
            resumed.load_state_dict(first.state_dict())
        elif k > 1:
            resumed.update(model)
    assert resumed.decay == 0.99
    assert all(torch.equal(a, b) for a, b in zip(whole.averages, resumed.averages))


def test_train_student_validates_the_ema_weights(monkeypatch):
    seen = []

    def recording(model, *args, **kwargs):
        seen.append([p.detach().clone() for p in model.parameters()])
        return {"top1": 0.0, "top5": 0.0, "loss": 0.0}

    monkeypatch.setattr(ST, "evaluate_accuracy", recording)
    averaged: list[EmaWeights] = []
    real = ST.EmaWeights

    def keeping(model, decay):
        averaged.append(real(model, decay))
        return averaged[-1]

    monkeypatch.setattr(ST, "EmaWeights", keeping)
    model = nn.Sequential(nn.Flatten(), nn.Linear(64, 10))
    config = EvalConfig(distilled="x", epochs=2, batch_size=4, accumulation=1, lr=0.1, eta=1.0, ema_decay=0.5)
    ST.train_student(model, _tiny_set(8), config, SMALL, CPU, None, None, log=lambda s: None)
    # Validated after epochs 1 and 2 with the averages, never the live weights, which stay in the model.
    assert len(seen) == 2 and all(torch.equal(p, a) for p, a in zip(seen[-1], averaged[0].averages))
    assert not all(torch.equal(p, a) for p, a in zip(model.parameters(), averaged[0].averages))


def test_the_new_options_at_their_defaults_keep_the_identity_of_older_runs():
    default = EvalConfig(distilled="x").identity()
    new = ("momentum", "ce_weight", "ema_decay", "teacher_priors", "prior_temperature", "balance_teachers",
           "rand_augment", "protocol")  # fmt: skip
    assert not set(new) & set(default)
    # Each enters only where it changes the training: momentum with SGD, the CE weight with mse-ce.
    assert "momentum" not in EvalConfig(distilled="x", momentum=0.5).identity()
    assert EvalConfig(distilled="x", optimizer="sgd", momentum=0.875).identity()["momentum"] == 0.875
    assert "ce_weight" not in EvalConfig(distilled="x", ce_weight=0.5).identity()
    assert EvalConfig(distilled="x", loss="mse-ce", ce_weight=0.025).identity()["ce_weight"] == 0.025
    assert EvalConfig(distilled="x", ema_decay=0.99).identity()["ema_decay"] == 0.99
    assert "prior_temperature" not in EvalConfig(distilled="x", prior_temperature=5.0).identity()
