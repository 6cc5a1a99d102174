"""A model as a chain of repeated blocks: find them, capture their inputs, run one at a time.

Propagated conversion (:mod:`~lowrank_layers.propagate`) and block-wise healing
(:mod:`~lowrank_layers.heal`) work block by block: the input of the first block is
captured once per calibration batch, and each block is then run on its own, its output
feeding the next. Peak memory stays near one model plus one block's activations, and no
step runs the whole model more than once.

Nothing here knows a model family. The blocks are the children of the ``nn.ModuleList``
(or ``nn.Sequential``) holding the most of the layers to convert, all of one type (a
transformer's decoder layers, an encoder's layers, a ResNet stage's blocks). The chain is
checked on the first batch: the first block run on its captured input must give the input
the model itself feeds the second block. When it does not (a block that returns a value
the next one needs beside its hidden states, for example), :func:`capture_chain` says so
and callers fall back to whole-model passes.
"""

from __future__ import annotations

import contextlib
import itertools
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .calibrate import padding_mask, run_batch
from .common import InputError, InputTypeError

__all__ = [
    "BlockChain",
    "Stashed",
    "StopForward",
    "capture_chain",
    "find_blocks",
    "has_logits",
    "main_output",
    "stash_tensor",
    "unstash",
]


class StopForward(Exception):
    """Raised from a hook to end a forward pass early."""


def _field(outputs: Any, key: str) -> torch.Tensor | None:
    """``outputs.key`` or ``outputs[key]`` when it is a tensor, else None."""
    value = getattr(outputs, key, None)
    if value is None and isinstance(outputs, Mapping):
        value = outputs.get(key)
    return value if isinstance(value, torch.Tensor) else None


def has_logits(outputs: Any) -> bool:
    """Whether a model's output carries ``logits`` (an attribute or a mapping key)."""
    return _field(outputs, "logits") is not None


def main_output(outputs: Any) -> torch.Tensor:
    """The tensor a model's output is judged by: ``logits`` if present (language models),
    else ``last_hidden_state`` (encoders), else the output itself or its first element."""
    if isinstance(outputs, torch.Tensor):
        return outputs
    for key in ("logits", "last_hidden_state"):
        value = _field(outputs, key)
        if value is not None:
            return value
    if isinstance(outputs, Mapping):
        first = next((v for v in outputs.values() if isinstance(v, torch.Tensor)), None)
    elif isinstance(outputs, Sequence):
        first = next((v for v in outputs if isinstance(v, torch.Tensor)), None)
    else:
        first = None
    if first is None:
        raise InputTypeError(
            f"cannot find the output tensor in a {type(outputs).__name__}: return a tensor, a "
            "tuple starting with one, or an object with .logits or .last_hidden_state"
        )
    return first


def find_blocks(model: nn.Module, layer_names: Iterable[str]) -> tuple[str, list[nn.Module]] | None:
    """The repeated blocks holding the most of ``layer_names``.

    Returns ``(container name, blocks)`` for the ``nn.ModuleList`` / ``nn.Sequential`` with
    at least two children, all of one type, that holds the most of the named layers (ties:
    the outermost), or None when no container holds two or more of them.
    """
    names = list(layer_names)
    best: tuple[int, int, str, list[nn.Module]] | None = None
    for cname, container in model.named_modules():
        if not isinstance(container, (nn.ModuleList, nn.Sequential)) or len(container) < 2:
            continue
        children = list(container)
        if len({type(c) for c in children}) != 1:
            continue
        prefix = f"{cname}." if cname else ""  # the root holds every name
        held = sum(1 for n in names if n.startswith(prefix))
        depth = cname.count(".") if cname else -1
        if held >= 2 and (best is None or (held, -depth) > (best[0], best[1])):
            best = (held, -depth, cname, children)
    if best is None:
        return None
    return best[2], best[3]


def _first_tensor(value: Any) -> torch.Tensor:
    if isinstance(value, torch.Tensor):
        return value
    if isinstance(value, (tuple, list)) and value and isinstance(value[0], torch.Tensor):
        return value[0]
    raise InputTypeError(f"a block returned a {type(value).__name__}, not a tensor or a tuple")


def _drop_caches(kwargs: dict[str, Any]) -> dict[str, Any]:
    """Key/value caches captured with the inputs are dropped: re-running a block would
    append to them."""
    return {
        k: (None if type(v).__name__.endswith("Cache") else v)
        for k, v in kwargs.items()
        if k != "use_cache"
    }


