"""Which parent modules read a child's ``.weight``: the reader registry and the static check.

A low-rank layer's ``weight`` is formed from its factors whenever code computes with it
(:mod:`lowrank_layers.lazy_weight`), which makes the layer slower than the ``nn.Linear``
it replaced. Known readers:

- for its metadata only: transformers' T5 family (``T5DenseActDense``, mT5, UMT5, LongT5,
  SwitchTransformers, Pix2Struct, ...) checks ``isinstance(self.wo.weight, torch.Tensor)``
  and ``self.wo.weight.dtype`` before calling ``self.wo``;
- to decide on a fast path: ``nn.TransformerEncoderLayer`` (eval mode) gathers
  ``linear1.weight``/``linear2.weight`` and takes its fused kernel unless one of them
  ``has_torch_function``;
- to compute with it: ``nn.MultiheadAttention`` passes ``out_proj.weight`` to
  ``F.multi_head_attention_forward``.

At conversion time, :func:`weight_reader_policy` says what a parent does with a child's
weight: from the registry (:func:`register_weight_reader`, seeded with the cases above),
else from a static look at the source of the parent's ``forward`` (and the methods it
calls on ``self``) for ``self.<child>.weight``.
"""

from __future__ import annotations

import ast
import inspect
import textwrap
import weakref
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Literal

from torch import nn

from .common import InputError, InputTypeError

__all__ = [
    "READER_POLICIES",
    "ReaderPolicy",
    "WeightRead",
    "find_weight_readers",
    "register_weight_reader",
    "source_weight_reads",
    "weight_reader_policy",
]

ReaderPolicy = Literal["skip", "metadata", "materialize"]
READER_POLICIES: tuple[str, ...] = ("skip", "metadata", "materialize")


@dataclass(frozen=True)
class WeightRead:
    """What a parent module does with a child's ``.weight``, for ``convert_model``.

    Attributes:
        policy: ``"skip"``: the parent computes with the weight on every call; the child
            stays ``nn.Linear``. ``"metadata"``: it reads only metadata (dtype, shape,
            ``isinstance``, a ``has_torch_function`` test): converted, served without
            forming the weight. ``"materialize"``: converted although the parent computes
            with the weight (declared by the user): the dense weight is formed per use.
        reason: a one-line explanation for the conversion report.
        source: ``"registry"`` (built in or :func:`register_weight_reader`) or
            ``"source"`` (found by reading the parent's code).
    """

    policy: ReaderPolicy
    reason: str
    source: Literal["registry", "source"]


_REGISTRY: dict[type[nn.Module], dict[str, tuple[ReaderPolicy, str | None]]] = {
    nn.MultiheadAttention: {
        # F.multi_head_attention_forward computes out_proj with the weight, every call
        "out_proj": ("skip", None),
    },
    nn.TransformerEncoderLayer: {
        name: (
            "metadata",
            f"parent TransformerEncoderLayer reads {name}.weight for its eval fast path: a "
            "low-rank layer turns that fused path off (has_torch_function), and the "
            "standard path calls the layer",
        )
        for name in ("linear1", "linear2")
    },
}


