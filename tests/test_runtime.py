"""The one device/precision decision: placement, memory format, compilation, bad requests."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from fadrm.errors import FadrmError
from fadrm.runtime import make_runtime


def test_place_and_batch_follow_the_runtime():
    runtime = make_runtime("cpu", "off", channels_last=True)
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4))
    assert runtime.place(model, compile=True) is model  # compilation not asked of this runtime
    assert model[0].weight.is_contiguous(memory_format=torch.channels_last)
    assert runtime.batch(torch.rand(2, 3, 8, 8)).is_contiguous(memory_format=torch.channels_last)
    plain = make_runtime("cpu", "off", channels_last=False)
    assert plain.batch(torch.rand(2, 3, 8, 8)).is_contiguous()


def test_compiled_placement_shares_the_parameters():
    runtime = make_runtime("cpu", "off", compile=True)
    model = nn.Linear(3, 2)
    compiled = runtime.place(model, compile=True)
    assert compiled is not model and compiled.weight is model.weight
    assert runtime.place(model) is model  # only where compilation is asked for
    assert "compiled" in runtime.describe()


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"device": "tpu"}, "unknown device"),
        ({"device": "meta"}, "not supported"),
        ({"device": "cpu", "amp": "fp16"}, "fp16 needs CUDA"),
        ({"device": "cpu", "amp": "fast"}, "unknown --amp"),
    ],
)
def test_bad_requests(kwargs, message):
    with pytest.raises(FadrmError, match=message):
        make_runtime(**kwargs)


def test_compile_without_a_cpu_compiler_is_one_clear_error(monkeypatch):
    monkeypatch.setattr("shutil.which", lambda name: None)
    with pytest.raises(FadrmError, match="C\\+\\+ compiler"):
        make_runtime("cpu", "off", compile=True)
    assert make_runtime("cpu", "off").compile is False


def test_auto_precision_is_each_stages_published_one(monkeypatch):
    # Synthesis: fp16 autocast with a gradient scaler (as the reference); relabelling and students:
    # full precision; teachers: bf16 where supported, fp16 otherwise. The CPU: always off.
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: True)
    assert make_runtime("cuda", "auto", stage="synthesis").amp == "fp16"
    assert make_runtime("cuda", "auto", stage="synthesis").grad_scaler() is not None
    assert make_runtime("cuda", "auto", stage="evaluate").amp == "off"
    assert make_runtime("cuda", "auto", stage="teacher").amp == "bf16"
    assert make_runtime("cuda", "bf16", stage="synthesis").amp == "bf16"  # bf16 stays an option
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: False)
    assert make_runtime("cuda", "auto", stage="teacher").amp == "fp16"
    assert {make_runtime("cpu", "auto", stage=s).amp for s in ("synthesis", "evaluate", "teacher")} == {"off"}
