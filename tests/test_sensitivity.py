"""The gradient pass (sensitivity.py): each layer's E[x xᵀ] and E[g gᵀ] against a direct
autograd computation, micro-batches against whole batches, the input moments shared by
layers fed one tensor, what the autograd graph holds, and the errors."""

import copy

import pytest
import torch
from torch import nn

from lowrank_layers.calibrate import collect_input_stats
from lowrank_layers.sensitivity import (
    _panels,
    _TriangleSums,
    collect_sensitivity,
    collect_sensitivity_blockwise,
)

from .helpers import tiny_llama

# The pass sums float32 Gram matrices; the references below sum in float64. Over at most a
# few hundred rows of O(1) values, float32 GEMMs agree with them to ~1e-6 relative.
RTOL = 1e-4


def close(a: torch.Tensor, b: torch.Tensor, rtol: float = RTOL) -> bool:
    """Equal up to ``rtol`` of the larger matrix's largest entry (entries near zero
    included)."""
    scale = float(b.abs().max())
    return torch.allclose(a.double(), b.double(), rtol=0, atol=rtol * scale)


class Tiny(nn.Module):
    """Two layers and a head; the second's output is scaled up."""

    def __init__(self, out_features: int = 10) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.a = nn.Linear(16, 16)
        self.b = nn.Linear(16, 16)
        self.out = nn.Linear(16, out_features)

    def forward(self, x: torch.Tensor, attention_mask: torch.Tensor | None = None, scale=1.0):
        h = self.a(x) + x
        h = 30.0 * self.b(torch.tanh(h)) * scale + h
        return self.out(h)


def reference_moments(model, batch, names, objective, seed, grad_tokens):
    """E[x xᵀ] and E[g gᵀ] the direct way: the whole batch in one pass, every layer output
    kept, the probe loss built with autograd and differentiated for all outputs at once
    (float64 sums). The draws follow collect_sensitivity's order on the seeded generator:
    the token subset (only when some tokens are left out), then the probe's noise for the
    whole batch (uniform per token for "kl", normal per output entry for "mse")."""
    model = copy.deepcopy(model)
    inputs, outputs = {}, {}
    modules = dict(model.named_modules())

    def keep_for(name):
        def hook(module, args, out):
            inputs[name], outputs[name] = args[0], out

        return hook

    hooks = [modules[n].register_forward_hook(keep_for(n)) for n in names]
    gen = torch.Generator().manual_seed(seed)
    mask = batch.get("attention_mask") if isinstance(batch, dict) else None
    with torch.enable_grad():
        out = model(**batch) if isinstance(batch, dict) else model(batch)
    for h in hooks:
        h.remove()
    y = out.logits if hasattr(out, "logits") else out
    keep = torch.ones(y.shape[:-1]) if mask is None else mask.float()
    n = int(keep.sum())
    pick = torch.arange(n)
    if n > grad_tokens:
        pick = torch.randperm(n, generator=gen)[:grad_tokens].sort().values
    if objective == "mse":
        loss = (y * torch.randn(y.shape, generator=gen) * keep[..., None]).sum()
    else:
        u = torch.rand(y.shape[:-1], generator=gen)
        cdf = torch.softmax(y.detach(), -1).cumsum(-1)  # float32, as the pass samples
        target = torch.searchsorted(cdf, (u * cdf[..., -1])[..., None])
        target = target.clamp_max(y.shape[-1] - 1)
        nll = -torch.log_softmax(y, -1).gather(-1, target)[..., 0]
        loss = (nll * keep).sum()
    grads = torch.autograd.grad(loss, [outputs[n] for n in names])
    sel = keep.bool()
    result = {}
    for name, g in zip(names, grads, strict=True):
        x = inputs[name].detach()[sel].double()
        g = g[sel][pick].double()
        result[name] = (x.mT @ x / x.shape[0], g.mT @ g / g.shape[0], x.shape[0])
    return result


def padded_llama_batch(gen: torch.Generator, vocab: int = 64) -> dict:
    ids = torch.randint(0, vocab, (5, 12), generator=gen)
    mask = torch.ones_like(ids)
    mask[1, 9:] = 0
    mask[3, 4:] = 0  # right padding, as text_batches makes for SmolLM2
    return {"input_ids": ids, "attention_mask": mask}


