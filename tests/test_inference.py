"""Inference (autograd off) reads the factors as they are: same outputs, nothing cached.

``lowrank_linear`` has two regimes, chosen by the number of tokens per call (see
``FOLD_MIN_TOKENS``): the few-token one scales activations in place when autograd is off.
These tests hold every layer kind to one rule: with autograd off the output is
bit-identical to the output with autograd on, before and after every kind of parameter
change, and nothing the layer computes for inference outlives the call.
"""

from __future__ import annotations

import copy
import io
import warnings

import pytest
import torch
import torch._dynamo
from torch import nn

from lowrank_layers import AdaptiveLowRankLinear, inference_layout_
from lowrank_layers.linear import FOLD_MIN_TOKENS, lowrank_linear

from .helpers import perturbed_layer as make

TOKENS = [1, 7, FOLD_MIN_TOKENS - 1, FOLD_MIN_TOKENS]


def assert_modes_agree(layer: nn.Module, tokens: int, gen: torch.Generator) -> torch.Tensor:
    """Grad mode, no_grad and inference_mode give the same bits; returns the output.

    The input is drawn from a copy of ``gen``, so calls with one generator see one input.
    """
    local = torch.Generator().manual_seed(gen.initial_seed())
    x = torch.randn(tokens, 40, generator=local, dtype=layer.U.dtype)
    with_grad = layer(x)
    assert with_grad.requires_grad
    with torch.no_grad():
        no_grad = layer(x)
    with torch.inference_mode():
        inference = layer(x)
    assert torch.equal(no_grad, with_grad.detach())
    assert torch.equal(inference, with_grad.detach())
    # and both equal the dense weight's output, to float32 rounding
    dense = nn.functional.linear(x, layer.dense_weight(), layer.bias)
    torch.testing.assert_close(with_grad.detach(), dense, rtol=1e-5, atol=1e-5)
    return with_grad.detach()


KINDS = ["lowrank", "dynamic", "adaptive"]


@pytest.mark.parametrize("tokens", TOKENS)
@pytest.mark.parametrize("balance", [True, False])
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("kind", KINDS)
def test_no_grad_equals_grad_mode(kind, bias, balance, tokens, gen):
    assert_modes_agree(make(kind, balance=balance, bias=bias), tokens, gen)


@pytest.mark.parametrize("kind", KINDS)
def test_outputs_follow_an_optimizer_step(kind, gen):
    layer = make(kind)
    opt = torch.optim.SGD(layer.parameters(), lr=0.5)
    before = assert_modes_agree(layer, 3, gen)
    x = torch.randn(64, 40, generator=gen)
    layer(x).square().mean().backward()
    opt.step()
    after = assert_modes_agree(layer, 3, gen)
    assert not torch.allclose(before, after, atol=1e-3)


@pytest.mark.parametrize("kind", KINDS)
def test_outputs_follow_load_state_dict_and_to_dtype(kind, gen):
    layer = make(kind)
    other = copy.deepcopy(layer)
    with torch.no_grad():
        for p in other.parameters():
            p.mul_(1.5)
    assert_modes_agree(layer, 2, gen)
    layer.load_state_dict(other.state_dict())
    out = assert_modes_agree(layer, 2, gen)
    torch.testing.assert_close(out, assert_modes_agree(other, 2, gen), rtol=0, atol=0)
    layer.double()
    assert_modes_agree(layer, 2, gen)
    layer.bfloat16()
    x = torch.randn(5, 40, generator=gen, dtype=torch.bfloat16)
    with torch.no_grad():
        assert torch.equal(layer(x), layer(x))
        no_grad = layer(x)
    assert no_grad.dtype == torch.bfloat16
    assert torch.equal(no_grad, layer(x).detach())


def test_outputs_follow_set_rank_and_prune(gen):
    layer = make("dynamic")
    for change in (lambda: layer.set_rank(5), lambda: layer.set_rank(13), layer.prune):
        change()
        assert_modes_agree(layer, 4, gen)
    assert layer.max_rank == 13


def test_outputs_follow_the_adaptive_switch(gen):
    torch.manual_seed(0)
    layer = AdaptiveLowRankLinear(40, 24, rank=9)
    x = torch.randn(3, 40, generator=gen)
    with torch.no_grad():
        dense = layer(x)
    layer.switch_to_lowrank()
    out = assert_modes_agree(layer, 3, gen)
    assert out.shape == dense.shape


