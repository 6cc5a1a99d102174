"""The lazy ``weight`` of the low-rank layers (``lowrank_layers.lazy_weight``).

Every low-rank layer kind exposes ``weight`` as a :class:`FactoredWeight`: metadata reads
(transformers' T5 family, ``nn.TransformerEncoderLayer``'s fast-path test) cost nothing
and form nothing; computing with it (``nn.MultiheadAttention``, unknown code) gives the
dense layer's results and gradients on the factors, counted and warned about once.
"""

from __future__ import annotations

import warnings

import pytest
import torch
import torch._dynamo
import torch.nn.functional as F
from torch import nn

from lowrank_layers import AdaptiveLowRankLinear, DynamicLowRankLinear, LowRankLinear
from lowrank_layers.lazy_weight import DenseWeightWarning, FactoredWeight, dense_product
from lowrank_layers.readers import WeightRead, weight_reader_policy

from .helpers import rel_err

KINDS = ["lowrank", "dynamic", "adaptive"]
# full-rank factors reproduce the dense layer to float32 rounding through two products
FULL_RANK_TOL = 1e-4


def full_rank(linear: nn.Linear, kind: str) -> nn.Module:
    """``linear`` as a low-rank layer of the given kind at full rank (so outputs match)."""
    rank = min(linear.in_features, linear.out_features)
    if kind == "lowrank":
        return LowRankLinear.from_linear(linear, rank=rank)
    if kind == "dynamic":
        return DynamicLowRankLinear.from_linear(linear, rank=rank)
    layer = AdaptiveLowRankLinear.from_linear(linear, rank=rank)
    layer.switch_to_lowrank()
    return layer


def make(kind: str, *, seed: int = 0) -> nn.Module:
    """A truncated layer (24x40, rank 9; dynamic active rank 7 of 12) with nonzero D and bias."""
    torch.manual_seed(seed)
    if kind == "lowrank":
        layer: nn.Module = LowRankLinear(40, 24, 9, row_scales=True)
    elif kind == "dynamic":
        layer = DynamicLowRankLinear(40, 24, max_rank=12, active_rank=7, row_scales=True)
    else:
        layer = AdaptiveLowRankLinear(40, 24, rank=9)
        layer.switch_to_lowrank(balance="rownorm")
    with torch.no_grad():
        for p in layer.parameters():
            p.add_(0.3 * torch.randn_like(p))
    return layer


def convert_linears(model: nn.Module, kind: str, *, skip=lambda parent, name: False) -> int:
    """Replace every plain ``nn.Linear`` (except where ``skip``) by a full-rank layer."""
    count = 0
    for parent in list(model.modules()):
        for name, child in list(parent._modules.items()):
            plain = type(child) in (nn.Linear, nn.modules.linear.NonDynamicallyQuantizableLinear)
            if plain and not skip(parent, name):
                setattr(parent, name, full_rank(child, kind))
                count += 1
    return count


def reads(model: nn.Module) -> int:
    return sum(getattr(m, "dense_weight_reads", 0) for m in model.modules())


class Reader(nn.Module):
    """A parent the registry does not know, computing with its child's weight."""

    def __init__(self, proj: nn.Module) -> None:
        super().__init__()
        self.proj = proj

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.proj.weight, self.proj.bias)


# ------------------------------------------------------------------------------------------
# the lazy weight itself
# ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", KINDS)
def test_metadata_reads_form_nothing(kind):
    layer = make(kind)
    with warnings.catch_warnings():
        warnings.simplefilter("error", DenseWeightWarning)
        w = layer.weight
        assert isinstance(w, torch.Tensor) and isinstance(w, FactoredWeight)
        assert w.shape == (24, 40) and w.size() == (24, 40) and w.size(1) == 40
        assert w.dtype == torch.float32 and w.device.type == "cpu"
        assert w.dim() == w.ndim == 2 and len(w) == 24 and w.numel() == 960
        assert w.is_floating_point() and torch.is_floating_point(w)
        assert w.requires_grad and w.grad is None
        assert w.layer is layer
        assert "FactoredWeight(shape=(24, 40)" in repr(w) and type(layer).__name__ in f"{w}"
        # nn.TransformerEncoderLayer's fast-path test
        assert torch.overrides.has_torch_function((w,))
    assert layer.dense_weight_reads == 0


