"""No optimizer silently holds parameters a conversion replaced: convert_model(optimizer=)
keeps it in step; without it, the next step() warns (lowrank_layers.stale)."""

import gc
import warnings
import weakref

import pytest
import torch
from torch import nn

from lowrank_layers import (
    AdaptiveLowRankLinear,
    DynamicLowRankLinear,
    convert_model,
    prune_dynamic,
    stale,
)
from lowrank_layers.stale import StaleOptimizerWarning, stale_parameters
from lowrank_layers.tools import merge_to_dense

OPTIMIZERS = {
    "adamw": lambda p: torch.optim.AdamW(p, lr=1e-2),
    "sgd-momentum": lambda p: torch.optim.SGD(p, lr=0.05, momentum=0.9),
    "adamw-fused": lambda p: torch.optim.AdamW(p, lr=1e-2, fused=True),
}
FIX = r"Pass optimizer= to convert_model, or build the optimizer after converting"


def make_mlp(seed: int = 0) -> nn.Sequential:
    """32 -> 64 -> 64 -> 4; the tests convert with guard=False, since the guard keeps layer 0
    (32 -> 64, too small to gain) dense and they need both hidden layers replaced."""
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(32, 64), nn.ReLU(), nn.Linear(64, 64), nn.ReLU(),
                         nn.Linear(64, 4))  # fmt: skip