@pytest.mark.parametrize("kind", KINDS)
def test_inference_leaves_no_state_behind(kind, gen):
    layer = make(kind)
    keys = set(layer.state_dict())
    buffers = dict(layer.named_buffers())
    attributes = set(vars(layer))
    with torch.no_grad():
        layer(torch.randn(1, 40, generator=gen))
        layer(torch.randn(FOLD_MIN_TOKENS, 40, generator=gen))
    assert set(layer.state_dict()) == keys
    assert dict(layer.named_buffers()) == buffers
    assert set(vars(layer)) == attributes


def test_both_regimes_agree(gen):
    """The folded, padded regime and the few-token one compute the same product."""
    U = torch.randn(24, 9, generator=gen)
    S = torch.rand(9, generator=gen) + 0.5
    V = torch.randn(40, 9, generator=gen)
    D = torch.rand(24, generator=gen) + 0.5
    b = torch.randn(24, generator=gen)
    x = torch.randn(FOLD_MIN_TOKENS, 40, generator=gen)
    folded = lowrank_linear(x, U, S, V, D, b)
    rowwise = torch.cat([lowrank_linear(x[i : i + 8], U, S, V, D, b) for i in range(0, 512, 8)])
    torch.testing.assert_close(folded, rowwise, rtol=1e-5, atol=1e-5)
    assert torch.equal(lowrank_linear(x[:0], U, S, V, D, b), torch.empty(0, 24))


def test_autocast_keeps_the_autocast_dtype(gen):
    layer = make("lowrank")
    x = torch.randn(2, 40, generator=gen)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        with_grad = layer(x)
        with torch.no_grad():
            no_grad = layer(x)
    assert with_grad.dtype == no_grad.dtype == torch.bfloat16
    assert torch.equal(no_grad, with_grad.detach())


@pytest.mark.parametrize("kind", KINDS)
def test_compiled_decoding_neither_breaks_nor_recompiles(kind, gen):
    """A decode loop (one token per call, new values each time) compiles once, whole."""
    layer = make(kind)
    model = nn.Sequential(layer, nn.GELU(), nn.Linear(24, 40))
    compiles = []

    def counting_backend(gm: torch.fx.GraphModule, example_inputs):
        compiles.append(gm)
        return gm.forward

    torch._dynamo.reset()
    with torch.no_grad():
        explanation = torch._dynamo.explain(model)(torch.randn(1, 40, generator=gen))
        assert explanation.graph_break_count == 0
        torch._dynamo.reset()
        compiled = torch.compile(model, backend=counting_backend)
        x = torch.randn(1, 40, generator=gen)
        for _ in range(5):
            out = compiled(x)
            torch.testing.assert_close(out, model(x), rtol=1e-5, atol=1e-6)
            x = out[:, :40].tanh()
    assert len(compiles) == 1