@pytest.mark.parametrize("kind", KINDS)
def test_requires_grad_follows_the_factors(kind):
    layer = make(kind).requires_grad_(False)
    assert not layer.weight.requires_grad


@pytest.mark.parametrize("kind", KINDS)
def test_weight_is_no_parameter_and_not_saved(kind):
    layer = make(kind)
    names = {n for n, _ in layer.named_parameters()}
    assert names == {"U", "S", "Vh", "D", "bias"}
    assert not any(k == "weight" for k in layer.state_dict())
    layer.load_state_dict(layer.state_dict())  # strict: nothing expected is missing
    with pytest.raises(KeyError, match="attribute 'weight' already exists"):
        layer.weight = nn.Parameter(torch.zeros(24, 40))


def test_adaptive_dense_phase_weight_is_its_parameter():
    layer = AdaptiveLowRankLinear(40, 24, rank=9)
    assert layer.weight is layer._parameters["weight"]
    assert isinstance(layer.weight, nn.Parameter)
    assert "weight" in dict(layer.named_parameters())
    layer.switch_to_lowrank()
    assert isinstance(layer.weight, FactoredWeight)
    # loading a dense state dict restores the Parameter
    layer.load_state_dict(nn.Linear(40, 24).state_dict())
    assert isinstance(layer.weight, nn.Parameter) and not layer.is_lowrank
    with pytest.raises(RuntimeError, match="still dense; call switch_to_lowrank"):
        layer.weight_factors()


@pytest.mark.parametrize("kind", KINDS)
def test_unknown_reader_gets_outputs_and_gradients_and_a_warning(kind, gen):
    layer = make(kind)
    reference = make(kind)  # the same parameters, called as a module
    model = Reader(layer)
    x = torch.randn(5, 40, generator=gen)
    with pytest.warns(DenseWeightWarning, match=rf"{type(layer).__name__} \(24x40") as record:
        out = model(x)
        model(x)
    assert sum(r.category is DenseWeightWarning for r in record) == 1  # once per layer
    assert layer.dense_weight_reads == 2
    expected = reference(x)
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)
    # the loss trains the factors through the formed weight, as calling the layer does
    out.square().sum().backward()
    expected.square().sum().backward()
    for name in ("U", "S", "Vh", "D", "bias"):
        got, want = getattr(layer, name).grad, getattr(reference, name).grad
        assert got is not None, name
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5, msg=name)


def test_dynamic_weight_follows_the_active_rank(gen):
    layer = make("dynamic")
    with pytest.warns(DenseWeightWarning):
        before = layer.weight @ torch.eye(40)
    torch.testing.assert_close(before, layer.dense_weight(), rtol=1e-5, atol=1e-6)
    layer.set_rank(3)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DenseWeightWarning)
        after = layer.weight.t() @ torch.eye(24)
    torch.testing.assert_close(after.t(), layer.dense_weight(), rtol=1e-5, atol=1e-6)
    assert rel_err(after.t(), before) > 1e-2  # the dropped components are gone
    assert layer.dense_weight_reads == 2


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float64])
def test_dense_product_matches_dense_weight(dtype, gen):
    layer = LowRankLinear(40, 24, 9, row_scales=True, dtype=dtype)
    with torch.no_grad():
        layer.D.uniform_(0.5, 1.5, generator=gen)
    dense = dense_product(*layer.weight_factors())
    assert dense.dtype == dtype and dense.requires_grad
    torch.testing.assert_close(dense.detach(), layer.dense_weight(), rtol=0, atol=0)


@pytest.mark.parametrize(
    ("write", "match"),
    [
        (lambda w: nn.init.normal_(w), "normal_ would write into the weight"),
        (lambda w: w.add_(1.0), "add_ would write"),
        (lambda w: w.__setitem__(0, 1.0), "__setitem__ would write"),
        (lambda w: torch.add(torch.ones(24, 40), 1.0, out=w), "add would write"),
        (lambda w: setattr(w, "data", torch.zeros(24, 40)), r"Tensor.data \(set\) would write"),
    ],
)
@pytest.mark.parametrize("kind", KINDS)
def test_writes_into_the_weight_raise(kind, write, match):
    layer = make(kind)
    before = {n: p.detach().clone() for n, p in layer.named_parameters()}
    with pytest.raises(RuntimeError, match=match):
        write(layer.weight)
    for n, p in layer.named_parameters():
        assert torch.equal(p, before[n]), n
    assert layer.dense_weight_reads == 0