def register_weight_reader(
    parent_type: type[nn.Module],
    child_names: str | Iterable[str],
    *,
    policy: ReaderPolicy = "skip",
    reason: str | None = None,
) -> None:
    """Declare what ``parent_type``'s forward does with ``child.weight`` of these children.

    Args:
        parent_type: the parent module class (subclasses inherit the declaration).
        child_names: attribute names of the children, or one name.
        policy: ``"skip"`` (default): the parent computes with the weight, so
            ``convert_model`` leaves those children ``nn.Linear`` and says why in its
            report. ``"metadata"``: it only reads metadata; convert them. ``"materialize"``:
            convert them anyway, forming the dense weight on each use (saves memory, costs
            time; see :class:`FactoredWeight`).
        reason: the report's text; a default naming the parent is used otherwise.

    A later declaration for the same parent type and child replaces an earlier one, and
    overrides what reading the source would conclude.
    """
    if not (isinstance(parent_type, type) and issubclass(parent_type, nn.Module)):
        raise InputTypeError(f"parent_type must be an nn.Module subclass, got {parent_type!r}")
    names = (child_names,) if isinstance(child_names, str) else tuple(child_names)
    if not names or not all(isinstance(n, str) and n for n in names):
        raise InputError(
            f"child_names must be one or more non-empty attribute names, got {child_names!r}"
        )
    if policy not in READER_POLICIES:
        raise InputError(f"policy must be one of {READER_POLICIES}, got {policy!r}")
    if reason is not None and not isinstance(reason, str):
        raise InputTypeError(f"reason must be a str or None, got {type(reason).__name__}")
    entries = _REGISTRY.setdefault(parent_type, {})
    for name in names:
        entries[name] = (policy, reason)


def _default_reason(parent: str, child: str, policy: ReaderPolicy) -> str:
    if policy == "skip":
        return f"parent {parent} reads .weight directly"
    if policy == "metadata":
        return f"parent {parent} reads {child}.weight metadata only: served lazily"
    return f"parent {parent} computes with {child}.weight: dense weight formed on each use"


def weight_reader_policy(parent: nn.Module, child_name: str) -> WeightRead | None:
    """What ``parent`` does with ``getattr(parent, child_name).weight``; ``None`` if nothing known.

    The registry is consulted first (the most derived registered class of ``parent``
    wins), then the source of ``type(parent).forward`` and of the methods it calls on
    ``self``, for the expression ``self.<child_name>.weight``:

    - every use reads metadata (``.dtype``, ``.shape``, ``.device``, ``.size()``,
      ``isinstance(...)``, ``is None``) → ``"metadata"``;
    - any other use → ``"skip"``: the parent computes with the weight on every call.

    Code whose source cannot be read (compiled, built in) gives ``None``, as does a
    parent that never names the child's weight. Reads through an alias (``w =
    self.proj.weight``) count as computing.
    """
    if not isinstance(parent, nn.Module):
        raise InputTypeError(f"parent must be an nn.Module, got {type(parent).__name__}")
    if not isinstance(child_name, str) or not child_name:
        raise InputError(f"child_name must be a non-empty attribute name, got {child_name!r}")
    cls_name = type(parent).__name__
    for cls in type(parent).__mro__:
        entry = _REGISTRY.get(cls, {}).get(child_name)  # type: ignore[call-overload]
        if entry is not None:
            policy, reason = entry
            reason = reason or _default_reason(cls_name, child_name, policy)
            return WeightRead(policy, reason, "registry")
    uses = source_weight_reads(type(parent)).get(child_name)
    if not uses:
        return None
    where = f"{cls_name}.forward"
    if uses == {"metadata"}:
        return WeightRead(
            "metadata",
            f"parent {where} reads {child_name}.weight metadata only: served lazily",
            "source",
        )
    return WeightRead(
        "skip",
        f"parent {where} computes with {child_name}.weight (read in its source): kept "
        f"dense; register_weight_reader({cls_name}, [{child_name!r}], policy='materialize') "
        "converts it anyway",
        "source",
    )


def _holds_matrix(module: nn.Module) -> bool:
    """A linear-like child: a 2-D ``weight`` parameter of its own, or a low-rank layer."""
    weight = module._parameters.get("weight")
    return (weight is not None and weight.dim() == 2) or hasattr(module, "weight_factors")


def find_weight_readers(model: nn.Module) -> dict[str, WeightRead]:
    """:func:`weight_reader_policy` for every linear-like child (a 2-D ``weight`` of its
    own, or a low-rank layer) of every module of ``model``: ``{child's dotted name:
    WeightRead}`` for those whose parent is known to read their weight. A child held at
    several places is listed under each name."""
    found: dict[str, WeightRead] = {}
    for prefix, parent in model.named_modules(remove_duplicate=False):
        for name, child in parent._modules.items():
            if child is None or not _holds_matrix(child):
                continue
            read = weight_reader_policy(parent, name)
            if read is not None:
                found[f"{prefix}.{name}" if prefix else name] = read
    return found


