"""Figures of singular-value spectra: how much rank each weight really needs.

matplotlib is an optional extra (``pip install 'lowrank-layers[plot]'``), imported only
inside :func:`plot_spectra`.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from .atomic import atomic_destination
from .common import InputError, InputTypeError, check_int

__all__ = ["ENERGY_GUIDES", "plot_spectra"]

#: Cumulative-energy levels drawn as horizontal guide lines.
ENERGY_GUIDES: tuple[float, ...] = (0.90, 0.95, 0.99)

# Above this many lines a legend is unreadable: a colour bar of the layer order replaces it.
_MAX_LEGEND = 12

_MISSING = "plotting needs matplotlib: pip install 'lowrank-layers[plot]'"


def _check_spectra(spectra: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Validate the spectra; return them sorted descending, in float64 on the CPU."""
    if not isinstance(spectra, Mapping):
        raise InputTypeError(f"spectra must be a mapping of name -> tensor, got {type(spectra)!r}")
    if not spectra:
        raise InputError("spectra is empty: pass at least one name -> singular values")
    checked = {}
    for name, values in spectra.items():
        if not isinstance(values, torch.Tensor):
            raise InputTypeError(f"spectra[{name!r}] must be a torch.Tensor, got {type(values)!r}")
        if values.dim() != 1:
            raise InputError(
                f"spectra[{name!r}] must be a 1-D tensor of singular values, "
                f"got shape {tuple(values.shape)}"
            )
        if values.numel() == 0:
            raise InputError(f"spectra[{name!r}] is empty (shape (0,))")
        values = values.detach().to("cpu", torch.float64)
        if not bool(torch.isfinite(values).all()) or bool((values < 0).any()):
            raise InputError(f"spectra[{name!r}] must hold finite, non-negative singular values")
        checked[str(name)] = torch.sort(values, descending=True).values
    return checked


def _evenly_spaced(n: int, k: int) -> list[int]:
    """``k`` indices spread evenly over ``range(n)`` (first and last included), ``k < n``."""
    if k == 1:
        return [0]
    return [round(j * (n - 1) / (k - 1)) for j in range(k)]


def plot_spectra(
    spectra: Mapping[str, torch.Tensor],
    path: str | os.PathLike[str],
    *,
    title: str | None = None,
    max_lines: int = 40,
) -> None:
    """Save one PNG comparing the singular-value spectra of several weights.

    Left panel: the normalized spectrum ``σ_i / σ_1`` against the normalized index
    ``i / n`` on a log y axis. Right panel: the cumulative energy
    ``Σ_{j≤i} σ_j² / Σ_j σ_j²`` against ``i / n``, with guides at 0.90, 0.95 and 0.99; where
    a curve crosses a guide is the rank ratio that keeps that much of ``‖W‖_F²``.
    Normalizing the index puts layers of different shapes on one axis.

    The file is written atomically: rendered to a temporary file in the same directory,
    then renamed over ``path``. Rendering uses matplotlib's Agg canvas directly, without
    pyplot or a change of the global backend, so it works headless and leaves an
    interactive session alone.

    Args:
        spectra: name -> 1-D tensor of singular values (any order; sorted descending
            here), e.g. ``torch.linalg.svdvals(layer.weight.float())``; plotted in the
            mapping's order.
        path: where to write the PNG; its directory must exist.
        title: the figure's title.
        max_lines: at most this many layers are drawn; beyond it an evenly spaced,
            deterministic subset (first and last included) is drawn and the title says so.

    Raises:
        ImportError: matplotlib is not installed.
        ValueError: ``spectra`` is empty, a tensor is not 1-D, is empty, or holds negative
            or non-finite values; ``max_lines`` < 1.
        TypeError: ``spectra`` is not a mapping of tensors.
        FileNotFoundError: the directory of ``path`` does not exist.
    """
    checked = _check_spectra(spectra)
    check_int("max_lines", max_lines)
    path = Path(path)
    directory = path.parent
    if not directory.is_dir():
        raise FileNotFoundError(f"path's directory does not exist: {str(directory)!r}")
    try:
        import matplotlib
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.cm import ScalarMappable
        from matplotlib.colors import Normalize
        from matplotlib.figure import Figure
    except ImportError as exc:
        raise ImportError(_MISSING) from exc

    names = list(checked)
    picked = list(range(len(names)))
    heading = title or "singular-value spectra"
    if len(names) > max_lines:
        picked = _evenly_spaced(len(names), max_lines)
        heading += f" ({len(picked)} of {len(names)} layers shown, evenly spaced)"

    fig = Figure(figsize=(12, 5), layout="constrained")
    FigureCanvasAgg(fig)
    left, right = fig.subplots(1, 2)
    cmap = matplotlib.colormaps["viridis"]
    for index in picked:  # colour by position in the full list, as the colour bar says
        name = names[index]
        color = cmap(index / max(len(names) - 1, 1))
        _plot_spectrum(left, right, checked[name], name, color)
    _label_axes(left, right)
    if len(picked) <= _MAX_LEGEND:
        right.legend(fontsize=7, loc="lower right")
    else:
        mappable = ScalarMappable(Normalize(0, len(names) - 1), cmap=cmap)
        bar = fig.colorbar(mappable, ax=[left, right], shrink=0.8, pad=0.01)
        bar.set_label(f"layer order: {names[0]} ... {names[-1]}", fontsize=8)
    fig.suptitle(heading)

    with atomic_destination(path) as tmp, open(tmp, "xb") as f:
        fig.savefig(f, format="png", dpi=110)


def _plot_spectrum(left: Any, right: Any, sigma: torch.Tensor, name: str, color: Any) -> None:
    """One layer's normalized spectrum (left) and cumulative energy (right)."""
    n = sigma.numel()
    x = (torch.arange(1, n + 1, dtype=torch.float64) / n).tolist()
    if sigma[0] > 0:
        ratio = sigma / sigma[0]
        positive = ratio > 0  # a log axis cannot show exact zeros
        xs = [xi for xi, keep in zip(x, positive.tolist(), strict=True) if keep]
        left.plot(xs, ratio[positive].tolist(), color=color, lw=1, label=name)
    total = float((sigma**2).sum())
    energy = (sigma**2).cumsum(0) / total if total > 0 else torch.ones_like(sigma)
    right.plot(x, energy.tolist(), color=color, lw=1, label=name)


def _label_axes(left: Any, right: Any) -> None:
    """Scales, labels, titles and grids of both panels, and the energy guides."""
    left.set_yscale("log")
    left.set_xlabel("normalized index i / n")
    left.set_ylabel("σ_i / σ_1")
    left.set_title("normalized spectrum")
    left.grid(True, which="both", alpha=0.3)
    for level in ENERGY_GUIDES:
        right.axhline(level, color="grey", ls="--", lw=0.8)
        right.annotate(
            f"{level:.2f}",
            (0.0, level),
            xytext=(2, 2),
            textcoords="offset points",
            fontsize=8,
            color="grey",
        )
    right.set_xlabel("normalized index i / n")
    right.set_ylabel("cumulative energy Σ σ² / total")
    right.set_title("cumulative energy")
    right.set_xlim(0, 1)
    right.set_ylim(0, 1.03)
    right.grid(True, alpha=0.3)