@pytest.mark.parametrize("micro", [None, 12, 30])
@pytest.mark.parametrize("grad_tokens", [1000, 17])
def test_kl_moments_equal_a_direct_autograd_computation(gen, micro, grad_tokens):
    """The hooked, micro-batched pass gives the moments of differentiating the probe loss
    for every output at once: 5 sequences of 12 tokens with padding, one, two or five
    sequences a micro-batch, every token or a subset of 17 in E[g gᵀ]."""
    model = tiny_llama(layers=2, vocab=64)
    batch = padded_llama_batch(gen)
    names = ["model.layers.0.self_attn.q_proj", "model.layers.1.mlp.down_proj", "lm_head"]
    ref = reference_moments(model, batch, names, "kl", seed=3, grad_tokens=grad_tokens)
    sens = collect_sensitivity(model, [batch], seed=3, grad_tokens=grad_tokens,
                               micro_batch_tokens=micro, project=False)  # fmt: skip
    for name in names:
        C, G, tokens = ref[name]
        assert sens[name].tokens == tokens == 49
        assert float(G.diagonal().sum()) > 0
        assert not sens[name].projected
        assert close(sens[name].input_cov, C) and close(sens[name].grad_cov, G), name
    assert_projected_moments(model, [batch], names, ref, seed=3, grad_tokens=grad_tokens,
                             micro_batch_tokens=micro)  # fmt: skip


def assert_projected_moments(model, data, names, ref, **options):
    """With the default ``project=True``: the layers with more outputs than inputs (and only
    they) store ``Wᵀ E[g gᵀ] W``, equal to the reference's; ``weight_grad_cov`` gives it
    for every layer."""
    projected = collect_sensitivity(model, data, **options)
    modules = dict(model.named_modules())
    assert any(modules[n].out_features > modules[n].in_features for n in names)
    for name in names:
        C, G, _ = ref[name]
        W = modules[name].weight.detach().double()
        s = projected[name]
        assert s.projected == (W.shape[0] > W.shape[1]), name
        assert s.grad_cov.shape == (min(W.shape),) * 2
        assert close(s.input_cov, C) and close(s.weight_grad_cov(W), W.mT @ G @ W), name


def test_mse_moments_equal_a_direct_autograd_computation(gen):
    model = Tiny()
    x = torch.randn(6, 5, 16, generator=gen)
    names = ["a", "b", "out"]
    ref = reference_moments(model, x, names, "mse", seed=0, grad_tokens=512)
    sens = collect_sensitivity(model, [x], objective="mse", micro_batch_tokens=10, project=False)
    for name in names:
        C, G, tokens = ref[name]
        assert sens[name].tokens == tokens == 30
        assert close(sens[name].input_cov, C) and close(sens[name].grad_cov, G), name
    wide = Tiny(out_features=40)  # its head has more outputs than inputs: projected
    ref = reference_moments(wide, x, names, "mse", seed=0, grad_tokens=512)
    assert_projected_moments(wide, [x], names, ref, objective="mse", micro_batch_tokens=10)


@pytest.mark.parametrize("grad_tokens", [10_000, 40])
def test_micro_batches_give_the_whole_batch_moments(gen, grad_tokens):
    """A dict batch (a non-tensor entry and a tensor of another first dimension passed to
    every part) and a plain tensor, in parts of one, two (the last part shorter) and all
    sequences: the same moments to float32 rounding, with every token or a subset."""
    llama = tiny_llama(layers=2, vocab=64)
    batch = padded_llama_batch(gen)
    batch["output_attentions"] = False
    model = Tiny()
    x = torch.randn(5, 8, 16, generator=gen)
    plain = {"x": x, "scale": torch.tensor([0.5])}
    for net, data, objective in [(llama, batch, "kl"), (model, x, "mse"), (model, plain, "mse")]:
        whole = collect_sensitivity(net, [data, data], objective=objective,
                                    grad_tokens=grad_tokens, micro_batch_tokens=None)  # fmt: skip
        for micro in (1, 24):
            parts = collect_sensitivity(
                net, [data, data], objective=objective, grad_tokens=grad_tokens,
                micro_batch_tokens=micro,
            )  # fmt: skip
            assert parts.keys() == whole.keys()
            for name, s in whole.items():
                assert parts[name].tokens == s.tokens
                assert close(parts[name].input_cov, s.input_cov, rtol=1e-5)
                assert close(parts[name].grad_cov, s.grad_cov, rtol=1e-5), (name, micro)


