"""switch_to_lowrank / prune_dynamic in a training loop, with the optimizer kept in step."""

import warnings

import pytest
import torch
from sklearn.datasets import load_digits
from torch import nn

from lowrank_layers import (
    AdaptiveLowRankLinear,
    DynamicLowRankLinear,
    prune_dynamic,
    switch_to_lowrank,
)
from lowrank_layers.stale import StaleOptimizerWarning


@pytest.fixture(scope="module")
def digits():
    data = load_digits()
    x = torch.tensor(data.data, dtype=torch.float32) / 16.0
    y = torch.tensor(data.target)
    return x[:1200], y[:1200]


def make_model(seed: int = 0) -> nn.Sequential:
    torch.manual_seed(seed)
    return nn.Sequential(
        AdaptiveLowRankLinear(64, 256, rank_ratio=0.25),
        nn.ReLU(),
        AdaptiveLowRankLinear(256, 256, rank_ratio=0.25),
        nn.ReLU(),
        nn.Linear(256, 10),
    )


OPTIMIZERS = {
    "sgd-momentum": lambda p: torch.optim.SGD(p, lr=0.05, momentum=0.9),
    "adam": lambda p: torch.optim.Adam(p, lr=2e-3),
    "adamw-foreach": lambda p: torch.optim.AdamW(p, lr=2e-3, foreach=True),
    "adamw-fused": lambda p: torch.optim.AdamW(p, lr=2e-3, fused=True),
}


