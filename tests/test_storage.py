"""How the factors are stored: ``Vh (r, in)`` and ``U (out, r)``, the weights of the two
linear maps in ``nn.Linear``'s layout; ``V`` a view; format-1 state dicts and files load."""

import pytest
import torch
from safetensors.torch import load_file, save_file
from torch import nn

from lowrank_layers import (
    AdaptiveLowRankLinear,
    convert_model,
    load_lowrank,
    save_lowrank,
)
from lowrank_layers.checkpoint import read_metadata
from lowrank_layers.offline import weight_spectra

from .helpers import perturbed_layer as make

KINDS = ["lowrank", "dynamic", "adaptive"]


def reference(layer: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """``x·V·diag(S)·Uᵀ·diag(D) + b`` written out from the documented views, in float64."""
    U, S, V, D = (t.double() for t in layer.weight_factors())
    return ((x.double() @ V) * S) @ U.mT * D + layer.bias.double()


@pytest.mark.parametrize("kind", KINDS)
def test_factors_are_stored_as_the_two_linear_weights(kind, gen):
    layer = make(kind)
    stored = layer.U.shape[1]  # max_rank for a dynamic layer
    shapes = {n: tuple(p.shape) for n, p in layer.named_parameters()}
    assert shapes == {
        "U": (24, stored),
        "S": (stored,),
        "Vh": (stored, 40),
        "D": (24,),
        "bias": (24,),
    }
    assert layer.U.is_contiguous() and layer.Vh.is_contiguous()
    # V is Vhᵀ, a view sharing Vh's storage, not a parameter of its own
    assert layer.V.shape == (40, stored) and torch.equal(layer.V, layer.Vh.mT)
    assert layer.V.data_ptr() == layer.Vh.data_ptr() and not layer.V.is_leaf
    x = torch.randn(5, 40, generator=gen)
    torch.testing.assert_close(layer(x).double(), reference(layer, x), rtol=1e-5, atol=1e-5)


def test_pruned_dynamic_layer_stays_contiguous():
    layer = make("dynamic")
    layer.prune()
    assert layer.Vh.shape == (11, 40) and layer.Vh.is_contiguous() and layer.U.is_contiguous()


@pytest.mark.parametrize("kind", KINDS)
def test_format_1_state_dict_loads(kind, gen):
    """A state dict saved before Vh (its ``V`` stored ``(in, r)``) loads into each kind."""
    layer = make(kind)
    old = {k: v.clone() if torch.is_tensor(v) else v for k, v in layer.state_dict().items()}
    old["V"] = old.pop("Vh").mT.contiguous()
    # differently initialised (a dense-phase adaptive layer)
    fresh = make(kind, seed=1) if kind != "adaptive" else AdaptiveLowRankLinear(40, 24, rank=9)
    x = torch.randn(3, 40, generator=gen)
    assert not torch.allclose(fresh(x), layer(x))
    fresh.load_state_dict(old)
    assert set(fresh.state_dict()) == set(layer.state_dict())
    assert torch.equal(fresh(x), layer(x))


def test_format_1_pruned_dynamic_state_dict_loads_into_a_larger_layer(gen):
    layer = make("dynamic")
    layer.prune()  # 11 components left
    old = dict(layer.state_dict())
    old["V"] = old.pop("Vh").mT.contiguous()
    fresh = make("dynamic", seed=1)  # 16 components
    x = torch.randn(3, 40, generator=gen)
    assert not torch.allclose(fresh(x), layer(x))
    fresh.load_state_dict(old)
    assert fresh.max_rank == 11 and fresh.Vh.shape == (11, 40)
    assert torch.equal(fresh(x), layer(x))


def test_format_1_checkpoint_loads_and_has_spectra(tmp_path, gen):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(40, 64), nn.ReLU(), nn.Linear(64, 24))
    convert_model(model, rank=8, balance="rownorm", guard=False)
    path = tmp_path / "m.safetensors"
    save_lowrank(model, path)
    # the same file as format 1 wrote it: V (in, r) under <layer>.V
    tensors, meta = load_file(path), read_metadata(path)
    for name in ("0", "2"):
        tensors[f"{name}.V"] = tensors.pop(f"{name}.Vh").mT.contiguous()
    save_file(tensors, path, metadata=meta | {"format_version": "1"})
    fresh = nn.Sequential(nn.Linear(40, 64), nn.ReLU(), nn.Linear(64, 24))
    load_lowrank(fresh, path)
    x = torch.randn(4, 40, generator=gen)
    assert torch.equal(fresh(x), model(x))
    assert fresh[0].Vh.is_contiguous() and fresh[0].Vh.shape == (8, 40)
    spectra = {s.name: s for s in weight_spectra(path)}
    expected = torch.linalg.svdvals(model[0].dense_weight().double())[:8]
    torch.testing.assert_close(
        spectra["0"].singular_values.double(), expected, rtol=1e-4, atol=1e-5
    )


def test_one_bfloat16_token_takes_the_contiguous_linear_path(monkeypatch, gen):
    """The stored Vh is oneDNN's layout: no per-call workaround (``torch.mv``) runs."""
    layer = make("lowrank").bfloat16()
    x = torch.randn(1, 40, generator=gen, dtype=torch.bfloat16)
    with torch.no_grad():
        expected = layer(x)

    def refuse(*args, **kwargs):
        raise AssertionError("torch.mv called")

    monkeypatch.setattr(torch, "mv", refuse)
    with torch.no_grad():
        assert torch.equal(layer(x), expected)
    # the functional form still accepts a V stored (in, r), through torch.mv
    from lowrank_layers.linear import lowrank_linear

    with pytest.raises(AssertionError, match=r"torch\.mv called"), torch.no_grad():
        lowrank_linear(x, layer.U, layer.S, layer.Vh.mT.contiguous())


class Doubled(nn.Module):
    def forward(self, X: torch.Tensor) -> torch.Tensor:
        return 2 * X


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("name", ["U", "Vh", "D", "bias"])
def test_parametrized_factors_are_used(kind, name, gen):
    """The forwards read the parameter dict directly (see stored_factors); a
    parametrization moves its tensor out of it, and the forward then uses the property."""
    from torch.nn.utils import parametrize

    layer = make(kind)
    x = torch.randn(3, 40, generator=gen)
    before = layer(x)
    parametrize.register_parametrization(layer, name, Doubled())
    assert name not in layer._parameters
    with torch.no_grad():
        torch.testing.assert_close(layer(x).double(), reference(layer, x), rtol=1e-5, atol=1e-5)
        assert not torch.allclose(layer(x), before)  # the doubled tensor is used


def test_parametrized_dense_weight_of_an_adaptive_layer_is_used(gen):
    from torch.nn.utils import parametrize

    layer = AdaptiveLowRankLinear(40, 24, rank=9)  # dense phase
    weight = layer.weight.detach().clone()
    parametrize.register_parametrization(layer, "weight", Doubled())
    assert not layer.is_lowrank
    x = torch.randn(3, 40, generator=gen)
    with torch.no_grad():
        torch.testing.assert_close(layer(x), x @ (2 * weight).mT + layer.bias)