def test_collect_sensitivity_shapes_modes_and_mask(gen):
    model = Tiny().train()
    model.a.weight.requires_grad_(False)
    model.b.bias.grad = torch.ones(16)  # a caller's gradient stays as it is
    x = torch.randn(4, 8, 16, generator=gen)
    sens = collect_sensitivity(model, [x], objective="mse")
    assert set(sens) == {"a", "b", "out"}
    assert sens["a"].input_cov.shape == (16, 16) and sens["a"].grad_cov.shape == (16, 16)
    assert sens["a"].tokens == 32
    assert model.training and not model.a.weight.requires_grad  # restored
    assert all(p.requires_grad for n, p in model.named_parameters() if n != "a.weight")
    assert torch.equal(model.b.bias.grad, torch.ones(16))
    assert all(p.grad is None for n, p in model.named_parameters() if n != "b.bias")
    # padded tokens do not count
    padded = torch.cat([x, torch.randn(4, 3, 16, generator=gen)], dim=1)
    mask = torch.cat([torch.ones(4, 8), torch.zeros(4, 3)], dim=1)
    sens_m = collect_sensitivity(model, [{"x": padded, "attention_mask": mask}], objective="mse")
    assert sens_m["a"].tokens == 32
    assert torch.allclose(sens_m["a"].input_cov, sens["a"].input_cov, rtol=1e-5, atol=1e-6)


