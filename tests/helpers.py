"""Shared test helpers: matrices with a known spectrum and the optimal truncation error."""

import torch


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
