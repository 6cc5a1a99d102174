"""The shared helpers (common.py): one validator per kind of argument, the progress bar,
and the restoring of training flags."""

import math
import re
import sys

import pytest
from torch import nn

from lowrank_layers.common import (
    InputError,
    check_fraction,
    check_int,
    check_module,
    check_positive,
    progress_bar,
    restored_flags,
)


@pytest.mark.parametrize(
    ("args", "kwargs", "value"),
    [
        (("rank", 1), {}, 1),
        (("threshold", 0, 0), {}, 0),
        (("steps", None), {"optional": True}, None),
    ],
)
def test_check_int_returns_an_allowed_value(args, kwargs, value):
    assert check_int(*args, **kwargs) is value


@pytest.mark.parametrize(
    ("args", "kwargs", "message"),
    [
        (("rank", 0), {}, r"^rank must be a positive int, got 0$"),
        (("rank", True), {}, r"^rank must be a positive int, got True$"),
        (("rank", 2.0), {}, r"^rank must be a positive int, got 2.0$"),
        (("rank", None), {}, r"^rank must be a positive int, got None$"),
        (("threshold", -1, 0), {}, r"^threshold must be an int >= 0, got -1$"),
        (("heal: steps", 0), {"optional": True}, r"^heal: steps must be a positive int or None"),
    ],
)
def test_check_int_errors(args, kwargs, message):
    with pytest.raises(InputError, match=message):
        check_int(*args, **kwargs)


def test_check_positive():
    assert check_positive("lr", 1e-4) == 1e-4
    assert check_positive("lr", 3) == 3
    assert check_positive("max_grad_norm", None, optional=True) is None
    for bad in (0, -1.0, math.nan, math.inf, True, "1"):
        with pytest.raises(InputError, match=rf"^lr must be a positive number, got {bad!r}$"):
            check_positive("lr", bad)
    with pytest.raises(InputError, match=r"^x must be a positive number or None, got 0$"):
        check_positive("x", 0, optional=True)


def test_check_fraction_is_unchanged():
    assert check_fraction("budget", 1) == 1.0
    with pytest.raises(InputError, match=r"^budget must be in \(0, 1\], got 0$"):
        check_fraction("budget", 0)
    with pytest.raises(TypeError, match=r"^budget must be a float in \(0, 1\], got str$"):
        check_fraction("budget", "0.5")


def test_restored_flags_also_after_an_error():
    model = nn.Sequential(nn.Linear(2, 2), nn.Dropout()).train()
    model[1].eval()  # each module's own flag comes back, not the root's
    weight = model[0].weight
    weight.requires_grad_(False)
    with pytest.raises(RuntimeError, match="inside"), restored_flags(model.modules(), [weight]):
        model.eval()
        weight.requires_grad_(True)
        assert not model[0].training and weight.requires_grad  # changed inside
        raise RuntimeError("inside")
    assert model.training and model[0].training and not model[1].training
    assert not weight.requires_grad


def test_progress_bar_over_items_or_towards_a_total(monkeypatch, capsys):
    assert list(progress_bar([1, 2, 3], desc="items")) == [1, 2, 3]
    bar = progress_bar(desc="healing", unit="step", total=4)
    assert bar.total == 4
    bar.update(4)
    bar.close()
    assert "healing" in capsys.readouterr().err
    monkeypatch.setitem(sys.modules, "tqdm.auto", None)  # as if tqdm were not installed
    with pytest.raises(ImportError, match=r"pip install 'lowrank-layers\[progress\]'"):
        progress_bar(total=1)


def test_restored_flags_takes_any_iterables():
    layer = nn.Linear(2, 2)
    with restored_flags(iter([layer]), (p for p in layer.parameters())):
        layer.eval()
        for p in layer.parameters():
            p.requires_grad_(False)
    assert layer.training and all(p.requires_grad for p in layer.parameters())


def _entry_points():
    import torch

    from lowrank_layers import compress, convert_model, lowrank_summary, merge_to_dense
    from lowrank_layers.heal import heal
    from lowrank_layers.training import prune_dynamic, switch_to_lowrank

    model = nn.Sequential(nn.Linear(8, 8))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    batches = [torch.zeros(2, 8)]
    return [
        ("switch_to_lowrank(model, optimizer)", lambda: switch_to_lowrank(opt, model)),
        ("prune_dynamic(model, optimizer)", lambda: prune_dynamic(opt, model)),
        ("convert_model(model, config)", lambda: convert_model(opt, rank=2)),
        ("compress(model, calibration, config)", lambda: compress(opt, batches, budget=0.5)),
        ("merge_to_dense(model)", lambda: merge_to_dense(opt)),
        ("lowrank_summary(model)", lambda: lowrank_summary(opt)),
        ("heal(student, teacher, batches)", lambda: heal(opt, model, batches, steps=1)),
    ]


def test_a_swapped_optimizer_and_model_names_both_types():
    for signature, call in _entry_points():
        name = "student" if signature.startswith("heal") else "model"
        expected = (
            rf"^{name} must be an nn\.Module, got AdamW \(an optimizer, torch\.optim\.Optimizer\): "
            rf"the arguments are {re.escape(signature)}$"
        )
        with pytest.raises(TypeError, match=expected):
            call()
    with pytest.raises(TypeError, match=r"^model must be an nn\.Module, got str; f\(model\)$"):
        check_module("model", "not a model", "f(model)")
    check_module("model", nn.Linear(2, 2), "f(model)")  # a module passes