def test_reading_the_weight_never_changes_the_forward(gen):
    """The layer's own forward does not read ``weight``: nothing is formed or counted."""
    layer = make("lowrank")
    x = torch.randn(600, 40, generator=gen)  # the folded regime
    layer(x).sum().backward()
    layer(x[:3])
    assert layer.dense_weight_reads == 0


# ------------------------------------------------------------------------------------------
# transformers' T5 family: the weight is never formed
# ------------------------------------------------------------------------------------------


def tiny_t5(proj: str):
    transformers = pytest.importorskip("transformers")
    config = transformers.T5Config(
        d_model=32, d_ff=64, num_layers=1, num_heads=2, d_kv=16, vocab_size=100,
        feed_forward_proj=proj, dropout_rate=0.0,
    )  # fmt: skip
    torch.manual_seed(0)
    return transformers.T5Model(config)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("proj", ["relu", "gated-gelu"])
@pytest.mark.parametrize("training", [True, False])
def test_t5_runs_converted_in_train_and_eval(kind, proj, training, gen):
    model = tiny_t5(proj).train(training)
    ids = torch.randint(0, 100, (2, 7), generator=gen)
    expected = model(input_ids=ids, decoder_input_ids=ids).last_hidden_state
    ff = model.encoder.block[0].layer[-1].DenseReluDense
    read = weight_reader_policy(ff, "wo")
    assert read is not None and read.policy == "metadata" and read.source == "source"
    assert "served lazily" in read.reason
    assert convert_linears(model, kind) > 0
    assert isinstance(ff.wo, (LowRankLinear, DynamicLowRankLinear, AdaptiveLowRankLinear))
    model.train(training)
    with warnings.catch_warnings():
        warnings.simplefilter("error", DenseWeightWarning)
        out = model(input_ids=ids, decoder_input_ids=ids).last_hidden_state
        if training:
            out.sum().backward()
            assert ff.wo.U.grad is not None and ff.wo.U.grad.abs().sum() > 0
    assert rel_err(out, expected) < FULL_RANK_TOL
    assert reads(model) == 0


def test_t5_dense_block_compiles_whole_without_forming_the_weight(gen):
    """Under torch.compile the weight is the traced product; metadata-only use drops it.

    Dynamo's own graph still holds the unused product (its ``backend="eager"`` would run
    it); AOTAutograd, and so inductor, removes it as dead code: no ``(32, 64)`` matrix
    product is left in the compiled forward, only the ones over the 10 tokens.
    """
    from functorch.compile import make_boxed_func
    from torch._dynamo.backends.common import aot_autograd

    ff = tiny_t5("gated-gelu").encoder.block[0].layer[-1].DenseReluDense.eval()
    x = torch.randn(2, 5, 32, generator=gen)
    expected = ff(x)
    convert_linears(ff, "lowrank")
    products = []

    def forward_compiler(gm: torch.fx.GraphModule, example_inputs):
        for node in gm.graph.nodes:
            if node.op == "call_function" and "mm" in str(node.target):
                products.append(tuple(node.meta["val"].shape))
        return make_boxed_func(gm.forward)

    torch._dynamo.reset()
    with torch.no_grad():
        assert torch._dynamo.explain(ff)(x).graph_break_count == 0
        torch._dynamo.reset()
        out = torch.compile(ff, backend=aot_autograd(fw_compiler=forward_compiler))(x)
    assert rel_err(out, expected) < FULL_RANK_TOL
    assert len(products) == 6 and all(shape[0] == 10 for shape in products), products
    assert ff.wo.dense_weight_reads == 0


def test_compiled_reader_computes_with_the_product(gen):
    layer = make("lowrank")
    model = Reader(layer)
    x = torch.randn(5, 40, generator=gen)
    torch._dynamo.reset()
    out = torch.compile(model, backend="eager")(x)
    torch.testing.assert_close(out, layer(x), rtol=1e-5, atol=1e-5)
    out.sum().backward()
    assert layer.U.grad is not None and layer.U.grad.abs().sum() > 0