def run_epochs(model, opt, x, y, epochs, sched=None) -> list[float]:
    losses = []
    gen = torch.Generator().manual_seed(1)
    for _ in range(epochs):
        total = 0.0
        for idx in torch.randperm(len(x), generator=gen).split(100):
            loss = nn.functional.cross_entropy(model(x[idx]), y[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            total += float(loss.detach()) * len(idx)
        if sched is not None:
            sched.step()
        losses.append(total / len(x))
    return losses


def optimizer_params(opt) -> set[int]:
    return {id(p) for group in opt.param_groups for p in group["params"]}


@pytest.mark.parametrize("name", sorted(OPTIMIZERS))
def test_training_continues_after_the_switch(name, digits):
    x, y = digits
    model = make_model()
    opt = OPTIMIZERS[name](model.parameters())
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=3, gamma=0.5)
    dense_losses = run_epochs(model, opt, x, y, 3, sched)
    head_bias_state = {k: v.clone() for k, v in opt.state[model[4].bias].items()}

    results = switch_to_lowrank(model, opt)

    assert set(results) == {"0", "2"} and results["0"].rank == 16
    assert optimizer_params(opt) == {id(p) for p in model.parameters()}  # none stale or missing
    for p in model[0].parameters():
        assert any(p is q for q in opt.param_groups[0]["params"])
    # untouched parameters keep their state exactly
    for k, v in head_bias_state.items():
        assert torch.equal(opt.state[model[4].bias][k], v)
    assert model[0].bias in opt.state  # the switched layer's bias too
    switched_losses = run_epochs(model, opt, x, y, 4, sched)
    assert opt.param_groups[0]["lr"] == OPTIMIZERS[name](model.parameters()).defaults["lr"] / 4
    assert switched_losses[-1] < switched_losses[0] < dense_losses[0]
    assert optimizer_params(opt) == {id(p) for p in model.parameters()}


def test_checkpoint_after_switch_resumes_into_fresh_dense_model(digits, tmp_path):
    x, y = digits
    model = make_model()
    opt = torch.optim.AdamW(model.parameters(), lr=2e-3)
    run_epochs(model, opt, x, y, 1)
    switch_to_lowrank(model, opt)
    run_epochs(model, opt, x, y, 1)
    path = tmp_path / "ckpt.pt"
    torch.save({"model": model.state_dict(), "opt": opt.state_dict()}, path)

    fresh = make_model(seed=123)  # built as at the start of training: dense phase
    assert not fresh[0].is_lowrank
    ckpt = torch.load(path)
    fresh.load_state_dict(ckpt["model"])  # restructures the switched layers
    fresh_opt = torch.optim.AdamW(fresh.parameters(), lr=2e-3)
    fresh_opt.load_state_dict(ckpt["opt"])

    assert torch.equal(fresh(x[:50]), model(x[:50]))
    run_epochs(model, opt, x, y, 1)
    run_epochs(fresh, fresh_opt, x, y, 1)
    assert torch.equal(fresh(x[:50]), model(x[:50]))  # the optimizer state matched too


def test_switch_errors_and_policy_override():
    with pytest.raises(ValueError, match=r"no AdaptiveLowRankLinear in its dense phase"):
        switch_to_lowrank(nn.Sequential(nn.Linear(4, 4)))
    model = make_model()
    results = switch_to_lowrank(model, rank=4)
    assert {r.rank for r in results.values()} == {4}
    with pytest.raises(ValueError, match=r"dense phase"):
        switch_to_lowrank(model)


def test_an_optimizer_without_the_layers_weights_is_refused():
    model = make_model()
    opt = torch.optim.SGD([model[4].weight], lr=0.1)  # only the head is trained
    with pytest.raises(ValueError, match=r"the optimizer holds no weight of \d+ of the \d+ "
                       r"layers to switch"):  # fmt: skip
        switch_to_lowrank(model, opt)
    assert optimizer_params(opt) == {id(model[4].weight)}


def test_prune_dynamic_carries_optimizer_state(digits):
    x, y = digits
    torch.manual_seed(0)
    model = nn.Sequential(DynamicLowRankLinear(64, 128, max_rank=32), nn.ReLU(), nn.Linear(128, 10))
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    run_epochs(model, opt, x, y, 1)
    model[0].set_rank(12)
    run_epochs(model, opt, x, y, 1)
    exp_avg_u = opt.state[model[0].U]["exp_avg"][:, :12].clone()
    out = model(x[:20])
    assert prune_dynamic(model, opt) == {"0": 12}
    assert torch.allclose(model(x[:20]), out, atol=1e-6)
    assert optimizer_params(opt) == {id(p) for p in model.parameters()}
    assert torch.equal(opt.state[model[0].U]["exp_avg"], exp_avg_u)
    losses = run_epochs(model, opt, x, y, 2)
    assert losses[-1] < losses[0]
    with pytest.raises(ValueError, match=r"holds no DynamicLowRankLinear"):
        prune_dynamic(nn.Linear(3, 3))


def test_switch_in_a_dense_model_built_with_adaptive_layers_matches_linear(digits):
    x, _ = digits
    model = make_model()
    reference = nn.Sequential(
        nn.Linear(64, 256), nn.ReLU(), nn.Linear(256, 256), nn.ReLU(), nn.Linear(256, 10)
    )
    reference.load_state_dict(model.state_dict())  # same keys, same shapes
    assert torch.equal(reference(x[:10]), model(x[:10]))
    assert all(isinstance(m, AdaptiveLowRankLinear) for m in (model[0], model[2]))


# ------------------------------------------------------------------------------------------
# the optimizer check
# ------------------------------------------------------------------------------------------


def adaptive_model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(AdaptiveLowRankLinear(16, 16, rank=4), nn.ReLU(),
                         AdaptiveLowRankLinear(16, 16, rank=4))  # fmt: skip


def test_switch_refuses_an_optimizer_without_the_layers_and_switches_nothing():
    model = adaptive_model()
    other = torch.optim.SGD(nn.Linear(2, 2).parameters(), lr=0.1)
    with pytest.raises(ValueError, match=r"the optimizer holds no weight of 2 of the 2 layers "
                       r"to switch \(0, 2\): their factors would never train"):  # fmt: skip
        switch_to_lowrank(model, other)
    assert not model[0].is_lowrank and not model[2].is_lowrank
    partial = torch.optim.SGD(model[0].parameters(), lr=0.1)
    with pytest.raises(ValueError, match=r"no weight of 1 of the 2 layers to switch \(2\)"):
        switch_to_lowrank(model, partial)
    with pytest.raises(TypeError, match=r"optimizer must be a torch.optim.Optimizer or None, "
                       r"got list"):  # fmt: skip
        switch_to_lowrank(model, [model[0].weight])


def test_switch_accepts_frozen_layers_left_out_of_the_optimizer():
    model = adaptive_model()
    model[2].requires_grad_(False)
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    results = switch_to_lowrank(model, opt)
    assert set(results) == {"0", "2"}
    held = {id(p) for p in opt.param_groups[0]["params"]}
    assert id(model[0].U) in held and id(model[2].U) not in held


def test_switch_without_the_optimizer_warns_at_the_stale_step(digits):
    x, y = digits
    model = make_model()
    stale = torch.optim.AdamW(model.parameters(), lr=2e-3)
    kept = torch.optim.AdamW(make_model(1).parameters(), lr=2e-3)  # another model's
    run_epochs(model, stale, x, y, 1)
    switch_to_lowrank(model)
    fix = r"Pass optimizer= to switch_to_lowrank, or build the optimizer after converting"
    with pytest.warns(
        StaleOptimizerWarning, match=rf"holds 2 parameters .*\(0\.weight, 2\.weight\).*{fix}"
    ):
        run_epochs(model, stale, x, y, 1)
    fresh = torch.optim.AdamW(model.parameters(), lr=2e-3)
    with warnings.catch_warnings():
        warnings.simplefilter("error", StaleOptimizerWarning)
        losses = run_epochs(model, fresh, x, y, 2)
        kept.step()
    assert losses[-1] < losses[0]
