"""Propagated (sequential) conversion: each layer is factorized for the inputs it will
really see once the layers before it are factorized.

Whitening (``factorize(..., input_cov=C)``) minimises each layer's output error on the
*original* model's inputs ``x``. After conversion, a layer receives ``x̂``, the output of
already-factorized layers, and the errors compound through the depth. Propagated
conversion walks the layers in forward order and minimises ``E‖W·x − Ŵ·x̂‖²``, anchored to
the original model's output: each layer also corrects the drift of its inputs
(the closed form of SVD-LLM's update and AA-SVD; see :func:`~lowrank_layers.factorize`'s
``cross_cov``).

How it runs (:func:`convert_propagated`):

1. The model's repeated blocks are found (:func:`~lowrank_layers.blocks.find_blocks`) and
   the first block's input is captured once per calibration batch. Two streams of hidden
   states then flow block by block: the original model's ``H`` and the converted one's
   ``Ĥ``.
2. For each block: the original (still dense) block runs on ``H``; the inputs ``X`` of its
   layers are kept (tokens under ``attention_mask == 0`` dropped) and ``H`` advances.
3. The block's layers are grouped into *stages* by shared input (attention's q/k/v, an
   MLP's gate/up), in forward order. For each stage, the block, with the earlier stages
   already converted, runs on ``Ĥ`` until it reaches the stage (a hook ends the pass
   there); ``E[x̂ x̂ᵀ]`` and ``E[x x̂ᵀ]`` give the stage's layers their factors.
4. The converted block runs on ``Ĥ``, which advances.

Memory: the model, once, plus the two streams of hidden states and one block's layer
inputs for the calibration tokens (SmolLM2-135M with 16k tokens: about 0.3 GB). Layers
outside the blocks (a pooler, an output head) are converted with their statistics from a
whole-model pass on each side.

Models larger than memory load one block at a time (the chain only ever touches one
block): :mod:`~lowrank_layers.offload` passes a ``block_scope`` that loads each block's
weights from disk before its conversion, and writes out and releases the converted block
after.
"""

from __future__ import annotations

import contextlib
import dataclasses
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .blocks import BlockChain, StopForward, capture_chain, find_blocks, stash_tensor, unstash
from .calibrate import collect_input_stats, token_rows
from .common import InputError, progress_bar
from .memory import release_free_heap

__all__ = ["PropagatedStats", "PropagationReport", "convert_propagated"]


@dataclass
class PropagatedStats:
    """What one layer is factorized from (all float64, means over tokens).

    Attributes:
        input_cov: ``E[x̂ x̂ᵀ]``, the inputs of the partially converted model.
        cross_cov: ``E[x x̂ᵀ]`` (None when ``x̂ = x``, outside the propagation); ``(in, k)``
            when the converted input has ``k`` features (a narrowed MLP's output layer).
        target_energy: ``E‖W·x‖²``, the original layer's output energy on the original
            inputs (None with ``cross_cov``); the denominator of the relative error.
        tokens: how many tokens were averaged.
    """

    input_cov: torch.Tensor
    cross_cov: torch.Tensor | None
    target_energy: float | None
    tokens: int


@dataclass
class PropagationReport:
    """How the propagation ran.

    Attributes:
        container: the block container walked (None when no blocks were found).
        blocks: how many blocks.
        propagated: layers converted with propagated statistics.
        unpropagated: layers converted from the original model's statistics only (outside
            the blocks, or every layer when the model cannot be processed block by block).
        note: why propagation did not apply, when it did not.
        seconds: wall time.
    """

    container: str | None
    blocks: int
    propagated: list[str]
    unpropagated: list[str]
    note: str | None
    seconds: float


ConvertFn = Callable[[str, nn.Module, PropagatedStats], None]


