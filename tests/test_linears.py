"""What counts as a linear layer (``lowrank_layers.linears``): transformers' ``Conv1D`` as
a Linear view sharing its storage, and GPT-2's Conv1D projections converted the right way
round."""

import pytest
import torch
from torch import nn

from lowrank_layers import LowRankLinear, convert_model
from lowrank_layers.linears import as_linear, is_conv1d, linear_weight

from .helpers import tiny_gpt2, tokens

transformers = pytest.importorskip("transformers")

# the tiny GPT-2's 32-wide projections are too small to gain: the guard would keep them dense
NO_GUARD = {"guard": False}


def conv1d_layers(model: nn.Module) -> dict[str, nn.Module]:
    return {n: m for n, m in model.named_modules() if is_conv1d(m)}


def test_conv1d_view_shares_storage_and_computes_the_same(gen):
    model = tiny_gpt2()
    conv = model.transformer.h[0].mlp.c_fc
    view = as_linear(conv)
    assert (view.in_features, view.out_features) == (32, 128)
    assert view.weight.data_ptr() == conv.weight.data_ptr()
    assert torch.equal(linear_weight(conv), conv.weight.t())
    x = torch.randn(3, 5, 32, generator=gen)
    torch.testing.assert_close(view(x), conv(x), rtol=1e-6, atol=1e-6)
    plain = nn.Linear(4, 4)
    assert as_linear(plain) is plain and linear_weight(plain) is plain.weight


@pytest.mark.parametrize("mode", ["train", "eval"])
def test_gpt2_conv1d_layers_convert_with_the_same_outputs_at_their_exact_rank(gen, mode):
    model = tiny_gpt2()
    with torch.no_grad():  # give each Conv1D weight an exact rank of 4: factors reproduce it
        for conv in conv1d_layers(model).values():
            nx, nf = conv.weight.shape
            a, b = torch.randn(nx, 4, generator=gen), torch.randn(4, nf, generator=gen)
            conv.weight.copy_(a @ b / 8)
    getattr(model, mode)()
    torch.manual_seed(0)
    x = tokens(gen)
    with torch.no_grad():
        before = model(x).logits if mode == "eval" else None
    report = convert_model(model, rank=4, exclude=["lm_head"], **NO_GUARD)
    assert len(report.converted) == 8 and not report.skipped
    by_name = {r.name: r for r in report.layers}
    assert (by_name["transformer.h.0.attn.c_attn"].in_features,
            by_name["transformer.h.0.attn.c_attn"].out_features) == (32, 96)  # fmt: skip
    assert (by_name["transformer.h.0.mlp.c_proj"].in_features,
            by_name["transformer.h.0.mlp.c_proj"].out_features) == (128, 32)  # fmt: skip
    assert all(r.relative_error < 1e-5 for r in report.converted)
    assert not conv1d_layers(model)
    assert all(m.training == (mode == "train") for m in model.modules())
    if mode == "eval":
        with torch.no_grad():
            torch.testing.assert_close(model(x).logits, before, rtol=1e-4, atol=1e-4)
    else:  # trains: gradients reach the factors
        model(x, labels=x).loss.backward()
        layer = model.transformer.h[0].attn.c_attn
        assert isinstance(layer, LowRankLinear) and layer.U.grad is not None


def test_gpt2_converts_activation_aware_and_generates(gen):
    model = tiny_gpt2()
    batches = [tokens(gen, (4, 16)) for _ in range(2)]
    report = convert_model(
        model, param_ratio=0.5, exclude=["lm_head"], calibration=batches, **NO_GUARD
    )
    assert len(report.converted) == 8
    assert all(r.output_error is not None and r.output_error < 1 for r in report.converted)
    out = model.generate(tokens(gen, (1, 4)), max_new_tokens=3, do_sample=False)
    assert out.shape == (1, 7)


def test_gpt2_converts_under_a_budget():
    model = tiny_gpt2()
    report = convert_model(model, budget=0.5, exclude=["lm_head"], **NO_GUARD)
    assert len(report.converted) == 8
    assert report.params_after <= 0.5 * report.params_before
