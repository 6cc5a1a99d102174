"""Shared test helpers: matrices with a known spectrum and the optimal truncation error,
small low-rank layers and models."""

import torch
from torch import nn

from lowrank_layers import AdaptiveLowRankLinear, DynamicLowRankLinear, LowRankLinear


def matrix_with_spectrum(
    s: torch.Tensor, m: int, n: int, gen: torch.Generator, dtype=torch.float64
) -> torch.Tensor:
    """An m x n matrix with singular values s (len(s) == min(m, n)) and random singular vectors."""
    k = s.numel()
    U, _ = torch.linalg.qr(torch.randn(m, k, generator=gen, dtype=torch.float64))
    V, _ = torch.linalg.qr(torch.randn(n, k, generator=gen, dtype=torch.float64))
    return ((U * s.to(torch.float64)) @ V.mT).to(dtype)


def eckart_young(s: torch.Tensor, r: int) -> float:
    """Optimal relative Frobenius error of a rank-r truncation for singular values s."""
    s = s.to(torch.float64)
    return float(s[r:].square().sum().sqrt() / s.square().sum().sqrt())


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    """||a - b||_F / ||b||_F in float64."""
    a, b = a.detach().to(torch.float64), b.detach().to(torch.float64)
    return float(torch.linalg.norm(a - b) / torch.linalg.norm(b))


def tiny_llama(
    *, layers: int = 2, vocab: int = 64, heads: int = 4, kv_heads: int = 2, seed: int = 0
):
    """A small transformers ``LlamaForCausalLM`` (hidden 32, MLP 64), in eval mode; skips the
    test without transformers."""
    import pytest

    transformers = pytest.importorskip("transformers")
    config = transformers.LlamaConfig(
        hidden_size=32, intermediate_size=64, num_hidden_layers=layers,
        num_attention_heads=heads, num_key_value_heads=kv_heads, vocab_size=vocab,
    )  # fmt: skip
    torch.manual_seed(seed)
    return transformers.LlamaForCausalLM(config).eval()


def tiny_bert(*, layers: int = 2, vocab: int = 100, seed: int = 0):
    """A small transformers ``BertModel`` (hidden 32, MLP 64, 2 heads), in eval mode."""
    import pytest

    transformers = pytest.importorskip("transformers")
    config = transformers.BertConfig(
        hidden_size=32, num_hidden_layers=layers, num_attention_heads=2, intermediate_size=64,
        vocab_size=vocab,
    )  # fmt: skip
    torch.manual_seed(seed)
    return transformers.BertModel(config).eval()


def perturbed_layer(
    kind: str, *, balance: bool = True, bias: bool = True, seed: int = 0
) -> nn.Module:
    """A 40 -> 24 low-rank layer of ``kind`` (``"lowrank"``, ``"dynamic"``: 11 of 16
    components active, ``"adaptive"``: switched at rank 9), every parameter perturbed so
    that ``S``, ``D`` and the bias matter (fresh ones are constants)."""
    torch.manual_seed(seed)
    if kind == "lowrank":
        layer = LowRankLinear(40, 24, 9, row_scales=balance, bias=bias)
    elif kind == "dynamic":
        layer = DynamicLowRankLinear(
            40, 24, max_rank=16, active_rank=11, row_scales=balance, bias=bias
        )
    else:
        layer = AdaptiveLowRankLinear(40, 24, rank=9, bias=bias)
        layer.switch_to_lowrank(balance="rownorm" if balance else "none")
    with torch.no_grad():
        for p in layer.parameters():
            p.add_(0.3 * torch.randn_like(p))
    return layer


def tiny_gpt2(seed: int = 0):
    """A small transformers ``GPT2LMHeadModel`` (its projections are ``Conv1D``), in eval
    mode; skips the test without transformers."""
    import pytest

    transformers = pytest.importorskip("transformers")
    config = transformers.GPT2Config(
        n_embd=32, n_layer=2, n_head=2, vocab_size=64, n_positions=32, bos_token_id=0,
        eos_token_id=0,
    )  # fmt: skip
    torch.manual_seed(seed)
    return transformers.GPT2LMHeadModel(config).eval()


def tiny_mixtral(seed: int = 0):
    """A small transformers ``MixtralForCausalLM`` (4 experts), in eval mode."""
    import pytest

    transformers = pytest.importorskip("transformers")
    config = transformers.MixtralConfig(
        hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
        num_key_value_heads=2, vocab_size=64, num_local_experts=4, num_experts_per_tok=2,
    )  # fmt: skip
    torch.manual_seed(seed)
    return transformers.MixtralForCausalLM(config).eval()


def tiny_bart(seed: int = 0):
    """A small transformers ``BartForConditionalGeneration``, in eval mode."""
    import pytest

    transformers = pytest.importorskip("transformers")
    config = transformers.BartConfig(
        d_model=32, encoder_layers=1, decoder_layers=1, encoder_attention_heads=2,
        decoder_attention_heads=2, encoder_ffn_dim=64, decoder_ffn_dim=64, vocab_size=64,
        max_position_embeddings=32,
    )  # fmt: skip
    torch.manual_seed(seed)
    return transformers.BartForConditionalGeneration(config).eval()


def tokens(gen: torch.Generator, shape=(2, 8), vocab: int = 64) -> torch.Tensor:
    """Random token ids in ``[1, vocab)``."""
    return torch.randint(1, vocab, shape, generator=gen)


def token_batches(n: int, gen: torch.Generator, length: int = 32) -> list[dict]:
    """``n`` batches of 4 random sequences of ``length`` token ids in ``[0, 64)``, with an
    all-ones ``attention_mask``."""
    out = []
    for _ in range(n):
        ids = torch.randint(0, 64, (4, length), generator=gen)
        out.append({"input_ids": ids, "attention_mask": torch.ones_like(ids)})
    return out


def saved(model: nn.Module, folder) -> str:
    """``model.save_pretrained(folder)``; the folder's path."""
    model.save_pretrained(folder)
    return str(folder)