# ------------------------------------------------------------------------------------------
# torch's own Transformer and MultiheadAttention
# ------------------------------------------------------------------------------------------


def keep_registered(parent: nn.Module, name: str) -> bool:
    """What convert_model does: children whose parent computes with their weight stay dense."""
    read = weight_reader_policy(parent, name)
    return read is not None and read.policy == "skip"


@pytest.fixture
def count_fast_path(monkeypatch):
    """Counts calls of nn.TransformerEncoderLayer's fused eval kernel."""
    calls = []
    original = torch._transformer_encoder_layer_fwd

    def counting(*args, **kwargs):
        calls.append(1)
        return original(*args, **kwargs)

    monkeypatch.setattr(torch, "_transformer_encoder_layer_fwd", counting)
    return calls


@pytest.mark.filterwarnings("ignore:The PyTorch API of nested tensors:UserWarning")
@pytest.mark.parametrize("kind", KINDS)
def test_transformer_encoder_eval_bypasses_the_fast_path(kind, count_fast_path, gen):
    torch.manual_seed(0)
    layer = nn.TransformerEncoderLayer(32, 2, 64, dropout=0.0, batch_first=True)
    encoder = nn.TransformerEncoder(layer, 2).eval()  # nested tensors when it can
    x = torch.randn(3, 6, 32, generator=gen)
    mask = torch.zeros(3, 6, dtype=torch.bool)
    mask[0, 4:] = True
    with torch.no_grad():
        expected = encoder(x, src_key_padding_mask=mask)
        assert len(count_fast_path) == 2  # the dense model takes the fused path
        read = weight_reader_policy(encoder.layers[0], "linear1")
        assert read == WeightRead("metadata", read.reason, "registry")
        assert "fast path" in read.reason
        assert convert_linears(encoder, kind, skip=keep_registered) == 4  # linear1, linear2
        count_fast_path.clear()
        with warnings.catch_warnings():
            warnings.simplefilter("error", DenseWeightWarning)
            out = encoder(x, src_key_padding_mask=mask)
    assert count_fast_path == []  # bypassed: the standard path calls the layers
    assert reads(encoder) == 0
    keep = ~mask[..., None]
    torch.testing.assert_close(out * keep, expected * keep, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("training", [True, False])
def test_nn_transformer_runs_converted(kind, training, gen):
    torch.manual_seed(0)
    model = nn.Transformer(
        d_model=32, nhead=2, num_encoder_layers=1, num_decoder_layers=1,
        dim_feedforward=64, dropout=0.0, batch_first=True,
    ).train(training)  # fmt: skip
    src = torch.randn(2, 6, 32, generator=gen)
    tgt = torch.randn(2, 5, 32, generator=gen)
    with torch.set_grad_enabled(training):
        expected = model(src, tgt)
        convert_linears(model, kind, skip=keep_registered)
        kept = [m for m in model.modules() if type(m).__name__ == "NonDynamicallyQuantizableLinear"]
        assert len(kept) == 3  # the three out_proj stay dense (registry: skip)
        with warnings.catch_warnings():
            warnings.simplefilter("error", DenseWeightWarning)
            out = model(src, tgt)
            if training:
                out.sum().backward()
    assert reads(model) == 0
    assert rel_err(out, expected) < FULL_RANK_TOL


@pytest.mark.parametrize("kind", KINDS)
def test_converted_out_proj_of_multihead_attention_is_correct(kind, gen):
    """Forced past the registry, MHA computes with the formed weight: correct, warned."""
    torch.manual_seed(0)
    mha = nn.MultiheadAttention(32, 2, batch_first=True)
    assert weight_reader_policy(mha, "out_proj") == WeightRead(
        "skip", "parent MultiheadAttention reads .weight directly", "registry"
    )
    x = torch.randn(2, 6, 32, generator=gen)
    expected = mha(x, x, x, need_weights=False)[0]
    mha.out_proj = full_rank(mha.out_proj, kind)
    with pytest.warns(DenseWeightWarning, match="multi_head_attention_forward"):
        out = mha(x, x, x, need_weights=False)[0]
    assert mha.out_proj.dense_weight_reads == 1
    assert rel_err(out, expected) < FULL_RANK_TOL
    out.sum().backward()
    assert mha.out_proj.U.grad is not None and mha.out_proj.U.grad.abs().sum() > 0
