"""Robustness scores (HLR, IOR, LRS, ARS) on known numbers."""

from __future__ import annotations

import math

import pytest

from fadrm.robustness import augmentation_robust_score, label_robust_score, robustness_summary, scores


def test_label_and_augmentation_robust_scores_on_known_numbers():
    # a = 0.5 * 0.1 - 0.5 * 0.3 = -0.1; (exp(-0.1) - exp(-1)) / (e - exp(-1))
    assert label_robust_score(hlr=0.3, ior=0.1) == pytest.approx(0.22845363830836402, abs=1e-15)
    # b = 0.5 * 0.1 + 0.5 * (-0.04) = 0.03
    assert augmentation_robust_score(0.1, -0.04) == pytest.approx(0.2818985788840589, abs=1e-15)
    # Fractions keep both scores in [0, 1]: the extremes of the differences map onto the ends.
    assert label_robust_score(hlr=1.0, ior=-1.0) == pytest.approx(0.0, abs=1e-15)
    assert label_robust_score(hlr=-1.0, ior=1.0) == pytest.approx(1.0)
    assert augmentation_robust_score(-1.0, -1.0) == pytest.approx(0.0, abs=1e-15)
    assert augmentation_robust_score(1.0, 1.0) == pytest.approx(1.0)
    # The same differences in percent leave the range (what DD-Ranking's code reports).
    assert label_robust_score(hlr=30.0, ior=10.0) < 0


def test_scores_need_their_arms():
    accuracy = {("distilled", "soft", True): 0.8, ("random-real", "soft", True): 0.7}
    assert scores(accuracy) == pytest.approx({"ior": 0.1})
    accuracy.update({("full-data", "hard", True): 0.9, ("distilled", "hard", True): 0.6})
    assert scores(accuracy) == pytest.approx({"hlr": 0.3, "ior": 0.1, "lrs": 0.22845363830836402})
    accuracy.update({("distilled", "soft", False): 0.5, ("random-real", "soft", False): 0.54})
    assert scores(accuracy)["ars"] == pytest.approx(0.2818985788840589)


def _run(train_set, labels, top1, seed, augment=True, student="s"):
    return {
        "student": student,
        "train_set": train_set,
        "labels": labels,
        "augment": augment,
        "top1": top1,
        "seed": seed,
    }


def test_summary_is_per_seed_then_mean_and_sample_std():
    runs = [_run("full-data", "hard", 90.0, 0)]
    for seed, (soft, rand, hard) in enumerate([(80.0, 70.0, 60.0), (84.0, 70.0, 62.0)]):
        runs += [
            _run("distilled", "soft", soft, seed),
            _run("random-real", "soft", rand, seed),
            _run("random-real", "hard", 50.0, seed),
            _run("distilled", "hard", hard, seed),
        ]
    runs.append(_run("distilled", "soft", 75.0, 0, student="other"))  # no baseline: no score
    (row,) = robustness_summary(runs)
    assert row["student"] == "s" and row["repeats"] == 2 and "ars" not in row
    assert row["hlr"] == pytest.approx((0.30 + 0.28) / 2) and row["hlr_std"] == pytest.approx(math.sqrt(2) * 0.01)
    assert row["ior"] == pytest.approx((0.10 + 0.14) / 2) and row["ior_std"] == pytest.approx(math.sqrt(2) * 0.02)
    lrs = [label_robust_score(0.30, 0.10), label_robust_score(0.28, 0.14)]
    assert row["lrs"] == pytest.approx(sum(lrs) / 2)