class Shared(nn.Module):
    """q and k read one tensor; with ``split``, k reads a copy of it (another tensor);
    with ``twice``, q is called twice on it."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.q, self.k, self.o = nn.Linear(8, 8), nn.Linear(8, 8), nn.Linear(8, 4)

    def forward(self, x: torch.Tensor, split: bool = False, twice: bool = False):
        q = self.q(x) + (self.q(x) if twice else 0)
        return self.o(q * self.k(x.clone() if split else x))


def test_layers_fed_one_tensor_share_one_input_moment(gen):
    """q and k share one input: one E[x xᵀ] tensor for both, equal to collect_input_stats's
    per layer over several batches (a shared accumulator once counted a batch once per
    layer reading it)."""
    model = Shared()
    data = [torch.randn(16, 8, generator=gen) for _ in range(3)]
    sens = collect_sensitivity(model, data, objective="mse", micro_batch_tokens=5)
    stats = collect_input_stats(model, data)
    assert sens["q"].input_cov is sens["k"].input_cov
    assert sens["o"].input_cov is not sens["q"].input_cov
    for name in ("q", "k", "o"):
        assert sens[name].tokens == 48
        assert close(sens[name].input_cov, stats[name].covariance, rtol=1e-6)


def test_layers_grouped_differently_across_batches_get_their_own_moments(gen):
    """k shares q's input in one batch, not in the next; q is called twice in a third:
    each layer still gets the mean over every input it read, as collect_input_stats."""
    model = Shared()
    x = [torch.randn(16, 8, generator=gen) for _ in range(3)]
    data = [{"x": x[0]}, {"x": x[1], "split": True}, {"x": x[2], "twice": True}]
    sens = collect_sensitivity(model, data, objective="mse")
    stats = collect_input_stats(model, data)
    assert sens["q"].tokens == 64 and sens["k"].tokens == 48
    assert sens["q"].input_cov is not sens["k"].input_cov
    for name in ("q", "k", "o"):
        assert sens[name].tokens == stats[name].tokens
        assert close(sens[name].input_cov, stats[name].covariance, rtol=1e-6)


def test_the_graph_holds_one_micro_batch_and_no_layer_input(gen):
    """What autograd saves during a forward: for Linear layers alone, only the weights (no
    input is kept for a weight gradient); with a nonlinearity, its input for one micro-batch
    of 8 tokens, not the whole batch of 64."""
    deep = nn.Sequential(*[nn.Linear(16, 16) for _ in range(4)])
    mixed = nn.Sequential(nn.Linear(16, 16), nn.Tanh(), nn.Linear(16, 16))
    x = torch.randn(8, 8, 16, generator=gen)
    for model, most in [(deep, 0), (mixed, 8 * 16)]:
        weights = {p.untyped_storage().data_ptr() for p in model.parameters()}
        saved: list[int] = [0]
        peak: list[int] = [0]

        def pack(t, saved=saved, peak=peak, weights=weights):
            if t.untyped_storage().data_ptr() not in weights:
                saved[0] += t.numel()
                peak[0] = max(peak[0], saved[0])
            return t

        def reset(*_, saved=saved):
            saved[0] = 0

        handle = model.register_forward_pre_hook(reset)
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            sens = collect_sensitivity(model, [x], objective="mse", micro_batch_tokens=8)
        handle.remove()
        assert len(sens) == len([m for m in model if isinstance(m, nn.Linear)])
        assert peak[0] == most


def test_kl_probe_on_a_causal_lm(gen):
    model = tiny_llama(layers=2, vocab=64)
    ids = torch.randint(0, 64, (2, 12), generator=gen)
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    state = copy.deepcopy(model.state_dict())
    a = collect_sensitivity(model, [batch], seed=1)
    b = collect_sensitivity(model, [batch], seed=1)
    assert len(a) == 15  # 7 projections x 2 layers + lm_head
    assert all(torch.equal(a[n].grad_cov, b[n].grad_cov) for n in a)  # seeded
    assert all(torch.equal(state[k], v) for k, v in model.state_dict().items())
    assert float(a["model.layers.0.mlp.down_proj"].grad_cov.diagonal().sum()) > 0


def test_collect_sensitivity_errors(gen):
    model = Tiny()
    x = torch.randn(2, 4, 16, generator=gen)
    with pytest.raises(ValueError, match=r"objective must be one of 'auto', 'kl', 'mse'"):
        collect_sensitivity(model, [x], objective="l2")
    with pytest.raises(ValueError, match=r"batches is empty"):
        collect_sensitivity(model, [])
    with pytest.raises(ValueError, match=r"no module to observe"):
        collect_sensitivity(model, [x], {})
    with pytest.raises(ValueError, match=r"micro_batch_tokens must be a positive int or None"):
        collect_sensitivity(model, [x], micro_batch_tokens=0)
    with pytest.raises(ValueError, match=r"grad_tokens must be a positive int, got 0"):
        collect_sensitivity(model, [x], grad_tokens=0)
    empty = {"x": x, "attention_mask": torch.zeros(2, 4)}
    with pytest.raises(ValueError, match=r"no token reached the layers"):
        collect_sensitivity(model, [empty], objective="mse")


@pytest.mark.parametrize("n", [5, 64, 200, 577])
def test_triangle_sums_give_the_full_gram_mean(gen, n):
    """The upper-triangle panels (one for small matrices, up to eight of uneven height)
    summed over batches of rows: the mean is the full ``XᵀX / N``, exactly symmetric, and
    the panels hold about half of it."""
    sums = _TriangleSums()
    parts = [torch.randn(rows, n, generator=gen) for rows in (7, 1, 30)]
    for x in parts:
        sums.add("k", x)
    sums.add("k", torch.empty(0, n))  # no rows: nothing changes
    stored = sum(p.numel() for p in sums.sums["k"])
    assert stored <= (0.5 + 1 / (2 * len(_panels(n)) - 2)) * n * n + n
    X = torch.cat(parts).double()
    mean = sums.mean("k")
    assert mean.shape == (n, n) and torch.equal(mean, mean.mT)
    assert close(mean, X.mT @ X / X.shape[0], rtol=1e-5)
    assert "k" not in sums.sums and sums.tokens["k"] == 38


def _llama_batches(gen: torch.Generator) -> list[dict]:
    batches = []
    for _ in range(3):
        ids = torch.randint(0, 64, (3, 40), generator=gen)
        batches.append({"input_ids": ids, "attention_mask": torch.ones_like(ids)})
    batches[1]["attention_mask"][0, 30:] = 0  # padding stays out
    return batches


@pytest.mark.parametrize("objective", ["kl", "mse"])
@pytest.mark.parametrize("stash", [False, True])
def test_blockwise_moments_equal_the_whole_model_pass(gen, tmp_path, objective, stash):
    """The block-by-block pass draws the same token subset and probes and sums the same
    products: its moments are the whole-model pass's, to float32 rounding (1e-5)."""
    model = tiny_llama(layers=3)
    batches = _llama_batches(gen)
    modules = {n: m for n, m in model.named_modules() if isinstance(m, nn.Linear)
               and n.startswith("model.layers.")}  # fmt: skip
    options = {"objective": objective, "grad_tokens": 70, "micro_batch_tokens": 80, "seed": 3}
    whole = collect_sensitivity(model, batches, modules, **options)
    blocks = list(model.model.layers)
    seen = []
    found = collect_sensitivity_blockwise(
        model, "model.layers", blocks, batches, modules, **options,
        block_scope=lambda i: _recording(seen, i), stash=tmp_path if stash else None,
    )  # fmt: skip
    assert set(found) == set(whole) == set(modules)
    for name, s in whole.items():
        b = found[name]
        assert b.tokens == s.tokens and b.projected == s.projected
        for field in ("input_cov", "grad_cov"):
            x, y = getattr(s, field), getattr(b, field)
            assert float((x - y).norm() / x.norm()) < 1e-5, (name, field)
    # each block's work inside its scope: forward in order, then backward from the last
    assert seen == [0, 1, 2, 2, 1, 0]
    assert list(tmp_path.iterdir()) == []  # the stashed hidden states are removed once read
    assert all(p.requires_grad for p in model.parameters())  # flags restored