@dataclass
class BlockChain:
    """The blocks of a model and the captured input of the first one, per batch.

    Attributes:
        container: the dotted name of the block container (``"model.layers"``).
        blocks: the blocks, in forward order.
        hidden: per batch, the hidden states entering the first block.
        args: per batch, the block's other positional arguments.
        kwargs: per batch, its keyword arguments (attention masks, position embeddings).
        masks: per batch, the batch's ``attention_mask`` (or None).
        returns_tuple: whether a block returns a tuple led by its hidden states (else the
            tensor alone).
    """

    container: str
    blocks: list[nn.Module]
    hidden: list[torch.Tensor]
    args: list[tuple]
    kwargs: list[dict[str, Any]]
    masks: list[torch.Tensor | None]
    returns_tuple: bool = False

    def run(self, block: nn.Module, i: int, hidden: torch.Tensor) -> torch.Tensor:
        """Run ``block`` on batch ``i``'s ``hidden`` states; its output hidden states."""
        return _first_tensor(block(hidden, *self.args[i], **self.kwargs[i]))

    def block_names(self) -> list[str]:
        prefix = f"{self.container}." if self.container else ""
        return [f"{prefix}{i}" for i in range(len(self.blocks))]


def capture_chain(
    model: nn.Module, container: str, blocks: list[nn.Module], batches: Sequence[Any]
) -> BlockChain | None:
    """Capture the first block's inputs for every batch, and check the chain on batch 0.

    Returns None when running ``blocks[0]`` on its captured input does not reproduce the
    input of ``blocks[1]`` (to float32 rounding), so block-by-block processing would not
    compute what the model computes.
    """
    captured: list[tuple[tuple, dict[str, Any]]] = []
    second: list[torch.Tensor] = []

    def first_hook(module: nn.Module, args: tuple, kwargs: dict[str, Any]) -> None:
        captured.append((args, kwargs))
        if len(captured) > 1:  # batch 0 continues to the second block, for the check
            raise StopForward

    def second_hook(module: nn.Module, args: tuple, kwargs: dict[str, Any]) -> None:
        hidden = args[0] if args else next(iter(kwargs.values()), None)
        if isinstance(hidden, torch.Tensor):
            second.append(hidden)
        raise StopForward

    masks: list[torch.Tensor | None] = []
    h1 = blocks[0].register_forward_pre_hook(first_hook, with_kwargs=True)
    h2 = blocks[1].register_forward_pre_hook(second_hook, with_kwargs=True)
    try:
        with torch.no_grad():
            for batch in batches:
                n = len(captured)
                with contextlib.suppress(StopForward):
                    run_batch(model, batch)
                if len(captured) != n + 1:
                    raise InputError(
                        f"the first block ({container}.0) ran {len(captured) - n} times for one "
                        "batch; block-by-block processing needs exactly one call per batch"
                    )
                masks.append(padding_mask(batch))
    finally:
        h1.remove()
        h2.remove()
    hidden, args, kwargs = [], [], []
    for a, kw in captured:
        if a and isinstance(a[0], torch.Tensor):
            hidden.append(a[0])
            args.append(tuple(a[1:]))
            kwargs.append(_drop_caches(kw))
        else:  # hidden states passed by keyword: not supported by the chain
            return None
    chain = BlockChain(container, blocks, hidden, args, kwargs, masks)
    if not second:
        return None
    with torch.no_grad():
        raw = blocks[0](hidden[0], *args[0], **kwargs[0])
    out = _first_tensor(raw)
    chain.returns_tuple = not isinstance(raw, torch.Tensor)
    ref = second[0]
    if out.shape != ref.shape or not torch.allclose(out, ref, rtol=1e-4, atol=1e-5):
        return None
    return chain


@dataclass
class Stashed:
    """A tensor kept in a file until it is needed (:func:`stash_tensor`): a model processed one
    block at a time from disk (:mod:`~lowrank_layers.offload`) keeps its blocks' hidden
    states and layer inputs there, not in memory. Read back once, then removed."""

    path: Path
    shape: torch.Size
    device: torch.device

    _count = itertools.count()

    def load(self) -> torch.Tensor:
        value = torch.load(self.path, weights_only=True).to(self.device)
        self.path.unlink()
        return value


def stash_tensor(tensor: torch.Tensor, folder: Path | None) -> torch.Tensor | Stashed:
    """``tensor`` written into ``folder`` (a :class:`Stashed`), or itself without one."""
    if folder is None:
        return tensor
    path = folder / f"stashed-{next(Stashed._count):08d}.pt"
    torch.save(tensor.detach().cpu().contiguous(), path)
    return Stashed(path, tensor.shape, tensor.device)


def unstash(value: torch.Tensor | Stashed) -> torch.Tensor:
    """The tensor :func:`stash_tensor` was given (read back, and its file removed)."""
    return value.load() if isinstance(value, Stashed) else value
