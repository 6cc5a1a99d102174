"""One gradient pass over calibration data: each layer's input and output-gradient second
moments, from which :mod:`~lowrank_layers.allocate` estimates what truncating the layer
costs the model's output (K-FAC: ``½·tr(G·ΔW·C·ΔWᵀ)``).

The gradients need no labels: ``"kl"`` samples each token's target from the model's own
prediction (its expected outer product is the Fisher of the KL to the original model);
``"mse"`` backpropagates a random Gaussian probe of the output (the Gauss-Newton matrix of
the squared error of hidden states), for encoders.

Memory: a batch runs in micro-batches (``micro_batch_tokens``), so the autograd graph of one
micro-batch lives at a time. Only the layers' outputs require a gradient (the parameters
are frozen for the pass), so the graph saves no layer's input for a weight gradient; a
tensor hook folds each output's gradient into its Gram matrix as soon as backward reaches
it, so no two layers' output gradients need to be held together. What stays is one
``in x in`` and one ``out x out`` float32 sum per layer, the input sum shared by the layers
that read one tensor.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from .blocks import has_logits, main_output
from .calibrate import batch_tokens, linear_modules, padding_mask, run_batch, token_rows
from .common import InputError, check_choice, check_int, restored_flags

__all__ = ["MICRO_BATCH_TOKENS", "OBJECTIVES", "Sensitivity", "collect_sensitivity"]

OBJECTIVES: tuple[str, ...] = ("auto", "kl", "mse")

# positions (padding included) per forward and backward pass of collect_sensitivity
MICRO_BATCH_TOKENS = 512
_SUM_DTYPE = torch.float32  # the sums' least precision (a float64 model sums in float64)
_PROBE_ROWS = 256  # token rows per chunk of the "kl" probe's softmax and sampling


@dataclass
class Sensitivity:
    """One layer's second moments from a gradient pass (means over tokens, in float32, or
    float64 for a float64 model).

    Layers that read the same input tensor in every pass (attention's q/k/v projections,
    an MLP's gate and up projections) share one ``input_cov`` tensor: read it, never change
    it in place.

    Attributes:
        input_cov: ``E[x xᵀ]``, ``(in, in)``.
        grad_cov: ``E[g gᵀ]`` of the gradients at the layer's output, ``(out, out)``.
        tokens: how many tokens were averaged.
    """

    input_cov: torch.Tensor
    grad_cov: torch.Tensor
    tokens: int


def collect_sensitivity(
    model: nn.Module,
    batches: Sequence[Any],
    modules: Mapping[str, nn.Module] | None = None,
    *,
    objective: str = "auto",
    grad_tokens: int = 512,
    micro_batch_tokens: int | None = MICRO_BATCH_TOKENS,
    seed: int = 0,
) -> dict[str, Sensitivity]:
    """One forward and backward pass per batch: each layer's ``E[x xᵀ]`` and ``E[g gᵀ]``.

    The model runs in eval mode with its parameters frozen (modes and ``requires_grad``
    flags restored afterwards); no parameter's ``.grad`` is touched. Tokens under a batch's
    ``attention_mask == 0`` are left out.

    Args:
        model: the model (a ``.logits`` output for ``"kl"``).
        batches: batches the model takes (see :func:`~lowrank_layers.calibrate.run_batch`).
        modules: ``{name: nn.Linear}`` to observe; None: every ``nn.Linear`` below the root.
        objective: ``"kl"`` (targets sampled from the model's own prediction), ``"mse"``
            (a Gaussian probe of the main output) or ``"auto"`` (``"kl"`` when the output
            has ``logits``).
        grad_tokens: at most this many tokens per batch (a seeded random subset, the same
            for every layer) enter ``E[g gᵀ]``: its ``out x out`` Gram matrices cost more
            than the backward pass itself, and tokens of one sequence carry correlated
            gradients. ``E[x xᵀ]`` uses every token.
        micro_batch_tokens: a batch runs in parts of at most this many positions (padding
            included; at least one sequence each), split along the first dimension of its
            tensors (a mapping's or tuple's tensors whose first dimension is the batch's;
            anything else is passed to every part): the activations of one part live at a
            time. None: whole batches. Splitting changes no result beyond rounding: the
            token subset and the probe's random draws are made for the whole batch.
        seed: seeds the sampled targets or probes and the token subset.

    Returns:
        ``{name: Sensitivity}`` for every layer some token reached.

    Raises:
        ValueError: an unknown objective, no modules, no batches, no token at all, or
            ``grad_tokens`` / ``micro_batch_tokens`` not a positive int.
    """
    check_choice("objective", objective, OBJECTIVES)
    check_int("grad_tokens", grad_tokens)
    check_int("micro_batch_tokens", micro_batch_tokens, optional=True)
    if modules is None:
        modules = linear_modules(model)
    if not modules:
        raise InputError("collect_sensitivity: no module to observe (modules is empty)")
    if len(batches) == 0:
        raise InputError("collect_sensitivity: batches is empty")
    gradient_pass = _GradientPass(objective, grad_tokens, torch.Generator().manual_seed(seed))
    params = list(dict.fromkeys([*model.parameters(), *(p for m in modules.values()
                                                        for p in m.parameters())]))  # fmt: skip
    handles = [m.register_forward_hook(gradient_pass.hook_for(n)) for n, m in modules.items()]
    try:
        with restored_flags(model.modules(), params):
            model.eval()
            for p in params:
                p.requires_grad_(False)
            for batch in batches:
                gradient_pass.run(model, batch, micro_batch_tokens)
    finally:
        gradient_pass.clear()
        for h in handles:
            h.remove()
    return gradient_pass.result(modules)


def _gram(rows: torch.Tensor) -> torch.Tensor:
    """``rowsᵀ·rows`` in float32 at least (:data:`_SUM_DTYPE`)."""
    rows = rows.to(torch.promote_types(rows.dtype, _SUM_DTYPE))
    return rows.mT @ rows


def _mean(total: torch.Tensor, count: int) -> torch.Tensor:
    """``total / count``, made exactly symmetric (a GEMM's ``XᵀX`` need not be)."""
    return (total + total.mT).div_(2 * count)


class _Moments:
    """Per-layer running sums of Gram matrices, and the rows they summed."""

    def __init__(self) -> None:
        self.sums: dict[str, torch.Tensor] = {}
        self.tokens: dict[str, int] = {}

    def add(self, name: str, rows: torch.Tensor) -> None:
        """Add ``rowsᵀ·rows`` (in place after the first: no temporary of the sum's size)."""
        if not rows.shape[0]:
            return
        total = self.sums.get(name)
        if total is None:
            self.sums[name] = _gram(rows)
        else:
            rows = rows.to(total.dtype)
            total.addmm_(rows.mT, rows)
        self.tokens[name] = self.tokens.get(name, 0) + rows.shape[0]

    def mean(self, name: str) -> torch.Tensor:
        """The mean; the sum is released."""
        return _mean(self.sums.pop(name), self.tokens[name])


class _SharedInputs:
    """``Σ x xᵀ`` summed once per group of layers that read one input tensor in a pass
    (the same object at the same ``_version``, one layer after the other): a sum per group,
    keyed by its members. A layer found in several groups (grouped differently in other
    passes, or called twice) gets the sum of its groups. A group's Gram matrix is computed
    when its first layer reads the input (a later in-place change of the input cannot
    reach it) and added when the next input comes."""

    def __init__(self) -> None:
        self.sums: dict[frozenset[str], torch.Tensor] = {}
        self.tokens: dict[frozenset[str], int] = {}
        self._x: torch.Tensor | None = None  # the current group's input
        self._version = -1
        self._gram: torch.Tensor | None = None  # its Gram matrix, and its tokens
        self._count = 0
        self._members: list[str] = []

    def observe(self, name: str, x: torch.Tensor, mask: torch.Tensor | None) -> None:
        same = x is self._x and x._version == self._version
        if not same or name in self._members:  # a new input, or a layer called again
            if same:
                gram, count = self._gram, self._count
            else:
                rows = token_rows(x, mask)
                gram, count = _gram(rows), rows.shape[0]
            self.flush()
            self._x, self._version, self._gram, self._count = x, x._version, gram, count
        self._members.append(name)

    def flush(self) -> None:
        """Add the current group's Gram matrix to its sum."""
        if self._members and self._gram is not None and self._count:
            key = frozenset(self._members)
            if key in self.sums:
                self.sums[key] += self._gram
            else:  # a copy: the Gram matrix may serve the next group too
                self.sums[key] = self._gram.clone()
            self.tokens[key] = self.tokens.get(key, 0) + self._count
        self._x = self._gram = None
        self._version = -1
        self._members = []

    def means(self) -> dict[str, tuple[torch.Tensor, int]]:
        """``{layer: (E[x xᵀ], tokens)}``; layers of one group share the tensor. The sums
        are released."""
        groups: dict[str, list[frozenset[str]]] = {}
        for key in self.sums:
            for name in key:
                groups.setdefault(name, []).append(key)
        means = {key: _mean(self.sums.pop(key), self.tokens[key]) for key in list(self.sums)}
        result = {}
        for name, keys in groups.items():
            tokens = sum(self.tokens[k] for k in keys)
            if len(keys) == 1:
                result[name] = (means[keys[0]], tokens)
            else:  # weighted by tokens: the mean of the summed Gram matrices
                result[name] = (sum(means[k] * self.tokens[k] for k in keys) / tokens, tokens)
        return result


class _GradientPass:
    """The forward hooks and per-batch gradient pass of :func:`collect_sensitivity`."""

    def __init__(self, objective: str, grad_tokens: int, gen: torch.Generator) -> None:
        self.objective = objective
        self.grad_tokens = grad_tokens
        self.gen = gen
        self.inputs = _SharedInputs()  # Σ x xᵀ
        self.grads = _Moments()  # Σ g gᵀ
        # the current micro-batch: its attention_mask, its token rows, those of them that
        # enter E[g gᵀ] (None: all), and the outputs made to require a gradient
        self.mask: torch.Tensor | None = None
        self.rows = 0
        self.pick: torch.Tensor | None = None
        self.roots: list[torch.Tensor] = []

    def hook_for(self, name: str) -> Callable[[nn.Module, tuple, Any], Any]:
        def hook(module: nn.Module, args: tuple, out: Any) -> Any:
            if args and isinstance(args[0], torch.Tensor):
                self.inputs.observe(name, args[0], self.mask)
            if not isinstance(out, torch.Tensor) or not out.is_floating_point():
                return None
            if not out.requires_grad:  # nothing before it is observed: a root of the graph
                out = out.detach().requires_grad_()
                self.roots.append(out)
            out.register_hook(self._grad_hook_for(name))
            return out

        return hook

    def _grad_hook_for(self, name: str) -> Callable[[torch.Tensor], None]:
        def hook(grad: torch.Tensor) -> None:
            g = token_rows(grad, self.mask)
            if self.pick is not None and g.shape[0] == self.rows:  # else: not one row a token
                g = g[self.pick.to(g.device)]
            self.grads.add(name, g)

        return hook

    def run(self, model: nn.Module, batch: Any, micro_batch_tokens: int | None) -> None:
        """One batch, one micro-batch after the other: the layers' input and output-gradient
        moments. The token subset and the probe's draws are the whole batch's."""
        n = batch_tokens(batch)
        pick = None
        if n > self.grad_tokens:  # the same tokens for every layer of this batch
            pick = torch.randperm(n, generator=self.gen)[: self.grad_tokens].sort().values
        first = _first_tensor(batch)
        draws = _Draws(self.gen, first.shape[0] if first is not None and first.dim() else 1)
        start = 0
        for part, sequences in _micro_batches(batch, micro_batch_tokens):
            self.rows = batch_tokens(part)
            if pick is not None:
                self.pick = pick[(pick >= start) & (pick < start + self.rows)] - start
            noise = functools.partial(draws.take, sequences=sequences)
            try:
                self._step(model, part, noise)
            finally:
                self.clear()
            start += self.rows

    def _step(
        self, model: nn.Module, part: Any, noise: Callable[[torch.Size, bool], torch.Tensor]
    ) -> None:
        """Forward and backward of one micro-batch."""
        self.mask = padding_mask(part)
        with torch.enable_grad():
            out = run_batch(model, part)
            self.inputs.flush()
            y = main_output(out)
            if not y.requires_grad:  # no observed layer feeds the output
                return
            objective = self.objective
            if objective == "auto":
                objective = "kl" if has_logits(out) else "mse"
            grad = _probe_grad(y, objective, self.mask, noise)
            torch.autograd.backward(y, grad, inputs=self.roots or None)

    def clear(self) -> None:
        self.inputs.flush()
        self.roots.clear()
        self.mask = self.pick = None

    def result(self, modules: Mapping[str, nn.Module]) -> dict[str, Sensitivity]:
        """``{name: Sensitivity}`` of the layers some token reached with a gradient (the
        sums are released)."""
        inputs = self.inputs.means()
        result = {
            n: Sensitivity(inputs[n][0], self.grads.mean(n), inputs[n][1])
            for n in modules
            if n in inputs and self.grads.tokens.get(n)
        }
        if not result:
            raise InputError(
                "collect_sensitivity: no token reached the layers with a gradient (all tokens "
                "masked, or the output does not depend on them)"
            )
        return result


class _Draws:
    """One batch's random probe draws, made once for the whole batch and handed out along
    its first dimension one micro-batch after the other, so that splitting a batch changes
    no draw. A part whose output does not lead with its own sequences gets draws of its
    own."""

    def __init__(self, gen: torch.Generator, sequences: int) -> None:
        self.gen = gen
        self.sequences = sequences  # the batch's first dimension
        self.used = 0
        self.noise: torch.Tensor | None = None

    def take(self, shape: torch.Size, uniform: bool, sequences: int) -> torch.Tensor:
        """Noise of ``shape`` (float32, CPU), uniform in [0, 1) or standard normal, for a
        part of ``sequences`` whose output has ``shape``."""
        draw = torch.rand if uniform else torch.randn
        if not shape or shape[0] != sequences:
            return draw(shape, generator=self.gen)
        if self.noise is None:
            self.noise = draw((self.sequences, *shape[1:]), generator=self.gen)
        part = self.noise[self.used : self.used + sequences]
        if part.shape != shape:
            return draw(shape, generator=self.gen)
        self.used += sequences
        return part


def _first_tensor(batch: Any) -> torch.Tensor | None:
    if isinstance(batch, Mapping):
        batch = list(batch.values())
    if isinstance(batch, (tuple, list)):
        return next((v for v in batch if isinstance(v, torch.Tensor)), None)
    return batch if isinstance(batch, torch.Tensor) else None


def _rows_of(batch: Any, size: int, start: int, stop: int) -> Any:
    """``batch``'s sequences ``start:stop``: each tensor whose first dimension is ``size``
    sliced, the rest as it is; tensors detached (nothing flows back into a caller's)."""

    def cut(v: Any) -> Any:
        if not isinstance(v, torch.Tensor):
            return v
        return v[start:stop].detach() if v.dim() and v.shape[0] == size else v.detach()

    if isinstance(batch, Mapping):
        return {k: cut(v) for k, v in batch.items()}
    if isinstance(batch, (tuple, list)):
        return type(batch)(cut(v) for v in batch)
    return cut(batch)


def _micro_batches(batch: Any, tokens: int | None) -> Iterator[tuple[Any, int]]:
    """``batch`` in parts of at most ``tokens`` positions (at least one sequence each, all
    of it for None), with each part's number of sequences."""
    first = _first_tensor(batch)
    if first is None or first.dim() == 0:
        yield _rows_of(batch, -1, 0, 0), 1
        return
    size = first.shape[0]
    per_row = first[0].numel()
    if first.is_floating_point() and first.dim() > 1:
        per_row //= first.shape[-1]  # features: one position per vector
    step = size if tokens is None else max(1, tokens // max(1, per_row))
    for start in range(0, size, step):
        yield _rows_of(batch, size, start, start + step), min(step, size - start)


def _probe_grad(
    y: torch.Tensor,
    objective: str,
    mask: torch.Tensor | None,
    noise: Callable[[torch.Size, bool], torch.Tensor],
) -> torch.Tensor:
    """The gradient at the output ``y`` of the scalar whose gradients sample the output's
    Fisher / Gauss-Newton matrix (no graph is built for it).

    ``"kl"``: ``Σ -log softmax(y)[t]`` over tokens, each target ``t`` sampled from the
    model's own prediction (inverse-CDF sampling on uniform ``noise``, far faster than
    ``torch.multinomial``): its gradient is ``softmax(y) - onehot(t)``, computed a chunk of
    tokens at a time, so no temporary of the logits' size is made. ``"mse"``: ``Σ y·z`` for
    a standard normal ``z``: its gradient is ``z``. Tokens under ``mask == 0`` count zero.
    """
    keep = None
    if mask is not None and y.shape[:-1] == mask.shape:
        keep = mask.to(device=y.device, dtype=torch.float32)[..., None]
    if objective == "mse":
        z = noise(y.shape, False).to(y.device)
        return (z * keep if keep is not None else z).to(y.dtype)
    u = noise(y.shape[:-1], True).to(y.device).reshape(-1, 1)
    logits = y.detach().reshape(-1, y.shape[-1])
    weights = keep.reshape(-1, 1) if keep is not None else None
    grad = torch.empty(logits.shape, dtype=y.dtype, device=y.device)
    for i in range(0, logits.shape[0], _PROBE_ROWS):
        j = i + _PROBE_ROWS
        p = torch.softmax(logits[i:j].float(), dim=-1)
        cdf = p.cumsum(-1)
        target = torch.searchsorted(cdf, u[i:j] * cdf[:, -1:]).clamp_max(p.shape[-1] - 1)
        del cdf
        p.scatter_add_(-1, target, torch.full(target.shape, -1.0, device=p.device))
        grad[i:j] = p * weights[i:j] if weights is not None else p
    return grad.reshape(y.shape)
