"""GradientProjector: low-rank gradients from a periodically refreshed subspace."""

import pytest
import torch
from torch import nn

from lowrank_layers.grad import GradientProjector

from .helpers import rel_err


def model_and_batch(gen):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(48, 96), nn.ReLU(), nn.Linear(96, 32))
    return model, torch.randn(64, 48, generator=gen), torch.randn(64, 32, generator=gen)


def grads(model, x, y) -> dict[str, torch.Tensor]:
    model.zero_grad()
    nn.functional.mse_loss(model(x), y).backward()
    return {n: p.grad.clone() for n, p in model.named_parameters()}


def test_refresh_step_gives_the_best_low_rank_gradient(gen):
    model, x, y = model_and_batch(gen)
    plain = grads(model, x, y)
    projector = GradientProjector(model, rank=8, update_every=5, method="svd")
    projected = grads(model, x, y)
    for name in ("0.weight", "2.weight"):
        G = plain[name].double()
        U, S, Vh = torch.linalg.svd(G, full_matrices=False)
        best = (U[:, :8] * S[:8]) @ Vh[:8]  # Eckart–Young
        assert rel_err(projected[name], best) < 1e-4
    for name in ("0.bias", "2.bias"):  # 1-D parameters untouched
        assert torch.equal(projected[name], plain[name])
    assert projector.ranks == {"0.weight": 8, "2.weight": 8}


def test_between_refreshes_the_subspace_is_kept(gen):
    model, x, y = model_and_batch(gen)
    projector = GradientProjector(model, rank=4, update_every=3, method="svd")
    first = grads(model, x, y)["0.weight"]
    P = projector.states["0.weight"].basis.clone()
    x2 = torch.randn(64, 48, generator=gen)
    second = grads(model, x2, y)["0.weight"]  # step 2: same basis, a different gradient
    assert not projector.states["0.weight"].left  # 96 x 48: projected on the (smaller) right
    assert torch.allclose(second @ P @ P.mT, second, atol=1e-6)  # rows lie in span(P)
    assert not torch.allclose(first, second)
    grads(model, x, y)  # step 3
    grads(model, x2, y)  # step 4: refresh
    assert projector.states["0.weight"].refreshes == 2


def test_remove_restores_plain_gradients_and_training_still_works(gen):
    model, x, y = model_and_batch(gen)
    plain = grads(model, x, y)
    projector = GradientProjector(model, rank_ratio=0.25, update_every=10)
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    losses = []
    for _ in range(30):
        loss = nn.functional.mse_loss(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
    assert losses[-1] < losses[0]
    projector.remove()
    model2, _, _ = model_and_batch(gen)
    after = grads(model2, x, y)
    assert torch.equal(after["0.weight"], plain["0.weight"])


def test_right_projection_for_tall_gradients_and_energy_policy(gen):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 80))  # gradient 80 x 16: project on the right
    x, y = torch.randn(32, 16, generator=gen), torch.randn(32, 80, generator=gen)
    projector = GradientProjector(model, energy=0.9, update_every=2, method="svd")
    g = grads(model, x, y)["0.weight"]
    state = projector.states["0.weight"]
    assert not state.left and state.basis.shape[0] == 16
    P = state.basis
    assert torch.allclose(g @ P @ P.mT, g, atol=1e-6)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({}, r"exactly one rank policy"),
        ({"rank": 4, "update_every": 0}, r"update_every must be a positive int, got 0"),
        ({"rank": 4, "method": "qr"}, r"method must be one of 'svd', 'randomized'"),
        ({"rank": 4, "include": "nothing"}, r"no 2-D trainable parameter of Sequential matched"),
    ],
)
def test_errors(kwargs, match, gen):
    model, _, _ = model_and_batch(gen)
    with pytest.raises(ValueError, match=match):
        GradientProjector(model, **kwargs)
