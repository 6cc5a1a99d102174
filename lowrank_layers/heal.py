"""Healing: a short distillation of a converted model towards the original, ``heal``.

A low-rank conversion loses some of the model's accuracy; a few hundred optimizer steps
that pull the converted model (the student) back towards the original (the teacher)
recover much of it, training only the factors (and optionally the biases and norms).

Two modes:

- ``"end_to_end"``: both models run on each batch; the student's output is pulled towards
  the teacher's (KL divergence of the next-token distributions for language models, cosine
  or normalised squared error of the hidden states otherwise).
- ``"blockwise"`` (layer-wise healing, as in Lillama or SVD-LLM's update step): the model
  is cut into its repeated blocks (see :mod:`~lowrank_layers.blocks`), and each student
  block in turn is trained so that, run on the student's own hidden states, it reproduces
  the teacher block's output on the teacher's hidden states. Errors are corrected where
  they arise, and no step runs more than one block.
"""

from __future__ import annotations

import contextlib
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from .adaptive import AdaptiveLowRankLinear
from .blocks import (
    BlockChain,
    capture_chain,
    find_blocks,
    has_logits,
    main_output,
)
from .calibrate import padding_mask, run_batch
from .checkpoint_format import is_narrowed
from .common import (
    InputError,
    check_int,
    check_module,
    check_positive,
    progress_bar,
    restored_flags,
)
from .dynamic import DynamicLowRankLinear
from .linear import FACTOR_NAMES, LowRankLinear

__all__ = [
    "HealReport",
    "check_heal_options",
    "distillation_loss",
    "heal",
    "trainable_parameters",
]

OBJECTIVES = ("auto", "kl", "cosine", "mse")
MODES = ("end_to_end", "blockwise")
TRAIN_GROUPS = ("factors", "biases", "norms")
NORM_TYPES: tuple[type[nn.Module], ...] = (nn.LayerNorm, nn.RMSNorm, nn.GroupNorm)


@dataclass
class HealReport:
    """What :func:`heal` did.

    Attributes:
        mode: ``"end_to_end"`` or ``"blockwise"``.
        objective: the distillation objective, ``"kl"``, ``"cosine"`` or ``"mse"`` (the
            one ``"auto"`` resolved to; blockwise training itself always uses a normalised
            squared error on the blocks' hidden states, this is the held-out metric).
        steps: optimizer steps taken (all blocks together for blockwise).
        seconds: wall time of the training (blockwise: the capture of the block inputs
            included), not counting the held-out evaluations.
        trainable_parameters: number of parameter elements trained.
        teacher_bytes: memory held by the teacher's parameters and buffers.
        before: held-out distillation loss on ``eval_batches`` before healing (``None``
            without ``eval_batches``).
        after: the same after healing.
        losses: the training loss of every step, in order.
    """

    mode: str
    objective: str
    steps: int
    seconds: float
    trainable_parameters: int
    teacher_bytes: int
    before: float | None = None
    after: float | None = None
    losses: list[float] = field(default_factory=list)

    def __str__(self) -> str:
        line = (
            f"healed ({self.mode}, {self.objective}): {self.steps} steps in "
            f"{self.seconds:.1f} s, {self.trainable_parameters:,} trainable parameters, "
            f"teacher {self.teacher_bytes / 2**20:.1f} MiB"
        )
        if self.before is None or self.after is None:
            return line
        change = ""
        if self.before > 0:
            change = f" ({100 * (self.after - self.before) / self.before:+.1f}%)"
        return f"{line}\nheld-out loss {self.before:.4g} -> {self.after:.4g}{change}"


# --------------------------------------------------------------------------------------
# the objective


