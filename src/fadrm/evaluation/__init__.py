"""Evaluation of a distilled set: fresh students trained on it alone, validated on real data.

The plan (:mod:`.plan`: which students on which sets, their identities and files) is decided
before anything trains; :mod:`.run` carries it out, reusing finished runs and resuming
unfinished ones; :mod:`.store` keeps the label stores and finished runs; :mod:`.summary` gives
the figures. One student's training loop is :mod:`fadrm.students`.
"""

from .plan import STUDENT_PROTOCOL, EvaluationPlan, Repeat, StudentJob, plan_evaluation, settle
from .run import evaluate, student_args, train_students
from .store import LabelStore, label_store_identity, stored_label_bytes
from .summary import summarise_runs

__all__ = [
    "train_students",
    "STUDENT_PROTOCOL",
    "EvaluationPlan",
    "LabelStore",
    "Repeat",
    "StudentJob",
    "evaluate",
    "label_store_identity",
    "plan_evaluation",
    "settle",
    "stored_label_bytes",
    "student_args",
    "summarise_runs",
]