# Tensor metadata a static read of the source accepts as "no computation".
_META_ATTRS = frozenset(
    {"dtype", "shape", "device", "ndim", "requires_grad", "layout", "is_cuda", "is_meta",
     "itemsize"}
)  # fmt: skip
_META_CALLS = frozenset(
    {"size", "dim", "numel", "is_floating_point", "is_complex", "element_size", "ndimension"}
)
_SOURCE_CACHE: weakref.WeakKeyDictionary[type, dict[str, frozenset[str]]] = (
    weakref.WeakKeyDictionary()
)


def source_weight_reads(cls: type[nn.Module]) -> dict[str, frozenset[str]]:
    """``{child name: {"metadata"} or {"metadata", "compute"} or {"compute"}}`` for each
    ``self.<child>.weight`` in ``cls.forward`` and the methods of ``cls`` it calls on
    ``self`` (transitively); ``nn.Module``'s own methods are not read. Cached per class."""
    cached = _SOURCE_CACHE.get(cls)
    if cached is not None:
        return cached
    uses: dict[str, set[str]] = {}
    todo, seen = ["forward"], set()
    while todo:
        name = todo.pop()
        if name in seen:
            continue
        seen.add(name)
        tree, self_name = _parse_method(cls, name)
        if tree is None:
            continue
        parents = {child: node for node in ast.walk(tree) for child in ast.iter_child_nodes(node)}
        for node in ast.walk(tree):
            if not isinstance(node, ast.Attribute):
                continue
            value = node.value
            if (  # self.<method>(...): read that method too
                isinstance(value, ast.Name)
                and value.id == self_name
                and isinstance(parents.get(node), ast.Call)
                and parents[node].func is node  # type: ignore[attr-defined]
            ):
                todo.append(node.attr)
            if (
                node.attr == "weight"
                and isinstance(value, ast.Attribute)
                and isinstance(value.value, ast.Name)
                and value.value.id == self_name
            ):
                kind = "metadata" if _is_metadata_use(node, parents) else "compute"
                uses.setdefault(value.attr, set()).add(kind)
    result = {k: frozenset(v) for k, v in uses.items()}
    _SOURCE_CACHE[cls] = result
    return result


def _parse_method(cls: type, name: str) -> tuple[ast.AST | None, str]:
    fn = inspect.getattr_static(cls, name, None)
    if isinstance(fn, (staticmethod, classmethod)):
        return None, ""
    if not inspect.isfunction(fn):
        return None, ""
    fn = inspect.unwrap(fn)
    if getattr(nn.Module, name, None) is fn:  # nn.Module's own machinery
        return None, ""
    try:
        source = textwrap.dedent(inspect.getsource(fn))
        tree = ast.parse(source)
    except (OSError, TypeError, SyntaxError):
        return None, ""
    args = inspect.signature(fn).parameters
    self_name = next(iter(args), "self")
    return tree, self_name


def _is_metadata_use(node: ast.AST, parents: dict[ast.AST, ast.AST]) -> bool:
    parent = parents.get(node)
    if isinstance(parent, ast.Attribute) and parent.value is node:
        if parent.attr in _META_CALLS:
            call = parents.get(parent)
            return isinstance(call, ast.Call) and call.func is parent
        return parent.attr in _META_ATTRS
    if isinstance(parent, ast.Call) and node in parent.args:
        func = parent.func
        return isinstance(func, ast.Name) and func.id in ("isinstance", "type", "id")
    if isinstance(parent, ast.Compare):
        is_test = all(isinstance(op, (ast.Is, ast.IsNot)) for op in parent.ops)
        return is_test and all(
            isinstance(c, ast.Constant) and c.value is None for c in parent.comparators
        )
    return False