def _masked_mean(values: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """Mean of per-token ``values`` over the tokens ``mask`` keeps (all of them when ``mask``
    is None or not of ``values``' shape)."""
    if mask is None or mask.shape != values.shape:
        return values.mean()
    keep = mask.to(device=values.device, dtype=values.dtype)
    return (values * keep).sum() / keep.sum().clamp_min(1)


def _at_least_float32(x: torch.Tensor) -> torch.Tensor:
    return x.to(torch.promote_types(x.dtype, torch.float32))


def distillation_loss(
    student: torch.Tensor,
    teacher: torch.Tensor,
    objective: str,
    mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """The distance of ``student``'s outputs from ``teacher``'s, a mean over tokens.

    Per token (a vector along the last dimension), in float32 (float64 inputs stay float64):

    - ``"kl"``: ``KL(softmax(teacher) ‖ softmax(student))``;
    - ``"cosine"``: ``1 - cos(student, teacher)``;
    - ``"mse"``: ``‖student - teacher‖²``, and the mean is divided by the mean of
      ``‖teacher‖²`` (so 1 is the error of predicting zeros, whatever the scale).

    Args:
        student: the student's output, ``(*, D)``.
        teacher: the teacher's output, of the same shape.
        objective: ``"kl"``, ``"cosine"`` or ``"mse"``.
        mask: ``(*)`` with ``0`` at padding tokens, left out of the means (a batch's
            ``attention_mask``); ignored when its shape is not ``student.shape[:-1]``.

    Returns:
        A scalar tensor, differentiable with respect to ``student``.

    Raises:
        ValueError: ``objective`` is unknown, or the shapes differ.
    """
    if objective not in OBJECTIVES[1:]:
        raise InputError(f"objective must be one of {', '.join(OBJECTIVES[1:])}, got {objective!r}")
    if student.shape != teacher.shape:
        raise InputError(
            f"the student's output has shape {tuple(student.shape)} and the teacher's "
            f"{tuple(teacher.shape)}; they must be equal"
        )
    s, t = _at_least_float32(student), _at_least_float32(teacher.detach())
    if objective == "kl":
        per_token = F.kl_div(
            F.log_softmax(s, dim=-1), F.log_softmax(t, dim=-1), reduction="none", log_target=True
        ).sum(-1)
        return _masked_mean(per_token, mask)
    if objective == "cosine":
        return _masked_mean(1 - F.cosine_similarity(s, t, dim=-1), mask)
    error = _masked_mean((s - t).square().sum(-1), mask)
    scale = _masked_mean(t.square().sum(-1), mask)
    return error / scale.clamp_min(torch.finfo(scale.dtype).tiny)


# --------------------------------------------------------------------------------------
# what is trained


def _is_lowrank(module: nn.Module) -> bool:
    if isinstance(module, AdaptiveLowRankLinear):
        return module.is_lowrank
    return isinstance(module, (LowRankLinear, DynamicLowRankLinear))


def _is_compressed(module: nn.Module) -> bool:
    """A layer the conversion changed: low rank, or a layer of an MLP cut in width."""
    return _is_lowrank(module) or is_narrowed(module)


def _is_norm(module: nn.Module) -> bool:
    # model families define their own norms (LlamaRMSNorm, T5LayerNorm): known by name
    return isinstance(module, NORM_TYPES) or type(module).__name__.endswith("Norm")


def _check_train(train: Sequence[str]) -> tuple[str, ...]:
    groups = (train,) if isinstance(train, str) else tuple(train)
    for group in groups:
        if group not in TRAIN_GROUPS:
            raise InputError(
                f"heal: train entries must be among {', '.join(map(repr, TRAIN_GROUPS))}, "
                f"got {group!r}"
            )
    return groups


def trainable_parameters(model: nn.Module, train: Sequence[str]) -> dict[str, nn.Parameter]:
    """The parameters of ``model`` that :func:`heal` trains for ``train``.

    Args:
        model: the converted model.
        train: any of ``"factors"`` (``U``, ``S``, ``V``, ``D`` of every low-rank layer:
            ``LowRankLinear``, ``DynamicLowRankLinear``, ``AdaptiveLowRankLinear`` after
            its switch; and the weight of every layer of an MLP cut in width,
            :mod:`~lowrank_layers.narrow`), ``"biases"`` (those layers' biases) and
            ``"norms"`` (the parameters of ``nn.LayerNorm``, ``nn.RMSNorm``,
            ``nn.GroupNorm`` and of every module whose class name ends in ``Norm``, such as
            ``LlamaRMSNorm``).

    Returns:
        ``{qualified name: parameter}``, in ``named_modules()`` order; a parameter held at
        several places appears once.

    Raises:
        ValueError: an entry of ``train`` is unknown.
    """
    groups = _check_train(train)
    chosen: dict[str, nn.Parameter] = {}
    seen: set[int] = set()
    for name, module in model.named_modules():
        names: list[str] = []
        if _is_compressed(module):
            if "factors" in groups:
                names += ["weight"] if is_narrowed(module) else FACTOR_NAMES
            if "biases" in groups:
                names.append("bias")
        elif "norms" in groups and _is_norm(module):
            names += [n for n, _ in module.named_parameters(recurse=False)]
        for pname in names:
            param = module._parameters.get(pname)
            if param is not None and id(param) not in seen:
                seen.add(id(param))
                chosen[f"{name}.{pname}" if name else pname] = param
    return chosen


# --------------------------------------------------------------------------------------
# the loop


class _BatchOrder:
    """Batch indices in a seeded random order, a fresh permutation every epoch."""

    def __init__(self, n: int, seed: int) -> None:
        self.n = n
        self.gen = torch.Generator().manual_seed(seed)
        self.queue: list[int] = []

    def next(self) -> int:
        if not self.queue:
            self.queue = torch.randperm(self.n, generator=self.gen).tolist()[::-1]
        return self.queue.pop()


class _Trainer:
    """One AdamW over ``params``; ``run(loss_fn, steps, seconds)`` steps it to a budget."""

    def __init__(
        self, params: list[nn.Parameter], lr: float, max_grad_norm: float | None, bar: Any
    ) -> None:
        self.params = params
        self.optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
        self.max_grad_norm = max_grad_norm
        self.bar = bar

    def run(
        self, loss_fn: Callable[[], torch.Tensor], steps: int | None, seconds: float | None
    ) -> list[float]:
        losses: list[float] = []
        start = time.perf_counter()
        while steps is None or len(losses) < steps:
            if losses and seconds is not None and time.perf_counter() - start >= seconds:
                break
            loss = loss_fn()
            value = float(loss.detach())
            if not math.isfinite(value):
                raise FloatingPointError(
                    f"heal: the training loss is {value} at step {len(losses) + 1}; "
                    "lower lr or max_grad_norm"
                )
            self.optimizer.zero_grad(set_to_none=True)
            loss.backward()
            if self.max_grad_norm is not None:
                nn.utils.clip_grad_norm_(self.params, self.max_grad_norm)
            self.optimizer.step()
            losses.append(value)
            if self.bar is not None:
                self.bar.update(1)
                self.bar.set_postfix(loss=f"{value:.4g}", refresh=False)
        self.optimizer.zero_grad(set_to_none=True)
        return losses


@torch.no_grad()
def _evaluate(
    student: nn.Module, teacher: nn.Module, batches: Sequence[Any], objective: str
) -> float:
    """The distillation loss over ``batches``, each batch weighted by its kept tokens."""
    total = weight = 0.0
    for batch in batches:
        s = main_output(run_batch(student, batch))
        t = main_output(run_batch(teacher, batch))
        mask = padding_mask(batch)
        tokens = s.shape[:-1].numel()
        if mask is not None and mask.shape == s.shape[:-1]:
            tokens = int(mask.count_nonzero())
        total += tokens * float(distillation_loss(s, t, objective, mask))
        weight += tokens
    return total / max(weight, 1.0)


@dataclass
class _Run:
    """What each training mode of :func:`heal` needs: the models, the training batches in
    their seeded order, a trainer for given parameters and the step or time budget."""

    student: nn.Module
    teacher: nn.Module
    batches: Sequence[Any]
    order: _BatchOrder
    make_trainer: Callable[[list[nn.Parameter]], _Trainer]
    steps: int | None
    seconds: float | None


def _train_end_to_end(run: _Run, objective: str, params: list[nn.Parameter]) -> list[float]:
    def loss_fn() -> torch.Tensor:
        batch = run.batches[run.order.next()]
        with torch.no_grad():
            t = main_output(run_batch(run.teacher, batch))
        s = main_output(run_batch(run.student, batch))
        return distillation_loss(s, t, objective, padding_mask(batch))

    return run.make_trainer(params).run(loss_fn, run.steps, run.seconds)


def _blocks_of(
    student: nn.Module, teacher: nn.Module, chosen: dict[int, nn.Parameter]
) -> tuple[str, list[nn.Module], list[nn.Module]]:
    """The student's block container, its blocks and the teacher's matching blocks."""
    layers = [name for name, m in student.named_modules() if _is_compressed(m)]
    found = find_blocks(student, layers)
    if found is None:
        raise InputError(
            f"heal: mode='blockwise' found no repeated blocks in the {type(student).__name__} "
            "(an nn.ModuleList or nn.Sequential of at least two modules of one type holding "
            "its low-rank or cut layers), so it cannot be processed block by block; use "
            "mode='end_to_end'"
        )
    container, blocks = found
    try:
        theirs = teacher.get_submodule(container) if container else teacher
    except AttributeError:
        theirs = None
    if not isinstance(theirs, (nn.ModuleList, nn.Sequential)) or len(theirs) != len(blocks):
        raise InputError(
            f"heal: mode='blockwise' needs the teacher to hold {len(blocks)} blocks at "
            f"{container or 'its root'!r}, as the student does; it does not"
        )
    if not any(id(p) in chosen for block in blocks for p in block.parameters()):
        raise InputError(
            f"heal: mode='blockwise' trains the parameters inside the blocks of {container!r}, "
            "and none of the selected parameters is there; use mode='end_to_end'"
        )
    return container, blocks, list(theirs)


def _chain(
    model: nn.Module, who: str, container: str, blocks: list[nn.Module], batches: Sequence[Any]
) -> BlockChain:
    chain = capture_chain(model, container, blocks, batches)
    if chain is None:
        raise InputError(
            f"heal: the {who} cannot be processed block by block: its first block, run on "
            f"its captured input, does not reproduce the input of the second "
            f"({_block_name(container, 1)}; a block passing more than hidden states on, or "
            "taking them by keyword); use mode='end_to_end'"
        )
    return chain


def _block_name(container: str, index: int) -> str:
    return f"{container}.{index}" if container else str(index)


def _train_blockwise(
    run: _Run,
    blocks: tuple[str, list[nn.Module], list[nn.Module]],
    chosen: dict[int, nn.Parameter],
) -> list[float]:
    container, mine, theirs = blocks
    ours = _chain(run.student, "student", container, mine, run.batches)
    target = _chain(run.teacher, "teacher", container, theirs, run.batches)
    s_stream, t_stream = ours.hidden, target.hidden  # advanced in place, block by block
    trained = [
        k for k, block in enumerate(mine) if any(id(p) in chosen for p in block.parameters())
    ]
    losses: list[float] = []
    for k, (s_block, t_block) in enumerate(zip(mine, theirs, strict=True)):
        with torch.no_grad():
            for i in range(len(run.batches)):
                t_stream[i] = target.run(t_block, i, t_stream[i])
        if k in trained:
            j = trained.index(k)
            block_steps = None
            if run.steps is not None:
                block_steps = run.steps // len(trained) + int(j < run.steps % len(trained))
            block_seconds = None if run.seconds is None else run.seconds / len(trained)

            def loss_fn(block: nn.Module = s_block) -> torch.Tensor:
                i = run.order.next()
                out = ours.run(block, i, s_stream[i])
                return distillation_loss(out, t_stream[i], "mse", ours.masks[i])

            params = [p for p in s_block.parameters() if id(p) in chosen]
            losses += run.make_trainer(params).run(loss_fn, block_steps, block_seconds)
        with torch.no_grad():
            for i in range(len(run.batches)):
                s_stream[i] = ours.run(s_block, i, s_stream[i])
    return losses


# --------------------------------------------------------------------------------------
# the verb


def check_heal_options(
    *, objective: str, mode: str, steps: int | None, seconds: float | None, lr: float
) -> None:
    """Validate :func:`heal`'s options without a model, so a caller such as
    :func:`~lowrank_layers.compress` can refuse bad ones before it changes anything.

    Raises:
        ValueError: an unknown objective or mode, no or a bad step/seconds budget, or a
            learning rate that is not a positive number.
    """
    for name, value, allowed in (("objective", objective, OBJECTIVES), ("mode", mode, MODES)):
        if value not in allowed:
            raise InputError(f"heal: {name} must be one of {', '.join(allowed)}, got {value!r}")
    _check_budget(steps, seconds)
    check_positive("heal: lr", lr)


def _check_budget(steps: int | None, seconds: float | None) -> None:
    if steps is None and seconds is None:
        raise InputError("heal: give steps, seconds or both; both are None")
    check_int("heal: steps", steps, optional=True)
    check_positive("heal: seconds", seconds, optional=True)


def _nbytes(model: nn.Module) -> int:
    tensors = [*model.parameters(), *model.buffers()]
    return sum(t.numel() * t.element_size() for t in tensors)


def _check_call(
    student: nn.Module,
    teacher: nn.Module,
    batches: Sequence[Any],
    eval_batches: Sequence[Any] | None,
    *,
    seed: int,
    max_grad_norm: float | None,
) -> None:
    """:func:`heal`'s checks of its models, batches, seed and clipping norm."""
    check_module("student", student, "heal(student, teacher, batches)")
    check_module("teacher", teacher, "heal(student, teacher, batches)")
    check_positive("heal: max_grad_norm", max_grad_norm, optional=True)
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise InputError(f"heal: seed must be an int, got {seed!r}")
    if len(batches) == 0:
        raise InputError("heal: batches is empty")
    if eval_batches is not None and len(eval_batches) == 0:
        raise InputError("heal: eval_batches is empty (pass None to skip the evaluation)")
    if student is teacher:
        raise InputError("heal: student and teacher are the same module; deep-copy the model")


def _chosen_parameters(
    student: nn.Module, teacher: nn.Module, train: Sequence[str]
) -> dict[int, nn.Parameter]:
    """The parameters ``train`` selects in ``student``, by id; an error when there are none
    or one of them is also the teacher's."""
    params = trainable_parameters(student, train)
    if not params:
        raise InputError(
            f"heal: nothing to train: train={tuple(_check_train(train))} selects no parameter "
            f"of the {type(student).__name__} (factors and biases are those of lowrank_layers "
            "layers and of MLP layers cut in width, norms those of normalisation modules)"
        )
    teacher_ids = {id(p) for p in teacher.parameters()}
    shared = [name for name, p in params.items() if id(p) in teacher_ids]
    if shared:
        raise InputError(
            f"heal: {len(shared)} trainable parameters ({', '.join(shared[:3])}"
            f"{', ...' if len(shared) > 3 else ''}) are shared with the teacher, which must "
            "stay unchanged; deep-copy the model before converting it"
        )
    return {id(p): p for p in params.values()}


def _closing(bar: Any) -> Any:
    """A context that closes the progress ``bar`` (when there is one) on exit."""
    return contextlib.nullcontext() if bar is None else contextlib.closing(bar)


def _resolve_objective(student: nn.Module, teacher: nn.Module, batch: Any, objective: str) -> str:
    """Run both models on ``batch`` (an error when their outputs differ in shape); the
    objective, ``"auto"`` resolved (``"kl"`` when both outputs have logits, else
    ``"cosine"``)."""
    with torch.no_grad():
        s_raw, t_raw = run_batch(student, batch), run_batch(teacher, batch)
        s_shape, t_shape = main_output(s_raw).shape, main_output(t_raw).shape
    if s_shape != t_shape:
        raise InputError(
            f"heal: the teacher's output on the first batch has shape {tuple(t_shape)}, "
            f"which does not match the student's {tuple(s_shape)}; the teacher must be "
            "the model the student was converted from"
        )
    if objective == "auto":
        return "kl" if has_logits(s_raw) and has_logits(t_raw) else "cosine"
    return objective


def _held_out(
    student: nn.Module, teacher: nn.Module, eval_batches: Sequence[Any] | None, objective: str
) -> float | None:
    """The held-out distillation loss, or None without ``eval_batches``."""
    return None if eval_batches is None else _evaluate(student, teacher, eval_batches, objective)


def heal(
    student: nn.Module,
    teacher: nn.Module,
    batches: Sequence[Any],
    *,
    objective: str = "auto",
    mode: str = "end_to_end",
    steps: int | None = None,
    seconds: float | None = None,
    lr: float = 1e-4,
    train: Sequence[str] = ("factors",),
    eval_batches: Sequence[Any] | None = None,
    seed: int = 0,
    progress: bool = False,
    max_grad_norm: float | None = 1.0,
) -> HealReport:
    """Distil ``teacher`` into the converted ``student`` for a few steps, in place.

    The selected parameters of ``student`` (``train``) are trained with AdamW
    (``weight_decay=0``), one batch per step, the batches cycled in a random order drawn
    from ``seed`` alone (``torch.manual_seed`` plays no part: the same call gives the same
    result). The selected parameters are trained whatever their ``requires_grad``; every
    other parameter of ``student`` is frozen meanwhile. Both models run in
    eval mode (no dropout: healing a pretrained model, dropout would only add noise), the
    teacher under ``torch.no_grad()``; each module's ``training`` flag and each student
    parameter's ``requires_grad`` are restored afterwards, also when an error is raised.
    Batches are fed as :func:`~lowrank_layers.calibrate.run_batch` does (a mapping as
    keyword arguments), and outputs compared through
    :func:`~lowrank_layers.blocks.main_output` (logits, else ``last_hidden_state``).

    ``mode="end_to_end"`` minimises ``objective`` on the models' outputs. ``"blockwise"``
    trains the student's repeated blocks (a decoder's layers) one at a time, in order: block
    ``k``, run on the student's hidden states, is pulled towards the teacher's block ``k``
    run on the teacher's hidden states (squared error normalised by the teacher output's
    mean squared norm, padding left out); then both streams advance through their block.
    The steps (or seconds) are split evenly over the blocks holding trainable parameters
    (the first ``steps % n`` of them get one more); low-rank layers outside the blocks (a
    language model's head) are not trained in this mode. The held-out metric is the
    end-to-end ``objective`` in both modes.

    Memory: the teacher is a full second copy of the model (``teacher_bytes`` in the
    report), and end-to-end steps hold the activations of both forwards and the student's
    backward. Blockwise additionally keeps two streams of block hidden states (student and
    teacher), each ``batch × tokens × hidden`` per training batch, for the whole run, and
    the blocks' other captured inputs (attention masks, position embeddings) per batch.

    Args:
        student: the converted model, trained in place.
        teacher: the original model; never changed.
        batches: the training batches, a sequence (indexed in a random order).
        objective: ``"kl"`` (KL(teacher ‖ student) of the softmax over the last
            dimension), ``"cosine"`` (1 − cosine similarity), ``"mse"`` (squared error
            normalised by the teacher's mean squared norm), each per token and averaged
            over the tokens a mapping batch's ``attention_mask`` keeps, in float32; or
            ``"auto"``: ``"kl"`` when the output has ``.logits``, else ``"cosine"``.
        mode: ``"end_to_end"`` or ``"blockwise"``.
        steps: number of optimizer steps, or None to stop on ``seconds`` alone.
        seconds: time budget of the training, or None to stop on ``steps`` alone; with
            both, whichever comes first. However short ``seconds``, one step is taken
            (blockwise: one per trained block).
        lr: AdamW's learning rate.
        train: what is trained, any of ``"factors"``, ``"biases"``, ``"norms"`` (see
            :func:`trainable_parameters`).
        eval_batches: held-out batches on which the distillation loss is measured before
            and after healing; None skips both measurements.
        seed: seed of the batch order.
        progress: show a tqdm progress bar (``pip install 'lowrank-layers[progress]'``).
        max_grad_norm: clip the gradients' total norm to this value; None: no clipping.

    Returns:
        A :class:`HealReport`.

    Raises:
        ValueError: an argument is out of range (unknown ``objective``, ``mode`` or
            ``train`` entry; ``steps`` and ``seconds`` both None; empty ``batches`` or
            ``eval_batches``); ``student`` is ``teacher`` or shares a trainable parameter
            with it; ``train`` selects no parameter; the outputs of the two models on the
            first batch differ in shape; or, for ``"blockwise"``, the models cannot be
            processed block by block. Each is raised before the models are changed.
        ImportError: ``progress=True`` without tqdm installed.
        FloatingPointError: the training loss became infinite or NaN (lower ``lr``); the
            steps taken before it stay in ``student``.

    Example:
        >>> import copy
        >>> import torch
        >>> from torch import nn
        >>> from lowrank_layers import convert_model
        >>> teacher = nn.Sequential(nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 16))
        >>> student = copy.deepcopy(teacher)
        >>> _ = convert_model(student, rank=4)  # the output layer stays dense (the guard)
        >>> [type(m).__name__ for m in student]
        ['LowRankLinear', 'ReLU', 'Linear']
        >>> batches = [torch.randn(8, 64) for _ in range(4)]
        >>> report = heal(student, teacher, batches, steps=10, lr=1e-3)
        >>> report.objective, report.steps
        ('cosine', 10)
    """
    check_heal_options(objective=objective, mode=mode, steps=steps, seconds=seconds, lr=lr)
    _check_call(student, teacher, batches, eval_batches, seed=seed, max_grad_norm=max_grad_norm)
    chosen = _chosen_parameters(student, teacher, train)
    bar = progress_bar(desc="healing", unit="step", total=steps) if progress else None
    modules = (*student.modules(), *teacher.modules())
    with restored_flags(modules, student.parameters()), _closing(bar):
        student.eval()
        teacher.eval()
        objective = _resolve_objective(student, teacher, batches[0], objective)
        blocks = _blocks_of(student, teacher, chosen) if mode == "blockwise" else None
        for p in student.parameters():
            p.requires_grad_(id(p) in chosen)
        before = _held_out(student, teacher, eval_batches, objective)
        run = _Run(
            student,
            teacher,
            batches,
            _BatchOrder(len(batches), seed),
            lambda ps: _Trainer(ps, lr, max_grad_norm, bar),
            steps,
            seconds,
        )
        start = time.perf_counter()
        if blocks is None:
            losses = _train_end_to_end(run, objective, list(chosen.values()))
        else:
            losses = _train_blockwise(run, blocks, chosen)
        elapsed = time.perf_counter() - start
        after = _held_out(student, teacher, eval_batches, objective)
    return HealReport(
        mode=mode,
        objective=objective,
        steps=len(losses),
        seconds=elapsed,
        trainable_parameters=sum(p.numel() for p in chosen.values()),
        teacher_bytes=_nbytes(teacher),
        before=before,
        after=after,
        losses=losses,
    )