def data(seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(256, 32, generator=gen)
    return x, (x[:, :4] * 3).argmax(1)


def train(model: nn.Module, opt: torch.optim.Optimizer, steps: int) -> list[float]:
    x, y = data()
    losses = []
    for _ in range(steps):
        loss = nn.functional.cross_entropy(model(x), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
    return losses


def two_groups(model: nn.Sequential, make=torch.optim.AdamW) -> torch.optim.Optimizer:
    """Weights with weight decay, biases without (the usual AdamW recipe)."""
    weights = [p for n, p in model.named_parameters() if not n.endswith("bias")]
    biases = [p for n, p in model.named_parameters() if n.endswith("bias")]
    return make(
        [{"params": weights, "weight_decay": 0.1}, {"params": biases, "weight_decay": 0.0}],
        lr=1e-2,
    )


def held(opt: torch.optim.Optimizer) -> set[int]:
    return {id(p) for g in opt.param_groups for p in g["params"]}


@pytest.mark.parametrize("name", OPTIMIZERS)
def test_convert_model_with_optimizer_trains_the_factors(name):
    model = make_mlp()
    opt = OPTIMIZERS[name](model.parameters())
    train(model, opt, 5)
    old = {id(model[i].weight) for i in (0, 2)}
    convert_model(model, param_ratio=0.5, exclude=["4"], guard=False, optimizer=opt)
    assert not old & held(opt)
    assert held(opt) == {id(p) for p in model.parameters()}
    assert not any(id(p) in old for p in opt.state)
    before = model[2].U.detach().clone()
    with warnings.catch_warnings():
        warnings.simplefilter("error", StaleOptimizerWarning)
        losses = train(model, opt, 40)
    assert not torch.equal(before, model[2].U)
    assert losses[-1] < 0.8 * losses[0]


def test_convert_model_keeps_each_group_and_its_hyper_parameters():
    model = make_mlp()
    opt = two_groups(model)
    train(model, opt, 2)
    bias_state = opt.state[model[0].bias]["exp_avg"].clone()
    convert_model(model, param_ratio=0.5, exclude=["4"], guard=False, optimizer=opt)
    decayed, plain = opt.param_groups
    assert (decayed["weight_decay"], plain["weight_decay"]) == (0.1, 0.0)
    factors = {id(getattr(model[i], n)) for i in (0, 2) for n in ("U", "S", "Vh")}
    assert {id(p) for p in decayed["params"]} == factors | {id(model[4].weight)}
    biases = {id(model[i].bias) for i in (0, 2, 4)}
    assert {id(p) for p in plain["params"]} == biases
    # the new bias is a copy: the old one's moments carried over to it
    assert torch.equal(opt.state[model[0].bias]["exp_avg"], bias_state)
    losses = train(model, opt, 30)
    assert losses[-1] < losses[0]


@pytest.mark.parametrize("name", [*OPTIMIZERS, "two-groups"])
def test_a_stale_optimizer_warns_on_its_next_step(name):
    model = make_mlp()
    params = model.parameters()
    opt = two_groups(model) if name == "two-groups" else OPTIMIZERS[name](params)
    train(model, opt, 2)
    convert_model(model, param_ratio=0.5, exclude=["4"], guard=False)
    assert ("0.weight", "convert_model") in stale_parameters(opt)
    with pytest.warns(StaleOptimizerWarning, match=rf"0\.weight.*2\.weight.*{FIX}") as record:
        train(model, opt, 3)
    assert len(record) == 1  # once per optimizer, not at every step
    assert record[0].filename == __file__  # points at the step() call


def test_an_optimizer_built_after_conversion_does_not_warn():
    model = make_mlp()
    stale = torch.optim.AdamW(model.parameters(), lr=1e-2)
    convert_model(model, param_ratio=0.5, exclude=["4"], guard=False)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    with warnings.catch_warnings():
        warnings.simplefilter("error", StaleOptimizerWarning)
        losses = train(model, opt, 30)
    assert losses[-1] < losses[0]
    assert stale_parameters(stale) and not stale_parameters(opt)


def test_freed_parameters_leave_the_retired_set():
    model = make_mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    old = weakref.ref(model[0].weight)
    key = id(model[0].weight)
    convert_model(model, param_ratio=0.5, exclude=["4"], guard=False)
    assert key in stale._retired and len(stale_parameters(opt)) == 4
    opt.param_groups[0]["params"] = list(model.parameters())  # rebuilt by hand
    gc.collect()
    assert old() is None and key not in stale._retired
    with warnings.catch_warnings():
        warnings.simplefilter("error", StaleOptimizerWarning)
        train(model, opt, 2)


def test_a_frozen_layer_is_neither_required_nor_flagged():
    model = make_mlp()
    model[0].requires_grad_(False)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    convert_model(model, param_ratio=0.5, exclude=["4"], guard=False, optimizer=opt)
    assert held(opt) == {id(p) for p in model.parameters() if p.requires_grad}
    with warnings.catch_warnings():
        warnings.simplefilter("error", StaleOptimizerWarning)
        train(model, opt, 2)


def test_adaptive_conversion_swaps_the_dense_weight_with_its_state():
    model = make_mlp()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    train(model, opt, 2)
    moments = opt.state[model[2].weight]["exp_avg"].clone()
    convert_model(
        model, param_ratio=0.5, layer="adaptive", exclude=["4"], guard=False, optimizer=opt
    )
    assert isinstance(model[2], AdaptiveLowRankLinear)
    assert held(opt) == {id(p) for p in model.parameters()}
    assert torch.equal(opt.state[model[2].weight]["exp_avg"], moments)


def test_merge_to_dense_takes_the_optimizer_or_warns():
    model = make_mlp()
    convert_model(model, param_ratio=0.5, exclude=["4"], guard=False)
    opt = two_groups(model, torch.optim.SGD)
    stale = torch.optim.SGD(model.parameters(), lr=0.1)
    merge_to_dense(model, opt)
    assert held(opt) == {id(p) for p in model.parameters()}
    assert {id(p) for p in opt.param_groups[0]["params"]} == {
        id(model[i].weight) for i in (0, 2, 4)
    }
    with warnings.catch_warnings():
        warnings.simplefilter("error", StaleOptimizerWarning)
        train(model, opt, 2)
    with pytest.warns(StaleOptimizerWarning, match=r"merge_to_dense replaced \(0\.U, 0\.S"):
        train(model, stale, 1)
    with pytest.raises(
        TypeError, match=r"optimizer must be a torch\.optim\.Optimizer or None, got str"
    ):
        merge_to_dense(model, "adam")


def test_prune_dynamic_without_the_optimizer_warns():
    torch.manual_seed(0)
    model = nn.Sequential(DynamicLowRankLinear(32, 32, max_rank=16))
    model[0].set_rank(4)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    prune_dynamic(model)
    with pytest.warns(StaleOptimizerWarning, match=r"prune_dynamic replaced \(0\.U"):
        model(torch.randn(2, 32)).sum().backward()
        opt.step()
