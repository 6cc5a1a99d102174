"""randomized_svd against torch.linalg.svd and torch.svd_lowrank.

For each size n in {2048, 4096} and rank r = n/10, on a matrix with the slowly decaying
spectrum sigma_i = i^-0.5 (the hard case for range finders) and on a Gaussian matrix:
median wall-clock time over repeats, measured side by side in one run, and the relative
Frobenius error as a multiple of the Eckart-Young optimum. torch.svd_lowrank runs with
q = r + 10 and niter = 2, the same sketch size and power iterations as randomized_svd's
defaults.

    python benchmarks/bench_svd.py [--sizes 2048 4096] [--repeats 5] [--threads 2]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import machine_description, markdown_table, median_time

from lowrank_layers.factorize import randomized_svd


def test_matrix(kind: str, n: int, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    if kind == "gaussian":
        A = torch.randn(n, n, generator=gen)
        return A, torch.linalg.svdvals(A.double())
    s = torch.arange(1, n + 1, dtype=torch.float64) ** -0.5
    U, _ = torch.linalg.qr(torch.randn(n, n, generator=gen, dtype=torch.float64))
    V, _ = torch.linalg.qr(torch.randn(n, n, generator=gen, dtype=torch.float64))
    return ((U * s) @ V.mT).float(), s


def rel_error(A: torch.Tensor, U: torch.Tensor, S: torch.Tensor, Vh: torch.Tensor) -> float:
    A64 = A.double()
    return float(torch.linalg.norm(A64 - (U.double() * S.double()) @ Vh.double()) / A64.norm())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[2048, 4096])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--full-svd-repeats", type=int, default=1)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    rows = []
    for n in args.sizes:
        for kind in ("sqrt-decay", "gaussian"):
            gen = torch.Generator().manual_seed(0)
            A, s = test_matrix(kind, n, gen)
            r = n // 10
            opt = float(s[r:].square().sum().sqrt() / s.square().sum().sqrt())

            def ours(sketch: str, A=A, r=r) -> tuple:
                g = torch.Generator().manual_seed(1)
                return randomized_svd(A, r, sketch=sketch, generator=g)

            def lowrank(A=A, r=r) -> tuple:
                U, S, V = torch.svd_lowrank(A, q=r + 10, niter=2)
                return U[:, :r], S[:r], V[:, :r].mT

            def full(A=A) -> tuple:
                return torch.linalg.svd(A, full_matrices=False)

            t_full = median_time(full, args.full_svd_repeats, warmup=0)
            U, S, Vh = full()
            err_full = rel_error(A, U[:, :r], S[:r], Vh[:r])
            results = {}
            # interleave repeats of the three randomized methods so drift hits each alike
            for _ in range(args.repeats):
                for name, fn in (
                    ("svd_lowrank", lowrank),
                    ("ours-gaussian", lambda: ours("gaussian")),
                    ("ours-sparse", lambda: ours("sparse")),
                ):
                    results.setdefault(name, []).append(median_time(fn, 1, warmup=0))
            t_low = sorted(results["svd_lowrank"])[args.repeats // 2]
            err_low = rel_error(A, *lowrank())
            rows.append(
                (n, kind, r, "torch.linalg.svd", f"{t_full:.3f}", "-", f"{err_full / opt:.4f}")
            )
            rows.append(
                (n, kind, r, "torch.svd_lowrank", f"{t_low:.4f}", "1.00", f"{err_low / opt:.4f}")
            )
            for sketch in ("gaussian", "sparse"):
                t = sorted(results[f"ours-{sketch}"])[args.repeats // 2]
                err = rel_error(A, *ours(sketch))
                rows.append(
                    (
                        n,
                        kind,
                        r,
                        f"randomized_svd ({sketch})",
                        f"{t:.4f}",
                        f"{t_low / t:.2f}",
                        f"{err / opt:.4f}",
                    )
                )
            print(f"done n={n} {kind}", file=sys.stderr)

    print(f"Machine: {machine_description()}\n")
    print(
        markdown_table(
            [
                "n",
                "matrix",
                "rank",
                "method",
                "median s",
                "speed-up vs svd_lowrank",
                "error / optimum",
            ],
            rows,
        )
    )


if __name__ == "__main__":
    main()
