"""MLP width reduction: keep the intermediate channels of an MLP that matter, refit its
output projection, and get one smaller dense module instead of factors.

An MLP ``y = W_out·f(W_in·x)`` (gated: ``f(W_gate·x, W_up·x)``), with ``f`` acting channel
by channel on its ``I`` intermediate channels, loses little when it keeps ``k < I`` of them,
chosen from the calibration statistics of the intermediate activation ``h``, and refits
``W_out`` by least squares (MoDeGPT's MLP compression, a Nyström approximation of the
module). The result is plain ``nn.Linear`` layers of width ``k``: its speed-up equals its
parameter saving at every token count and dtype, with no break-even rank.

The estimate, in the units of :mod:`~lowrank_layers.allocate` (the loss increase, K-FAC):
keeping channels ``S`` with the refit ``W' = W_out·C[:,S]·C[S,S]⁻¹`` (``C = E[h hᵀ]``)
leaves the output error ``W_out·r`` where ``r`` is the residual of ``h`` regressed on
``h_S``; its cost is ``½·tr(M·C_res)``, ``M = W_outᵀ·G·W_out`` with ``G`` the output's
gradient second moment. For channels taken in a fixed order, the pivoted Cholesky factor
``C = Σᵢ lᵢ lᵢᵀ`` gives ``C_res`` after the first ``k`` as ``Σ_{i≥k} lᵢ lᵢᵀ``: the cost at
every width from one factorization. The order: channels by ``C_jj·M_jj``, the cost of
dropping each alone. On SmolLM2-135M's MLPs it estimated within 5% of a block-greedy order
(which costs 10-20x more) and 5-20% below ridge leverage scores at every width.

How MLPs are found (:func:`find_mlps`): by structure, then checked by running the model
(:func:`check_mlps`). Layers ``d → I`` (one, or two for a gated MLP) and one layer
``I → d`` (``I ≠ d``) under the same parent module, or the same grandparent (BERT's
``intermediate.dense`` and ``output.dense``). The check runs one batch with the input
layers' outputs cut to a random subset of channels and compares what the output layer then
receives with the same channels of the full model: equal only if ``f`` acts channel by
channel.
"""

from __future__ import annotations

import contextlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from .blocks import StopForward
from .calibrate import run_batch
from .checkpoint_format import mark_narrowed
from .common import InputError
from .report import LayerReport

__all__ = [
    "Mlp",
    "Narrowing",
    "WidthCurve",
    "check_mlps",
    "find_mlps",
    "narrow_input",
    "narrowed_layer",
    "refit_output",
    "width_curve",
]


@dataclass(frozen=True)
class Mlp:
    """An MLP found in a model.

    Attributes:
        inputs: the layers producing the intermediate activation (``gate_proj`` and
            ``up_proj``; ``fc1``; BERT's ``intermediate.dense``), ``hidden → width``.
        output: the layer reading it (``down_proj``; ``fc2``; ``output.dense``),
            ``width → hidden``.
        hidden: the model width ``d``.
        width: the intermediate width ``I``.
    """

    inputs: tuple[str, ...]
    output: str
    hidden: int
    width: int

    @property
    def layers(self) -> tuple[str, ...]:
        return (*self.inputs, self.output)

    def params(self, width: int) -> int:
        """Weight parameters of the MLP at intermediate ``width`` (biases excluded)."""
        return width * self.hidden * (len(self.inputs) + 1)


@dataclass(frozen=True)
class Narrowing:
    """An MLP cut to the intermediate ``channels`` it keeps (sorted indices)."""

    mlp: Mlp
    channels: torch.Tensor

    @property
    def width(self) -> int:
        return int(self.channels.numel())

    def __repr__(self) -> str:
        return f"Narrowing({self.mlp.output}: {self.mlp.width} -> {self.width})"


def _linear_shape(module: nn.Module) -> tuple[int, int] | None:
    if type(module) is nn.Linear:
        return module.in_features, module.out_features
    return None


def _parent(name: str, up: int) -> str | None:
    """The module ``up`` levels above ``name`` ("" for the root), None above the root."""
    parts = name.split(".")
    return ".".join(parts[:-up]) if len(parts) >= up else None


