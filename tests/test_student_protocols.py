"""The students and relabelling of G-VBSM, EDC and CV-DD: teacher balancing, committee weights,
EMA of the student's weights, RandAugment views, and each method's published protocol."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from fadrm.errors import FadrmError
from fadrm.labels import TeacherLabeller, balanced_norms, prior_weights
from fadrm.runtime import make_runtime

CPU = make_runtime("cpu", "off")


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