def test_compiled_inductor_matches_eager_in_both_regimes(gen):
    layer = make("lowrank")
    torch._dynamo.reset()
    compiled = torch.compile(layer)
    with torch.no_grad():
        for tokens in (1, FOLD_MIN_TOKENS):
            x = torch.randn(tokens, 40, generator=gen)
            torch.testing.assert_close(compiled(x), layer(x), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("kind", KINDS)
def test_inference_layout_keeps_outputs_names_and_training(kind, gen):
    layer = make(kind)
    model = nn.Sequential(layer, nn.Linear(24, 4))
    x = torch.randn(3, 40, generator=gen)
    with torch.no_grad():
        before = model(x)
    params = dict(model.named_parameters())
    assert inference_layout_(model) == 1
    assert layer.U.stride() == (1, 24) and layer.Vh.stride() == (40, 1)
    assert dict(model.named_parameters()) == params  # the same Parameter objects
    assert set(model.state_dict()) == set(params) | (
        {"0._extra_state"} if kind == "dynamic" else set()
    )
    with torch.no_grad():
        torch.testing.assert_close(model(x), before, rtol=1e-5, atol=1e-6)
    assert_modes_agree(layer, 2, gen)
    assert_modes_agree(layer, FOLD_MIN_TOKENS, gen)
    # training still works: the gradient follows the parameter's layout
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    model(torch.randn(16, 40, generator=gen)).square().mean().backward()
    assert layer.U.grad.stride() == layer.U.stride()
    opt.step()
    assert inference_layout_(model) == 0  # already laid out
    assert inference_layout_(model, enabled=False) == 1
    assert layer.U.is_contiguous() and layer.Vh.is_contiguous()


def test_inference_layout_survives_saving(tmp_path, gen):
    from lowrank_layers import load_lowrank, save_lowrank

    model = nn.Sequential(make("lowrank"))
    inference_layout_(model)
    save_lowrank(model, tmp_path / "m.safetensors")
    fresh = nn.Sequential(nn.Linear(40, 24))
    load_lowrank(fresh, tmp_path / "m.safetensors")
    for name, p in model.state_dict().items():
        assert torch.equal(fresh.state_dict()[name], p), name
    torch.save(model.state_dict(), tmp_path / "m.pt")
    loaded = torch.load(tmp_path / "m.pt")
    assert torch.equal(loaded["0.U"], model[0].U)


@pytest.mark.parametrize(
    ("args", "match"),
    [
        (("model",), r"model must be an nn\.Module, got str"),
        ((nn.Linear(2, 2), 1), r"enabled must be a bool, got 1"),
    ],
)
def test_inference_layout_rejects_bad_arguments(args, match):
    with pytest.raises(TypeError, match=match):
        inference_layout_(*args)


def test_inference_layout_in_half_precision_keeps_u_row_major(gen):
    layer = make("lowrank").bfloat16()
    assert inference_layout_(layer) == 0  # both factors are already in oneDNN's layout
    assert layer.Vh.is_contiguous() and layer.U.is_contiguous()
    layer.float()  # a cast keeps the strides; laying out again moves U for float32
    assert inference_layout_(layer) == 1 and layer.U.stride() == (1, 24)


@pytest.mark.parametrize("tokens", [1, FOLD_MIN_TOKENS])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_regimes_match_float32(dtype, tokens, gen):
    """Half precision hands F.linear a contiguous Vᵀ in the folded regime: same maths."""
    layer = make("lowrank")
    x = torch.randn(tokens, 40, generator=gen)
    with torch.no_grad():
        reference = layer(x)
        half = layer.to(dtype)(x.to(dtype)).float()
    # 8 (bfloat16) or 11 (float16) bits of mantissa, over sums of 40 and 9 terms
    assert float((half - reference).norm() / reference.norm()) < 0.02


@pytest.mark.parametrize("layout", [False, True])
def test_one_token_half_precision_paths_agree(layout, gen):
    """One bfloat16 token takes a matrix-vector product on V as stored, F.linear laid out."""
    layer = make("lowrank").bfloat16()
    if layout:
        inference_layout_(layer)
    x = torch.randn(1, 1, 40, generator=gen, dtype=torch.bfloat16)
    with torch.no_grad():
        out = layer(x)
        reference = nn.functional.linear(
            x.float(), layer.dense_weight().float(), layer.bias.float()
        )
    assert out.shape == (1, 1, 24)
    assert float((out.float() - reference).norm() / reference.norm()) < 0.02
    assert torch.equal(layer(x).detach(), out)  # autograd on: the same bits


# ------------------------------------------------------------------------------------------
# export: torch.jit.script, torch.onnx.export (legacy), torch.export
# ------------------------------------------------------------------------------------------


def make_export(kind: str) -> nn.Module:
    """``make(kind)``, and an AdaptiveLowRankLinear still in its dense phase."""
    if kind != "adaptive-dense":
        return make(kind)
    torch.manual_seed(0)
    return AdaptiveLowRankLinear(40, 24, rank=9)


def script(model: nn.Module) -> torch.jit.ScriptModule:
    with warnings.catch_warnings():  # torch 2.9+ deprecates TorchScript in favour of export
        warnings.simplefilter("ignore", DeprecationWarning)
        return torch.jit.script(model)


@pytest.mark.parametrize("kind", ["lowrank", "dynamic"])
@pytest.mark.parametrize("balance", [True, False])
@pytest.mark.parametrize("bias", [True, False])
def test_jit_script_matches_eager_in_both_regimes(kind, balance, bias, gen):
    """Scripted (and saved, and loaded) models compute what eager does, both regimes kept."""
    layer = make(kind, balance=balance, bias=bias)
    model = nn.Sequential(layer, nn.GELU(), nn.Linear(24, 8))
    buffer = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        torch.jit.save(script(model), buffer)
        buffer.seek(0)
        loaded = torch.jit.load(buffer)
    assert model[0] is layer  # scripting leaves the eager model alone
    assert getattr(loaded, "0").original_name == type(layer).__name__
    assert "factored_linear" in getattr(loaded, "0").code  # the layer's own forward, both regimes
    for tokens in (1, 7, FOLD_MIN_TOKENS):
        x = torch.randn(tokens, 40, generator=gen)
        expected = model(x)
        # the same aten ops in the same order: equal to float32 rounding of the last bit
        torch.testing.assert_close(loaded(x), expected, rtol=1e-6, atol=1e-6)
        with torch.no_grad():
            torch.testing.assert_close(loaded(x), expected.detach(), rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("kind", ["adaptive", "adaptive-dense"])
def test_jit_script_refuses_adaptive_layers_clearly(kind):
    model = nn.Sequential(make_export(kind))
    fix = "LowRankLinear.from_factors" if kind == "adaptive" else r"layer\.to_linear\(\)"
    with pytest.raises(RuntimeError, match=rf"does not support AdaptiveLowRankLinear.*{fix}"):
        script(model)


@pytest.mark.parametrize("kind", ["lowrank", "dynamic", "adaptive", "adaptive-dense"])
def test_traced_graph_has_no_mT_for_the_legacy_onnx_exporter(kind, gen):
    """The legacy ONNX exporter reads a jit.trace graph and has no aten::mT."""
    layer = make_export(kind)
    x = torch.randn(3, 40, generator=gen)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # TracerWarnings on the regime test
        graph = torch.jit.trace(layer, (x,), check_trace=False).inlined_graph
    kinds = {node.kind() for node in graph.nodes()}
    assert "aten::linear" in kinds and "aten::mT" not in kinds


@pytest.mark.parametrize("tokens", [3, FOLD_MIN_TOKENS])
@pytest.mark.parametrize("kind", ["lowrank", "adaptive", "adaptive-dense"])
def test_legacy_onnx_export_runs_in_onnxruntime(kind, tokens, gen):
    """Traced at either regime, the graph is valid for any token count (dynamic axis)."""
    pytest.importorskip("onnx")  # the legacy exporter serialises through it
    layer = make_export(kind)
    buffer = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(
            layer, (torch.randn(tokens, 40, generator=gen),), buffer, dynamo=False,
            input_names=["x"], dynamic_axes={"x": {0: "tokens"}},
        )  # fmt: skip
    ort = pytest.importorskip("onnxruntime")
    session = ort.InferenceSession(buffer.getvalue())
    for n in (1, 5, FOLD_MIN_TOKENS + 3):
        x = torch.randn(n, 40, generator=gen)
        (out,) = session.run(None, {"x": x.numpy()})
        with torch.no_grad():
            torch.testing.assert_close(torch.from_numpy(out), layer(x), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("regime", ["few", "fold"])
@pytest.mark.parametrize("kind", ["lowrank", "dynamic", "adaptive", "adaptive-dense"])
def test_torch_export_with_a_dynamic_token_count(kind, regime, gen):
    """The regime is a shape guard: a token range on one side of FOLD_MIN_TOKENS exports."""
    layer = make_export(kind)
    if regime == "few":
        tokens = torch.export.Dim("tokens", max=FOLD_MIN_TOKENS - 1)
        sizes = (1, 7, FOLD_MIN_TOKENS - 1)
    else:
        tokens = torch.export.Dim("tokens", min=FOLD_MIN_TOKENS, max=4 * FOLD_MIN_TOKENS)
        sizes = (FOLD_MIN_TOKENS, FOLD_MIN_TOKENS + 9)
    example = torch.randn(sizes[-1], 40, generator=gen)
    program = torch.export.export(layer, (example,), dynamic_shapes=({0: tokens},))
    exported = program.module()
    for n in sizes:
        x = torch.randn(n, 40, generator=gen)
        torch.testing.assert_close(exported(x), layer(x), rtol=1e-5, atol=1e-5)