def convert_propagated(
    model: nn.Module,
    batches: Sequence[Any],
    layers: Mapping[str, nn.Module],
    convert: ConvertFn,
    *,
    progress: bool = False,
    block_scope: Callable[[int], contextlib.AbstractContextManager[Any]] | None = None,
    stash: Path | None = None,
) -> PropagationReport:
    """Convert ``layers`` in forward order, each from propagated statistics.

    Args:
        model: the model; converted in place by ``convert``.
        batches: calibration batches (see :func:`~lowrank_layers.calibrate.run_batch`),
            run several times, so a sequence, not a one-shot iterator.
        layers: ``{name: nn.Linear}`` to convert.
        convert: ``convert(name, module, stats)`` factorizes one layer and puts the result
            in the model in its place (or leaves it dense).
        progress: a tqdm bar over the blocks.
        block_scope: ``block_scope(i)`` is entered around the conversion of block ``i``
            (:mod:`~lowrank_layers.offload` loads its weights there, and writes out and
            releases the converted block on leaving); None: nothing around it.
        stash: a folder for each block's layer inputs, written as the original block runs
            and read back (and removed) at their stage; None: kept in memory.

    Returns:
        A :class:`PropagationReport`.

    Raises:
        ValueError: ``batches`` is empty or not a sequence.
    """
    start = time.perf_counter()
    if not isinstance(batches, Sequence) or isinstance(batches, (str, bytes)):
        raise InputError(
            "propagated conversion runs the calibration batches several times: pass a list "
            f"of batches, got a {type(batches).__name__}"
        )
    if len(batches) == 0:
        raise InputError("propagated conversion: the calibration batches are empty")
    names = list(layers)
    chain, note = _find_chain(model, names, batches)
    inside = _layers_by_block(chain, layers)
    in_blocks = {n for ns in inside.values() for n in ns}
    outside = [n for n in names if n not in in_blocks]

    # layers outside the blocks: their original statistics from one whole-model pass now
    outside_stats = {}
    if outside:
        stats = collect_input_stats(model, batches, {n: layers[n] for n in outside})
        outside_stats = {n: s for n, s in stats.items() if s.tokens}
    propagated: list[str] = []
    if chain is not None:
        iterator: Sequence[int] | Any = range(len(chain.blocks))
        if progress:
            iterator = progress_bar(list(iterator), desc="propagating blocks", unit="block")
        original = list(chain.hidden)
        current = [h.clone() for h in chain.hidden]
        for i in iterator:
            block_layers = {n: layers[n] for n in inside[i]}
            with block_scope(i) if block_scope is not None else contextlib.nullcontext():
                original = _convert_block(
                    chain, i, block_layers, original, current, convert, propagated, stash
                )
            release_free_heap()  # the block's inputs, freed
    for name in outside:
        stats = outside_stats.get(name)
        if stats is None:
            continue  # no input reached it: the caller factorizes it without statistics
        cov = stats.covariance
        convert(name, layers[name], PropagatedStats(cov, None, None, stats.tokens))
    return PropagationReport(
        container=None if chain is None else chain.container,
        blocks=0 if chain is None else len(chain.blocks),
        propagated=propagated,
        unpropagated=[n for n in names if n not in propagated],
        note=note,
        seconds=time.perf_counter() - start,
    )


def _find_chain(
    model: nn.Module, names: list[str], batches: Sequence[Any]
) -> tuple[BlockChain | None, str | None]:
    """The block chain holding the most of ``names`` with its captured inputs, or None and
    why propagation does not apply."""
    found = find_blocks(model, names)
    if found is None:
        return None, "no repeated blocks hold two or more of the layers"
    chain = capture_chain(model, found[0], found[1], batches)
    if chain is None:
        return None, (
            f"the blocks of {found[0]} cannot be run one at a time (the first block's "
            "output is not the second block's input)"
        )
    return chain, None