def find_mlps(modules: Mapping[str, nn.Module]) -> list[Mlp]:
    """The MLPs among ``modules`` (``{name: nn.Linear}``, in the model's module order), by
    structure (see the module docstring): the input layers registered before the output
    layer; a layer belongs to at most one. Unverified: see :func:`check_mlps`."""
    shapes = {n: s for n, m in modules.items() if (s := _linear_shape(m)) is not None}
    position = {n: i for i, n in enumerate(shapes)}
    found: list[Mlp] = []
    used: set[str] = set()
    for name, (width, hidden) in shapes.items():
        if width == hidden or name in used:
            continue
        for up in (1, 2):
            home = _parent(name, up)
            if home is None:
                continue
            inputs = tuple(
                n for n, s in shapes.items()
                if s == (hidden, width) and n not in used and _parent(n, up) == home
                and position[n] < position[name]  # registered before: fc1 before fc2
            )  # fmt: skip
            if 1 <= len(inputs) <= 2:
                found.append(Mlp(inputs, name, hidden, width))
                used.update((*inputs, name))
                break
            if inputs:
                break  # three or more candidate inputs: not an MLP this module understands
    return found


def check_mlps(
    model: nn.Module,
    mlps: Sequence[Mlp],
    batch: Any,
    *,
    seed: int = 0,
    rtol: float = 1e-4,
) -> tuple[list[Mlp], dict[str, str]]:
    """The ``mlps`` whose intermediate activation acts channel by channel, checked on
    ``batch``, and why the others are not (``{output layer: reason}``).

    One pass records each output layer's input ``h``; then, per MLP, a pass with its input
    layers' outputs cut to a random half of the channels, stopped at its output layer,
    must hand that layer exactly those channels of ``h`` (to ``rtol`` of their scale)."""
    if not mlps:
        return [], {}
    reference = _output_inputs(model, mlps, batch)
    gen = torch.Generator().manual_seed(seed)
    good, bad = [], {}
    for mlp in mlps:
        h = reference.get(mlp.output)
        if h is None:
            bad[mlp.output] = "no token of the calibration reached it"
            continue
        keep = torch.randperm(mlp.width, generator=gen)[: max(1, mlp.width // 2)].sort().values
        cut = _cut_pass(model, mlp, keep, batch)
        want = h[..., keep.to(h.device)]
        scale = want.abs().max().clamp_min(1e-12)
        if cut is None or cut.shape != want.shape:
            bad[mlp.output] = "its input layers do not feed it channel by channel"
        elif float((cut - want).abs().max() / scale) > rtol:
            bad[mlp.output] = "its activation mixes intermediate channels (not channel by channel)"
        else:
            good.append(mlp)
    return good, bad


def _output_inputs(model: nn.Module, mlps: Sequence[Mlp], batch: Any) -> dict[str, torch.Tensor]:
    """Each MLP's output-layer input on ``batch``; the pass stops once it has them all (the
    model's head, a large vocabulary's logits, never runs)."""
    seen: dict[str, torch.Tensor] = {}

    def record(name: str) -> Any:
        def hook(module: nn.Module, args: tuple) -> None:
            seen.setdefault(name, args[0].detach().clone())
            if len(seen) == len(mlps):
                raise StopForward

        return hook

    handles = [
        model.get_submodule(m.output).register_forward_pre_hook(record(m.output)) for m in mlps
    ]
    try:
        with torch.no_grad(), contextlib.suppress(StopForward):
            run_batch(model, batch)
    finally:
        for h in handles:
            h.remove()
    return seen


def _cut_pass(model: nn.Module, mlp: Mlp, keep: torch.Tensor, batch: Any) -> torch.Tensor | None:
    """The output layer's input when the input layers keep only ``keep``: None if the pass
    never reached it."""
    got: list[torch.Tensor] = []

    def cut(module: nn.Module, args: tuple, out: torch.Tensor) -> torch.Tensor:
        return out[..., keep.to(out.device)]

    def stop(module: nn.Module, args: tuple) -> None:
        got.append(args[0].detach().clone())
        raise StopForward

    handles = [model.get_submodule(n).register_forward_hook(cut) for n in mlp.inputs]
    handles.append(model.get_submodule(mlp.output).register_forward_pre_hook(stop))
    try:
        with torch.no_grad(), contextlib.suppress(StopForward, RuntimeError):
            run_batch(model, batch)  # a RuntimeError: the cut shape broke the model
    finally:
        for h in handles:
            h.remove()
    return got[0] if got else None


@dataclass
class WidthCurve:
    """An MLP's channels in the order they are kept, and the estimated loss at each width.

    Attributes:
        order: channel indices, most important first.
        loss: ``loss[k]``, the estimated loss increase keeping ``order[:k]`` (``k = 0..I``).
    """

    order: torch.Tensor
    loss: torch.Tensor

    def channels(self, width: int) -> torch.Tensor:
        """The sorted channels kept at ``width``."""
        return self.order[:width].sort().values


def width_curve(input_cov: torch.Tensor, weight_grad_cov: torch.Tensor) -> WidthCurve:
    """The channel order and estimated loss at every width of an MLP whose output layer
    ``W`` (``d x I``) has the input second moment ``input_cov`` (``E[h hᵀ]``, ``I x I``) and
    the output-gradient second moment ``weight_grad_cov`` seen from its input,
    ``Wᵀ·E[g gᵀ]·W`` (``I x I``, :meth:`~lowrank_layers.sensitivity.Sensitivity.weight_grad_cov`);
    see the module docstring."""
    # memory: the permuted C in float64 and its factor, beside the permuted M in float32
    # (no whole-matrix temporaries: 0.6 GB for a 4864-wide MLP, where they took 1.5 GB)
    score = input_cov.diagonal().double() * weight_grad_cov.diagonal().double()
    order = torch.argsort(score, descending=True, stable=True)
    Cp = input_cov[order][:, order].double()
    jitter = 1e-10 * float(Cp.diagonal().mean().clamp_min(1e-30))
    Cp.diagonal().add_(jitter)
    L, info = torch.linalg.cholesky_ex(Cp)
    if int(info) != 0:  # not positive definite even with the jitter: an eigen-based floor
        Cp.diagonal().sub_(jitter)
        L = _psd_factor(Cp)
    del Cp
    Lf = L.float()
    del L
    Mp = weight_grad_cov[order][:, order].float()
    q = (Mp @ Lf).mul_(Lf).sum(0).double().clamp_min(0)  # lᵢᵀ M lᵢ
    tail = torch.flip(torch.cumsum(torch.flip(q, [0]), 0), [0])
    loss = 0.5 * torch.cat([tail, tail.new_zeros(1)])
    return WidthCurve(order.cpu(), loss.cpu())


def _psd_factor(C: torch.Tensor) -> torch.Tensor:
    """A lower-triangular factor of ``C`` with its eigenvalues floored (rank-deficient)."""
    lam, V = torch.linalg.eigh(C)
    floor = 1e-8 * float(lam.max().clamp_min(1e-30))
    fixed = (V * lam.clamp_min(floor)) @ V.mT
    return torch.linalg.cholesky(0.5 * (fixed + fixed.mT))


def narrow_input(module: nn.Linear, channels: torch.Tensor) -> nn.Linear:
    """A plain ``nn.Linear`` computing only the output ``channels`` of ``module`` (marked as
    narrowed for the checkpoint format)."""
    idx = channels.to(module.weight.device)
    new = nn.Linear(
        module.in_features, int(idx.numel()), bias=module.bias is not None,
        device=module.weight.device, dtype=module.weight.dtype,
    )  # fmt: skip
    with torch.no_grad():
        new.weight.copy_(module.weight[idx])
        if module.bias is not None:
            new.bias.copy_(module.bias[idx])
    mark_narrowed(new, (module.in_features, module.out_features))
    return new


def refit_output(
    module: nn.Linear, cross_cov: torch.Tensor, input_cov: torch.Tensor, *, ridge: float = 1e-6
) -> nn.Linear:
    """``module`` (``d x I``) refit to read ``k`` kept channels ``ĥ``: the least-squares
    ``W' = W·E[h ĥᵀ]·(E[ĥ ĥᵀ] + λ)⁻¹`` (``cross_cov``: ``E[h ĥᵀ]``, ``I x k``;
    ``input_cov``: ``E[ĥ ĥᵀ]``, ``k x k``; ``λ``: ``ridge`` times its mean diagonal).
    The bias is kept."""
    A = input_cov.double()
    k = A.shape[0]
    lam = ridge * float(A.diagonal().mean().clamp_min(1e-30))
    rhs = (module.weight.detach().double().to(A.device) @ cross_cov.double()).mT  # k x d
    new_w = torch.linalg.solve(A + lam * torch.eye(k, dtype=A.dtype, device=A.device), rhs).mT
    new = nn.Linear(
        k, module.out_features, bias=module.bias is not None,
        device=module.weight.device, dtype=module.weight.dtype,
    )  # fmt: skip
    with torch.no_grad():
        new.weight.copy_(new_w.to(module.weight))
        if module.bias is not None:
            new.bias.copy_(module.bias)
    mark_narrowed(new, (module.in_features, module.out_features))
    return new


def narrowed_layer(
    name: str,
    module: nn.Linear,
    narrowing: Narrowing,
    *,
    input_cov: torch.Tensor | None = None,
    cross_cov: torch.Tensor | None = None,
    target_energy: float | None = None,
    eval_cov: torch.Tensor | None = None,
) -> tuple[nn.Linear, LayerReport]:
    """One layer of a narrowed MLP, and its report: an input layer keeps its rows of the
    kept channels; the output layer is refit (:func:`refit_output`) from the propagated
    statistics (``input_cov`` ``E[ĥ ĥᵀ]`` with ``cross_cov`` ``E[h ĥᵀ]`` and the original
    output energy ``target_energy``) or, without ``cross_cov``, from the original
    ``input_cov`` ``E[h hᵀ]`` alone. The output error is on ``eval_cov`` (held-out
    ``E[h hᵀ]``) when given, else on the calibration."""
    mlp, keep = narrowing.mlp, narrowing.channels
    note = f"MLP width {mlp.width} -> {narrowing.width} (with {', '.join(mlp.layers)})"
    error, data = None, None
    if name != mlp.output:
        new = narrow_input(module, keep)
    else:
        if input_cov is None:
            raise InputError(f"{name}: a narrowed MLP's output layer needs input statistics")
        full = None
        if cross_cov is None:  # the original statistics: E[h ĥᵀ] = C[:, S], E[ĥ ĥᵀ] = C[S, S]
            full = input_cov
            idx = keep.to(full.device)
            cross_cov, input_cov = full[:, idx], full[idx][:, idx]
        new = refit_output(module, cross_cov, input_cov)
        if eval_cov is not None:
            idx = keep.to(eval_cov.device)
            error = _refit_error(
                module, new, eval_cov[:, idx], eval_cov[idx][:, idx], _energy(module, eval_cov)
            )
            data = "held-out"
        else:
            target = _energy(module, full) if full is not None else target_energy
            error = _refit_error(module, new, cross_cov, input_cov, target)
            data = "calibration"
    report = LayerReport(
        name=name, kind="Linear", in_features=new.in_features, out_features=new.out_features,
        rank=None, params_before=module.weight.numel(), params_after=new.weight.numel(),
        relative_error=None, seconds=0.0, output_error=error, error_data=data,
        speedup_few=module.weight.numel() / new.weight.numel(),
        speedup_many=module.weight.numel() / new.weight.numel(), note=note,
    )  # fmt: skip
    return new, report


def _energy(module: nn.Linear, cov: torch.Tensor) -> float:
    """``E‖W·h‖² = tr(W·C·Wᵀ)`` for ``C = E[h hᵀ]``."""
    W = module.weight.detach().double().to(cov.device)
    return float(((W @ cov.double()) * W).sum())


def _refit_error(
    module: nn.Linear,
    new: nn.Linear,
    cross_cov: torch.Tensor,
    input_cov: torch.Tensor,
    target: float | None,
) -> float | None:
    """``sqrt(E‖W·h − W'·ĥ‖² / E‖W·h‖²)`` from ``E[h ĥᵀ]``, ``E[ĥ ĥᵀ]`` and ``E‖W·h‖²``."""
    if target is None or target <= 0:
        return None
    W = module.weight.detach().double().to(cross_cov.device)
    V = new.weight.detach().double().to(cross_cov.device)
    err = target - 2 * float(((W @ cross_cov.double()) * V).sum())
    err += float(((V @ input_cov.double()) * V).sum())
    return max(err, 0.0) ** 0.5 / target**0.5