def _recording(seen: list[int], i: int):
    import contextlib

    seen.append(i)
    return contextlib.nullcontext()


def test_blockwise_hands_each_block_its_moments_and_keeps_none(gen):
    model = tiny_llama(layers=2)
    batches = _llama_batches(gen)
    modules = {n: m for n, m in model.named_modules() if isinstance(m, nn.Linear)
               and n.startswith("model.layers.")}  # fmt: skip
    got: dict[int, list[str]] = {}
    result = collect_sensitivity_blockwise(
        model, "model.layers", list(model.model.layers), batches, modules,
        on_block=lambda i, s: got.setdefault(i, sorted(s)),
    )  # fmt: skip
    assert result == {}
    assert list(got) == [1, 0]  # the last block first
    assert got[0] == sorted(n for n in modules if n.startswith("model.layers.0."))


def test_blockwise_errors(gen):
    model = tiny_llama(layers=2)
    batches = _llama_batches(gen)
    blocks = list(model.model.layers)
    inside = {"model.layers.0.mlp.down_proj": model.model.layers[0].mlp.down_proj}
    with pytest.raises(ValueError, match=r"lm_head are not inside the blocks of model\.layers"):
        collect_sensitivity_blockwise(model, "model.layers", blocks, batches,
                                      {"lm_head": model.lm_head})  # fmt: skip
    with pytest.raises(ValueError, match="no module to observe"):
        collect_sensitivity_blockwise(model, "model.layers", blocks, batches, {})
    with pytest.raises(ValueError, match="batches is empty"):
        collect_sensitivity_blockwise(model, "model.layers", blocks, [], inside)
    with pytest.raises(ValueError, match="objective must be one of"):
        collect_sensitivity_blockwise(model, "model.layers", blocks, batches, inside,
                                      objective="nll")  # fmt: skip

    class Skip(nn.Module):  # the head reads the first block's output beside the last one's
        def __init__(self) -> None:
            super().__init__()
            self.layers = nn.ModuleList(
                [nn.Sequential(nn.Linear(8, 8), nn.Tanh()) for _ in range(3)]
            )
            self.head = nn.Linear(8, 4)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            first = h = self.layers[0](x)
            for block in self.layers[1:]:
                h = block(h)
            return self.head(h + first)

    net = Skip()
    data = [torch.randn(4, 8, generator=gen) for _ in range(2)]
    with pytest.raises(ValueError, match="not a function of its last block's output alone"):
        collect_sensitivity_blockwise(net, "layers", list(net.layers), data,
                                      {"layers.2.0": net.layers[2][0]})  # fmt: skip
