"""Every layer kind under autocast, torch.compile, fused AdamW and activation checkpointing."""

import pytest
import torch
import torch._dynamo
from torch import nn
from torch.utils.checkpoint import checkpoint

from lowrank_layers import (
    AdaptiveLowRankLinear,
    DynamicLowRankLinear,
    LowRankLinear,
    switch_to_lowrank,
)


def kinds() -> dict[str, nn.Module]:
    torch.manual_seed(0)
    switched = AdaptiveLowRankLinear(64, 48, rank=8)
    switched.switch_to_lowrank()
    return {
        "lowrank": LowRankLinear(64, 48, 10, row_scales=True),
        "adaptive-dense": AdaptiveLowRankLinear(64, 48, rank=8),
        "adaptive-switched": switched,
        "dynamic": DynamicLowRankLinear(64, 48, max_rank=16, active_rank=10),
    }


@pytest.mark.parametrize("name", ["lowrank", "adaptive-dense", "adaptive-switched", "dynamic"])
def test_autocast_bfloat16_forward_and_backward(name, gen):
    layer = kinds()[name]
    x = torch.randn(3, 5, 64, generator=gen)
    reference = layer(x).detach()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = layer(x)
    assert out.dtype == torch.bfloat16
    out.float().square().sum().backward()
    for pname, p in layer.named_parameters():
        assert p.grad is not None and p.grad.dtype == torch.float32, pname
        assert bool(torch.isfinite(p.grad).all()), pname
    # bfloat16 keeps 8 bits of mantissa: within a few percent of the float32 output
    assert float((out.detach().float() - reference).norm() / reference.norm()) < 0.03


@pytest.mark.parametrize("name", ["lowrank", "adaptive-dense", "adaptive-switched", "dynamic"])
def test_no_graph_breaks(name, gen):
    model = nn.Sequential(kinds()[name], nn.GELU(), nn.Linear(48, 8))
    explanation = torch._dynamo.explain(model)(torch.randn(4, 64, generator=gen))
    assert explanation.graph_break_count == 0
    assert explanation.graph_count == 1


def test_compile_matches_eager_and_recompiles_after_structural_changes(gen):
    torch.manual_seed(0)
    compiles = []

    def counting_backend(gm: torch.fx.GraphModule, example_inputs):
        compiles.append(gm)
        return gm.forward

    model = nn.Sequential(
        LowRankLinear(64, 64, 12),
        nn.GELU(),
        AdaptiveLowRankLinear(64, 64, rank=8),
        nn.GELU(),
        DynamicLowRankLinear(64, 32, max_rank=16),
    )
    torch._dynamo.reset()
    compiled = torch.compile(model, backend=counting_backend)
    x = torch.randn(6, 64, generator=gen)
    assert torch.allclose(compiled(x), model(x), atol=1e-6)
    assert len(compiles) == 1
    compiled(x)
    assert len(compiles) == 1  # no recompilation without a change

    switch_to_lowrank(model)
    assert torch.allclose(compiled(x), model(x), atol=1e-6)  # recompiled, not stale
    model[4].set_rank(5)
    assert torch.allclose(compiled(x), model(x), atol=1e-6)
    assert len(compiles) == 3


def test_inductor_compile_forward_and_backward(gen):
    torch.manual_seed(0)
    model = nn.Sequential(LowRankLinear(64, 64, 12), nn.GELU(), DynamicLowRankLinear(64, 32))
    reference = nn.Sequential(LowRankLinear(64, 64, 12), nn.GELU(), DynamicLowRankLinear(64, 32))
    reference.load_state_dict(model.state_dict())
    torch._dynamo.reset()
    compiled = torch.compile(model)
    x = torch.randn(8, 64, generator=gen)
    out = compiled(x)
    assert torch.allclose(out, reference(x), atol=1e-5)
    out.square().sum().backward()
    reference(x).square().sum().backward()
    for (name, p), q in zip(model.named_parameters(), reference.parameters(), strict=True):
        assert torch.allclose(p.grad, q.grad, atol=1e-4), name


def test_fused_adamw_trains_every_kind(gen):
    model = nn.ModuleList(kinds().values())
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, fused=True)
    x = torch.randn(32, 64, generator=gen)
    target = torch.randn(32, 48, generator=gen)
    losses = []
    for _ in range(20):
        loss = sum(nn.functional.mse_loss(layer(x), target) for layer in model)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
    assert losses[-1] < 0.7 * losses[0]


@pytest.mark.parametrize("name", ["lowrank", "adaptive-switched", "dynamic"])
def test_activation_checkpointing_gives_the_same_gradients(name, gen):
    layer = kinds()[name]
    x = torch.randn(4, 64, generator=gen, requires_grad=True)
    layer(x).square().sum().backward()
    plain = {n: p.grad.clone() for n, p in layer.named_parameters()}
    plain_x = x.grad.clone()
    layer.zero_grad()
    x.grad = None
    checkpoint(layer, x, use_reentrant=False).square().sum().backward()
    for n, p in layer.named_parameters():
        assert torch.allclose(p.grad, plain[n], atol=1e-6), n
    assert torch.allclose(x.grad, plain_x, atol=1e-6)