def _layers_by_block(
    chain: BlockChain | None, layers: Mapping[str, nn.Module]
) -> dict[int, list[str]]:
    """``{block index: names of the layers inside it}`` (empty without a chain)."""
    inside: dict[int, list[str]] = {}
    if chain is not None:
        for i, block in enumerate(chain.blocks):
            ids = {id(m) for m in block.modules()}
            inside[i] = [n for n in layers if id(layers[n]) in ids]
    return inside


class _OriginalPass:
    """Hooks on one block's layers while the original block runs: each layer's input
    tokens, grouped by shared input tensor (groups in first-call order), its calls, and
    its output energy ``Σ‖W·x‖²`` (the bias taken off)."""

    def __init__(self, layers: dict[str, nn.Module], stash: Path | None = None) -> None:
        self.layers = layers
        self.stash = stash
        self.inputs: dict[str, list[Any]] = {}  # group key -> per batch tokens (or Stashed)
        self.group_of: dict[str, str] = {}
        self.order: list[str] = []  # groups in first-call order
        self.calls: dict[str, int] = {}
        self.energy: dict[str, float] = dict.fromkeys(layers, 0.0)
        self.mask: torch.Tensor | None = None  # the current batch's attention_mask
        self._seen: dict[tuple[int, int], str] = {}
        self._keep: list[torch.Tensor] = []  # holds each seen input so its id is not reused

    def _record(self, name: str) -> Callable[[nn.Module, tuple], None]:
        def hook(module: nn.Module, args: tuple) -> None:
            x = args[0]
            self.calls[name] = self.calls.get(name, 0) + 1
            key = (id(x), x._version)
            group = self._seen.get(key)
            if group is None:
                group = self._seen[key] = name
                self._keep.append(x)
                rows = stash_tensor(token_rows(x, self.mask), self.stash)
                self.inputs.setdefault(group, []).append(rows)
                if group not in self.order:
                    self.order.append(group)
            self.group_of.setdefault(name, group)

        return hook

    def _output_energy(self, name: str) -> Callable[[nn.Module, tuple, torch.Tensor], None]:
        def hook(module: nn.Module, args: tuple, out: torch.Tensor) -> None:
            y = out.detach()
            bias = getattr(module, "bias", None)
            if isinstance(bias, torch.Tensor):
                y = y - bias.detach()
            self.energy[name] += float(token_rows(y, self.mask).double().square().sum())

        return hook

    def run(
        self, chain: BlockChain, block: nn.Module, original: list[torch.Tensor]
    ) -> list[torch.Tensor]:
        """Run ``block`` on every batch of the original stream; its next hidden states."""
        handles = [m.register_forward_pre_hook(self._record(n)) for n, m in self.layers.items()]
        handles += [m.register_forward_hook(self._output_energy(n)) for n, m in self.layers.items()]
        nxt = []
        try:
            with torch.no_grad():
                for b in range(len(original)):
                    self.mask = chain.masks[b]
                    self._seen.clear()
                    self._keep.clear()
                    nxt.append(chain.run(block, b, original[b]))
        finally:
            for h in handles:
                h.remove()
            self._keep.clear()
        return nxt

    def stages(self) -> dict[str, list[str]]:
        """``{group: its layers}``, groups in first-call order."""
        return {g: [n for n in self.layers if self.group_of.get(n) == g] for g in self.order}


