"""One gradient pass over calibration data: each layer's input and output-gradient second
moments, from which :mod:`~lowrank_layers.allocate` estimates what truncating the layer
costs the model's output (K-FAC: ``½·tr(G·ΔW·C·ΔWᵀ)``).

The gradients need no labels: ``"kl"`` samples each token's target from the model's own
prediction (its expected outer product is the Fisher of the KL to the original model);
``"mse"`` backpropagates a random Gaussian probe of the output (the Gauss-Newton matrix of
the squared error of hidden states), for encoders.

Memory: a batch runs in micro-batches (``micro_batch_tokens``, 256 positions by default),
so the autograd graph of one micro-batch lives at a time. Only the layers' outputs require a
gradient (the parameters are frozen for the pass), so the graph saves no layer's input for a
weight gradient; a tensor hook folds each output's gradient into its Gram matrix as soon as
backward reaches it, so no two layers' output gradients need to be held together. What stays
is one ``in x in`` float32 sum per layer, shared by the layers that read one tensor, and one
``min(in, out)``-square sum of output gradients: for a layer with more outputs than inputs
(an MLP's gate and up projections) the gradient rows are projected through the weight first
(``g·W``), and ``Wᵀ·E[g gᵀ]·W`` is all the loss estimates need of them. Each sum keeps only
its upper triangle, in row panels (56% of the full matrix, and of its GEMM work). On
SmolLM2-135M that is 2.9 M numbers a block, against 9.1 M as full ``E[x xᵀ]`` and
``E[g gᵀ]`` matrices. The means are full matrices, made when the pass ends. Freed memory is
handed back to the OS after each micro-batch (glibc's ``malloc_trim``): the graph's
blocks, freed, otherwise stay resident in the C heap, fragmented.
"""

from __future__ import annotations

import contextlib
import functools
import itertools
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .blocks import BlockChain, capture_chain, has_logits, main_output, stash_tensor, unstash
from .calibrate import batch_tokens, linear_modules, padding_mask, run_batch, token_rows
from .common import InputError, check_choice, check_int, restored_flags
from .memory import release_free_heap

__all__ = [
    "MICRO_BATCH_TOKENS",
    "OBJECTIVES",
    "Sensitivity",
    "collect_sensitivity",
    "collect_sensitivity_blockwise",
]

OBJECTIVES: tuple[str, ...] = ("auto", "kl", "mse")

# positions (padding included) per forward and backward pass of collect_sensitivity
MICRO_BATCH_TOKENS = 256
_SUM_DTYPE = torch.float32  # the sums' least precision (a float64 model sums in float64)
# token rows per chunk of the "kl" probe's softmax and sampling: a chunk's probabilities and
# their running sum are two (rows x vocabulary) float32 temporaries (39 MB each for Qwen2.5's
# 151,936-token vocabulary); the draws do not depend on the chunking
_PROBE_ROWS = 64


@dataclass
class Sensitivity:
    """One layer's second moments from a gradient pass (means over tokens, in float32, or
    float64 for a float64 model).

    Layers that read the same input tensor in every pass (attention's q/k/v projections,
    an MLP's gate and up projections) share one ``input_cov`` tensor: read it, never change
    it in place.

    Attributes:
        input_cov: ``E[x xᵀ]``, ``(in, in)``.
        grad_cov: ``E[g gᵀ]`` of the gradients at the layer's output, ``(out, out)``; with
            ``projected``, ``Wᵀ·E[g gᵀ]·W`` instead, ``(in, in)``.
        tokens: how many tokens were averaged.
        projected: whether ``grad_cov`` is projected through the layer's weight ``W``
            (``(out, in)``), as :func:`collect_sensitivity` stores it for layers with more
            outputs than inputs.
    """

    input_cov: torch.Tensor
    grad_cov: torch.Tensor
    tokens: int
    projected: bool = False

    def weight_grad_cov(self, weight: torch.Tensor) -> torch.Tensor:
        """``Wᵀ·E[g gᵀ]·W``, ``(in, in)``, for the layer's ``weight`` (``(out, in)``): the
        output-gradient moment seen from the layer's input side, in ``grad_cov``'s dtype."""
        if self.projected:
            return self.grad_cov
        W = weight.detach().to(self.grad_cov)
        return W.mT @ self.grad_cov @ W


