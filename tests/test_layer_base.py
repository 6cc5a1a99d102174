"""FactoredLinearBase: the members the three low-rank layers share, written once and driven
by the ``_active_factors`` and ``_match_state_dict`` hooks."""

import pytest
import torch
from torch import nn

from lowrank_layers import AdaptiveLowRankLinear, DynamicLowRankLinear, LowRankLinear
from lowrank_layers.factorize import Factors
from lowrank_layers.layer_base import FactoredLinearBase, upgrade_state_dict_

from .helpers import perturbed_layer, rel_err

KINDS = ["lowrank", "dynamic", "adaptive"]
SHARED = ("V", "weight", "weight_factors", "factors", "dense_weight", "to_linear")
# the adaptive layer is also dense for a while: these members answer for that phase
# and hand over to the base after the switch
ADAPTIVE_PHASE_AWARE = {"weight", "dense_weight", "reset_parameters"}


@pytest.mark.parametrize("cls", [LowRankLinear, DynamicLowRankLinear, AdaptiveLowRankLinear])
def test_the_three_layers_share_the_base_and_define_its_members_once(cls):
    assert issubclass(cls, FactoredLinearBase)
    members = {*SHARED, "reset_parameters", "_load_from_state_dict"}
    redefined = members & set(vars(cls))
    expected = ADAPTIVE_PHASE_AWARE if cls is AdaptiveLowRankLinear else set()
    assert redefined == expected


@pytest.mark.parametrize("kind", KINDS)
def test_shared_members_agree_with_the_forward(kind, gen):
    layer = perturbed_layer(kind)
    x = torch.randn(6, 40, generator=gen)
    out = layer(x)
    U, S, V, D = layer.weight_factors()
    assert U.requires_grad and V.shape == (40, layer.rank)  # not detached, at the active rank
    f = layer.factors()
    assert f.rank == layer.rank and not f.U.requires_grad
    assert torch.equal(f.V, V.detach()) and torch.equal(f.S, S.detach())
    assert torch.equal(f.D, D.detach())
    dense = layer.dense_weight()
    assert dense.shape == (24, 40)
    # the product formed in float32 against two float32 matmuls: rounding only
    assert rel_err(x @ dense.mT + layer.bias, out) < 1e-5
    assert rel_err(layer.to_linear()(x), out) < 1e-5
    with pytest.warns(UserWarning, match=r"dense weight was formed"):
        lazy = layer.weight + 0
    assert torch.allclose(lazy, dense, atol=1e-6) and layer.dense_weight_reads == 1


def test_a_dynamic_layer_answers_at_its_active_rank():
    layer = perturbed_layer("dynamic")
    assert (layer.rank, layer.max_rank) == (11, 16) and layer.V.shape == (40, 16)
    assert layer.factors().rank == 11 and layer.weight_factors()[0].shape == (24, 11)
    held = Factors(layer.U.detach(), layer.S.detach(), layer.V.detach(), layer.D.detach())
    # the 5 inactive components change the product: the shared members use the active ones
    assert rel_err(layer.dense_weight(), held.dense()) > 1e-2
    active = Factors(*(t.detach() for t in layer.weight_factors()))
    assert torch.allclose(layer.dense_weight(), active.dense(), atol=1e-6)


def test_a_dense_adaptive_layer_has_no_factors():
    layer = AdaptiveLowRankLinear(8, 6)
    for member in (layer.weight_factors, layer.factors):
        with pytest.raises(RuntimeError, match=r"still dense; call switch_to_lowrank first"):
            member()
    with pytest.raises(AttributeError, match=r"no attribute 'V'"):
        layer.V
    assert isinstance(layer.weight, nn.Parameter)
    assert torch.equal(layer.dense_weight(), layer.weight.detach())


def test_a_format_1_model_state_dict_loads_into_every_kind_under_its_prefix(gen):
    """Each layer upgrades its own ``<prefix>V`` entry through the base's load path."""
    saved = nn.ModuleList([perturbed_layer(kind) for kind in KINDS])
    old = {k: v.clone() if torch.is_tensor(v) else v for k, v in saved.state_dict().items()}
    for i in range(len(KINDS)):
        old[f"{i}.V"] = old.pop(f"{i}.Vh").mT.contiguous()
    fresh = nn.ModuleList(
        [
            perturbed_layer("lowrank", seed=1),
            perturbed_layer("dynamic", seed=1),
            AdaptiveLowRankLinear(40, 24),  # dense phase: loading restructures it
        ]
    )
    x = torch.randn(4, 40, generator=gen)
    for before, ref in zip(fresh, saved, strict=True):
        assert not torch.allclose(before(x), ref(x))
    fresh.load_state_dict(old)
    assert set(fresh.state_dict()) == set(saved.state_dict())
    assert fresh[1].rank == 11 and fresh[2].is_lowrank
    for after, ref in zip(fresh, saved, strict=True):
        assert torch.equal(after(x), ref(x))


def test_upgrade_state_dict_renames_only_a_format_1_v():
    V = torch.arange(6.0).reshape(3, 2)
    state = {"a.V": V, "b.V": torch.ones(3)}
    upgrade_state_dict_(state, "a.")
    assert set(state) == {"a.Vh", "b.V"} and torch.equal(state["a.Vh"], V.mT)
    assert state["a.Vh"].is_contiguous()
    upgrade_state_dict_(state, "b.")  # a 1-D "V" is someone else's: left alone
    assert set(state) == {"a.Vh", "b.V"}
    both = {"V": V, "Vh": V.mT.contiguous() + 1}
    upgrade_state_dict_(both, "")  # a Vh already there wins; V is left for strict to report
    assert set(both) == {"V", "Vh"} and torch.equal(both["Vh"], V.mT + 1)