def _convert_block(
    chain: BlockChain,
    i: int,
    layers: dict[str, nn.Module],
    original: list[torch.Tensor],
    current: list[torch.Tensor],
    convert: ConvertFn,
    done: list[str],
    stash: Path | None = None,
) -> list[torch.Tensor]:
    """Convert one block's layers stage by stage; advance ``current`` in place and return
    the original stream's next hidden states."""
    block = chain.blocks[i]
    # 1. the original block: each layer's input, grouped by shared input tensor
    seen = _OriginalPass(layers, stash)
    nxt = seen.run(chain, block, original)
    if not any(x.shape[0] for xs in seen.inputs.values() for x in xs) and layers:
        raise InputError(
            "propagated conversion: the calibration batches yielded no tokens for "
            f"{', '.join(list(layers)[:3])} (every token masked out by attention_mask?)"
        )
    stages = seen.stages()
    if not all(seen.calls.get(n, 0) == len(original) for n in layers):
        _convert_unpaired(seen, stages, convert)
        _advance(chain, block, current)
        return nxt
    # 2. stage by stage, on the converted stream
    for g in seen.order:
        members = stages[g]
        # every member is fed the same tensor: the first one's hook sees it for all
        first = members[0]
        stats = _stage_stats(chain, block, first, layers[first], seen.inputs.pop(g), current)
        for name in members:
            n = max(1, stats.tokens)
            target = seen.energy[name] / n
            convert(name, layers[name], dataclasses.replace(stats, target_energy=target))
            done.append(name)
        del stats
        release_free_heap()  # the stage's statistics and working matrices, freed
    _advance(chain, block, current)
    return nxt


def _convert_unpaired(
    seen: _OriginalPass, stages: dict[str, list[str]], convert: ConvertFn
) -> None:
    """A layer called several times per batch (or not at all): its inputs cannot be paired
    token by token; convert the block's layers from the original inputs."""
    for g in seen.order:
        X = torch.cat([unstash(x) for x in seen.inputs[g]])
        cov = (X.mT @ X).to(torch.float64) / max(1, X.shape[0])
        for n in stages[g]:
            convert(n, seen.layers[n], PropagatedStats(cov, None, None, X.shape[0]))


def _stage_stats(
    chain: BlockChain,
    block: nn.Module,
    name: str,
    layer: nn.Module,
    inputs: list[Any],
    current: list[torch.Tensor],
) -> PropagatedStats:
    """Run ``block`` on the converted stream up to ``layer``; its propagated statistics
    (``inputs``: the original inputs per batch, tensors or
    :class:`~lowrank_layers.blocks.Stashed`)."""
    # the converted layer's input may be narrower than the original's (a narrowed MLP's
    # output layer, lowrank_layers.narrow): E[x̂ x̂ᵀ] is (k, k), E[x x̂ᵀ] (in, k)
    d = inputs[0].shape[-1]
    dev = inputs[0].device
    hat: torch.Tensor | None = None
    cross: torch.Tensor | None = None
    count = 0
    b = 0

    def hook(module: nn.Module, args: tuple) -> None:
        nonlocal count, hat, cross
        xh = token_rows(args[0], chain.masks[b])
        x = unstash(inputs[b])
        if xh.shape[0] != x.shape[0]:
            raise RuntimeError(
                f"propagation: {name} saw {tuple(xh.shape)} tokens in the converted model "
                f"but {tuple(x.shape)} in the original"
            )
        if hat is None or cross is None:
            k = xh.shape[-1]
            hat = torch.zeros(k, k, dtype=torch.float64, device=dev)
            cross = torch.zeros(d, k, dtype=torch.float64, device=dev)
        # float32 products added into float64 sums (promoted element by element, no float64
        # temporary of the sums' size)
        hat.add_(xh.mT @ xh)
        cross.add_(x.mT @ xh)
        count += x.shape[0]
        raise StopForward

    handle = layer.register_forward_pre_hook(hook)
    try:
        with torch.no_grad():
            for b in range(len(current)):  # the hook reads b
                with contextlib.suppress(StopForward):
                    chain.run(block, b, current[b])
    finally:
        handle.remove()
    n = max(1, count)
    if hat is None or cross is None:  # no batch reached the layer
        hat = torch.zeros(d, d, dtype=torch.float64, device=dev)
        cross = torch.zeros_like(hat)
    return PropagatedStats(hat / n, cross / n, None, count)


def _advance(chain: BlockChain, block: nn.Module, current: list[torch.Tensor]) -> None:
    with torch.no_grad():
        for b in range(len(current)):
            current[b] = chain.run(block, b, current[b])