def collect_sensitivity(
    model: nn.Module,
    batches: Sequence[Any],
    modules: Mapping[str, nn.Module] | None = None,
    *,
    objective: str = "auto",
    grad_tokens: int = 512,
    micro_batch_tokens: int | None = MICRO_BATCH_TOKENS,
    project: bool = True,
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
        project: store ``Wᵀ·E[g gᵀ]·W`` (``(in, in)``, :attr:`Sensitivity.projected`) for
            the layers with more outputs than inputs, instead of their larger ``E[g gᵀ]``;
            False: ``E[g gᵀ]`` for every layer.
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
    gen = torch.Generator().manual_seed(seed)
    gradient_pass = _GradientPass(objective, grad_tokens, gen, project)
    params = list(dict.fromkeys([*model.parameters(), *(p for m in modules.values()
                                                        for p in m.parameters())]))  # fmt: skip
    handles = [m.register_forward_hook(gradient_pass.hook_for(n, m)) for n, m in modules.items()]
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
    result = gradient_pass.result(modules)
    release_free_heap()  # the sums' panels, freed as their means were made
    return result


_PANELS = 8  # the upper triangle in at most this many row panels
_PANEL_MIN = 64  # of at least this many rows


def _panels(n: int) -> list[int]:
    """The row bounds of an ``n x n`` matrix's panels."""
    k = max(1, min(_PANELS, n // _PANEL_MIN))
    return [n * i // k for i in range(k + 1)]


class _TriangleSums:
    """Running sums of Gram matrices ``Σ rowsᵀ·rows``, keyed, each kept as its upper
    triangle in row panels: panel ``i`` holds rows ``b_i:b_(i+1)``, columns ``b_i:``. With
    eight panels that is 56% of the full matrix's memory and of its GEMM work; no full
    matrix is made until the mean."""

    def __init__(self) -> None:
        self.sums: dict[Any, list[torch.Tensor]] = {}
        self.tokens: dict[Any, int] = {}

    def add(self, key: Any, rows: torch.Tensor) -> None:
        """Add ``rowsᵀ·rows`` (in float32 at least, :data:`_SUM_DTYPE`)."""
        if not rows.shape[0]:
            return
        rows = rows.to(torch.promote_types(rows.dtype, _SUM_DTYPE))
        bounds = _panels(rows.shape[1])
        panels = self.sums.get(key)
        if panels is None:
            self.sums[key] = [rows[:, a:b].mT @ rows[:, a:] for a, b in itertools.pairwise(bounds)]
        else:
            for panel, (a, b) in zip(panels, itertools.pairwise(bounds), strict=True):
                panel.addmm_(rows[:, a:b].mT, rows[:, a:])
        self.tokens[key] = self.tokens.get(key, 0) + rows.shape[0]

    def mean(self, key: Any) -> torch.Tensor:
        """The mean, a full and exactly symmetric matrix; the sum is released."""
        panels = self.sums.pop(key)
        n = panels[0].shape[1]
        full = panels[0].new_empty(n, n)
        for panel, (a, b) in zip(panels, itertools.pairwise(_panels(n)), strict=True):
            full[a:b, a:] = panel
            full[b:, a:b] = panel[:, b - a :].mT
            full[a:b, a:b] = (panel[:, : b - a] + panel[:, : b - a].mT) / 2
        del panels
        return full.div_(self.tokens[key])


def _own_rows(x: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """:func:`~lowrank_layers.calibrate.token_rows` of ``x``, copied if they are a view of it
    (a later in-place change of ``x`` must not reach them)."""
    rows = token_rows(x, mask)
    if rows.untyped_storage().data_ptr() == x.untyped_storage().data_ptr():
        rows = rows.clone()
    return rows


class _SharedInputs:
    """``Σ x xᵀ`` summed once per group of layers that read one input tensor in a pass
    (the same object at the same ``_version``, one layer after the other): a sum per group,
    keyed by its members. A layer found in several groups (grouped differently in other
    passes, or called twice) gets the sum of its groups. A group's token rows are copied
    when its first layer reads the input (a later in-place change of the input cannot
    reach them) and added to the sum when the next input comes."""

    def __init__(self) -> None:
        self.sums = _TriangleSums()  # keyed by the group's members
        self.tokens: dict[frozenset[str], int] = self.sums.tokens
        self._x: torch.Tensor | None = None  # the current group's input
        self._version = -1
        self._rows: torch.Tensor | None = None  # its token rows, a copy
        self._members: list[str] = []

    def observe(self, name: str, x: torch.Tensor, mask: torch.Tensor | None) -> None:
        same = x is self._x and x._version == self._version
        if not same or name in self._members:  # a new input, or a layer called again
            rows = self._rows if same else _own_rows(x, mask)
            self.flush()
            self._x, self._version, self._rows = x, x._version, rows
        self._members.append(name)

    def flush(self) -> None:
        """Add the current group's Gram matrix to its sum."""
        if self._members and self._rows is not None:
            self.sums.add(frozenset(self._members), self._rows)
        self._x = self._rows = None
        self._version = -1
        self._members = []

    def means(self) -> dict[str, tuple[torch.Tensor, int]]:
        """``{layer: (E[x xᵀ], tokens)}``; layers of one group share the tensor. The sums
        are released."""
        groups: dict[str, list[frozenset[str]]] = {}
        for key in self.sums.sums:
            for name in key:
                groups.setdefault(name, []).append(key)
        means = {key: self.sums.mean(key) for key in list(self.sums.sums)}
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

    def __init__(
        self, objective: str, grad_tokens: int, gen: torch.Generator, project: bool
    ) -> None:
        self.objective = objective
        self.project = project
        self.projected: set[str] = set()  # the layers whose gradients go through their weight
        self.grad_tokens = grad_tokens
        self.gen = gen
        self.inputs = _SharedInputs()  # Σ x xᵀ
        self.grads = _TriangleSums()  # Σ g gᵀ per layer
        # the current micro-batch: its attention_mask, its token rows, those of them that
        # enter E[g gᵀ] (None: all), and the outputs made to require a gradient
        self.mask: torch.Tensor | None = None
        self.rows = 0
        self.pick: torch.Tensor | None = None
        self.roots: list[torch.Tensor] = []

    def hook_for(self, name: str, module: nn.Module) -> Callable[[nn.Module, tuple, Any], Any]:
        weight = getattr(module, "weight", None)
        if (
            self.project
            and isinstance(weight, torch.Tensor)
            and weight.dim() == 2
            and weight.shape[0] > weight.shape[1]
        ):
            self.projected.add(name)

        def hook(module: nn.Module, args: tuple, out: Any) -> Any:
            if args and isinstance(args[0], torch.Tensor):
                self.inputs.observe(name, args[0], self.mask)
            if not isinstance(out, torch.Tensor) or not out.is_floating_point():
                return None
            if not out.requires_grad:  # nothing before it is observed: a root of the graph
                out = out.detach().requires_grad_()
                self.roots.append(out)
            # the weight as the forward used it (an offloading hook may swap it out after)
            weight = module.weight if name in self.projected else None
            out.register_hook(self._grad_hook_for(name, weight))
            return out

        return hook

    def _grad_hook_for(
        self, name: str, weight: torch.Tensor | None
    ) -> Callable[[torch.Tensor], None]:
        def hook(grad: torch.Tensor) -> None:
            g = token_rows(grad, self.mask)
            if self.pick is not None and g.shape[0] == self.rows:  # else: not one row a token
                g = g[self.pick.to(g.device)]
            if weight is not None:  # Σ (gW)ᵀ(gW) = Wᵀ·(Σ g gᵀ)·W
                dtype = torch.promote_types(g.dtype, _SUM_DTYPE)
                g = g.to(dtype) @ weight.detach().to(dtype)
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
            release_free_heap()  # the freed graph's pages, fragmented in glibc's heap
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
            n: Sensitivity(inputs[n][0], self.grads.mean(n), inputs[n][1], n in self.projected)
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


# ------------------------------------------------------------------------------------------
# block by block: for a model whose weights are loaded one block at a time
# ------------------------------------------------------------------------------------------


def _no_scope(i: int) -> contextlib.AbstractContextManager[Any]:
    return contextlib.nullcontext()


class _Passthrough(nn.Module):
    """Stands in for a block during the head pass: returns ``value`` (the last block's
    output) in the first block's place and its input unchanged in the others'."""

    def __init__(self, value: torch.Tensor | None, returns_tuple: bool) -> None:
        super().__init__()
        self.value = value
        self.returns_tuple = returns_tuple

    def forward(self, hidden: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
        out = self.value if self.value is not None else hidden
        return (out,) if self.returns_tuple else out


@contextlib.contextmanager
def _blocks_replaced(
    model: nn.Module, container: str, last: torch.Tensor, returns_tuple: bool
) -> Iterator[None]:
    """The model's blocks replaced: the first returns ``last``, the others pass on."""
    holder = model.get_submodule(container)
    original = list(holder)
    try:
        for j in range(len(original)):
            holder[j] = _Passthrough(last if j == 0 else None, returns_tuple)
        yield
    finally:
        for j, block in enumerate(original):
            holder[j] = block


@dataclass
class _Part:
    """One micro-batch of the block-by-block pass."""

    batch: Any
    sequences: int
    rows: int
    mask: torch.Tensor | None
    pick: torch.Tensor | None = None


def collect_sensitivity_blockwise(
    model: nn.Module,
    container: str,
    blocks: Sequence[nn.Module],
    batches: Sequence[Any],
    modules: Mapping[str, nn.Module],
    *,
    objective: str = "auto",
    grad_tokens: int = 512,
    micro_batch_tokens: int | None = MICRO_BATCH_TOKENS,
    project: bool = True,
    seed: int = 0,
    block_scope: Callable[[int], contextlib.AbstractContextManager[Any]] = _no_scope,
    stash: Path | None = None,
    on_block: Callable[[int, dict[str, Sensitivity]], None] | None = None,
) -> dict[str, Sensitivity]:
    """:func:`collect_sensitivity` computed one block at a time, for a model whose weights
    are loaded one block at a time (:mod:`~lowrank_layers.offload`): the same moments, to
    float rounding, from the same token subset and probe draws.

    A forward pass carries each micro-batch through the blocks (``container``'s children
    ``blocks``, run one at a time as :func:`~lowrank_layers.blocks.capture_chain` runs
    them), each block's input stashed; the model's head runs once per micro-batch on the
    last block's output (the blocks replaced by stand-ins), its probe gradient taken back
    to that output; then each block, from the last, runs again with a gradient on its
    stashed input, its layers' moments summed as the gradient goes through it, and that
    gradient goes on to the block before. Each block's work happens inside
    ``block_scope(i)`` (which may load the block's weights and release them), its moments
    are finished before the next block starts, and ``on_block(i, moments)`` gets them
    while the block is still in scope.

    Args:
        model, batches, objective, grad_tokens, micro_batch_tokens, project, seed: as for
            :func:`collect_sensitivity`.
        container: the dotted name of the block container (``"model.layers"``).
        blocks: its blocks, in forward order.
        modules: ``{name: nn.Linear}`` to observe, all inside the blocks.
        block_scope: ``block_scope(i)`` is entered around each use of block ``i``.
        stash: a folder for the blocks' input hidden states (one file per block, removed
            when read back); None: kept in memory.
        on_block: called with each block's index and its layers' moments, last block
            first; then they are not kept.

    Returns:
        ``{name: Sensitivity}`` of the layers some gradient reached (empty with
        ``on_block``: it got them).

    Raises:
        ValueError: as :func:`collect_sensitivity`; a module outside the blocks; blocks
            that cannot be run one at a time; a model whose output is not a function of
            its last block's output.
    """
    check_choice("objective", objective, OBJECTIVES)
    check_int("grad_tokens", grad_tokens)
    check_int("micro_batch_tokens", micro_batch_tokens, optional=True)
    if not modules:
        raise InputError("collect_sensitivity_blockwise: no module to observe (modules is empty)")
    if len(batches) == 0:
        raise InputError("collect_sensitivity_blockwise: batches is empty")
    inside: list[dict[str, nn.Module]] = []
    for block in blocks:
        ids = {id(m) for m in block.modules()}
        inside.append({n: m for n, m in modules.items() if id(m) in ids})
    outside = [n for n in modules if not any(n in held for held in inside)]
    if outside:
        raise InputError(
            f"collect_sensitivity_blockwise: {', '.join(outside[:3])} are not inside the blocks "
            f"of {container}"
        )
    gen = torch.Generator().manual_seed(seed)
    parts: list[_Part] = []
    per_batch: list[tuple[list[int], int, int]] = []  # (its parts, tokens, sequences)
    for batch in batches:
        first = _first_tensor(batch)
        sequences = first.shape[0] if first is not None and first.dim() else 1
        per_batch.append(([], batch_tokens(batch), sequences))
        for part, seqs in _micro_batches(batch, micro_batch_tokens):
            per_batch[-1][0].append(len(parts))
            parts.append(_Part(part, seqs, batch_tokens(part), padding_mask(part)))
    results: dict[str, Sensitivity] = {}
    params = list(model.parameters())
    with restored_flags(model.modules(), params):
        model.eval()
        for p in params:
            p.requires_grad_(False)
        chain = capture_chain(model, container, list(blocks), [p.batch for p in parts])
        if chain is None:
            raise InputError(
                f"the blocks of {container} cannot be run one at a time (the first block's "
                "output is not the second block's input): the block-by-block gradient pass "
                "needs them to"
            )
        stashed: dict[int, list[Any]] = {}
        hidden = chain.hidden
        chain.hidden = []
        for i, block in enumerate(blocks):  # forward: each block's input stashed
            stashed[i] = [stash_tensor(h, stash) for h in hidden]
            with block_scope(i), torch.no_grad():
                hidden = [chain.run(block, p, h) for p, h in enumerate(hidden)]
            release_free_heap()
        grads = _head_gradients(model, chain, parts, per_batch, hidden, objective,
                                grad_tokens, gen)  # fmt: skip
        del hidden
        for i in reversed(range(len(blocks))):  # backward: one block at a time, the last first
            inputs = [unstash(h) for h in stashed.pop(i)]
            with block_scope(i):
                found = _block_moments(chain, i, inside[i], parts, inputs, grads, project)
                if on_block is not None:
                    on_block(i, found)
                else:
                    results.update(found)
                del found
            del inputs
            release_free_heap()
    return results


def _head_gradients(
    model: nn.Module,
    chain: BlockChain,
    parts: list[_Part],
    per_batch: list[tuple[list[int], int, int]],
    last: list[torch.Tensor],
    objective: str,
    grad_tokens: int,
    gen: torch.Generator,
) -> list[torch.Tensor | None]:
    """The probe gradient at the last block's output, per micro-batch (None where the
    output does not depend on it): the token subsets and draws made batch by batch in
    :meth:`_GradientPass.run`'s order. Checked on the first micro-batch: the head run on
    the last block's output gives the model's own output."""
    check = parts[0]
    with torch.no_grad():
        whole = main_output(run_batch(model, check.batch))
        with _blocks_replaced(model, chain.container, last[0], chain.returns_tuple):
            head = main_output(run_batch(model, check.batch))
    if whole.shape != head.shape or not torch.allclose(whole, head, rtol=1e-4, atol=1e-4):
        raise InputError(
            "the model's output is not a function of its last block's output alone (its "
            "head reads something else the blocks make): the block-by-block gradient pass "
            "cannot run it"
        )
    del whole, head
    grads: list[torch.Tensor | None] = [None] * len(parts)
    for indices, n, sequences in per_batch:
        pick = None
        if n > grad_tokens:
            pick = torch.randperm(n, generator=gen)[:grad_tokens].sort().values
        draws = _Draws(gen, sequences)
        start = 0
        for p in indices:
            part = parts[p]
            if pick is not None:
                part.pick = pick[(pick >= start) & (pick < start + part.rows)] - start
            start += part.rows
            h = last[p].detach().requires_grad_()
            with (
                torch.enable_grad(),
                _blocks_replaced(model, chain.container, h, chain.returns_tuple),
            ):
                out = run_batch(model, part.batch)
                y = main_output(out)
                if not y.requires_grad:
                    continue
                resolved = objective
                if resolved == "auto":
                    resolved = "kl" if has_logits(out) else "mse"
                noise = functools.partial(draws.take, sequences=part.sequences)
                grad = _probe_grad(y, resolved, part.mask, noise)
                torch.autograd.backward(y, grad, inputs=[h])
            grads[p] = h.grad
            del out, y, grad, h
            release_free_heap()
    return grads


def _block_moments(
    chain: BlockChain,
    i: int,
    modules: dict[str, nn.Module],
    parts: list[_Part],
    inputs: list[torch.Tensor],
    grads: list[torch.Tensor | None],
    project: bool,
) -> dict[str, Sensitivity]:
    """Block ``i`` run again on its stashed ``inputs`` with a gradient: its layers' moments;
    ``grads`` (at its output) become the gradients at its input, in place."""
    gradient_pass = _GradientPass("auto", 0, torch.Generator(), project)
    handles = [m.register_forward_hook(gradient_pass.hook_for(n, m)) for n, m in modules.items()]
    block = chain.blocks[i]
    try:
        for p, part in enumerate(parts):
            if grads[p] is None:
                continue
            gradient_pass.mask, gradient_pass.rows, gradient_pass.pick = (
                part.mask, part.rows, part.pick,
            )  # fmt: skip
            h = inputs[p].detach().requires_grad_()
            try:
                with torch.enable_grad():
                    out = chain.run(block, p, h)
                    gradient_pass.inputs.flush()
                    torch.autograd.backward(out, grads[p], inputs=[h])
            finally:
                gradient_pass.clear()
            grads[p] = h.grad
            del out, h
            release_free_heap()
    finally:
        for handle in handles:
            handle.remove()
    if not modules:
        return {}
    try:
        return gradient_pass.result(modules)
    except InputError:  # no gradient reached this block's layers
        return {}
