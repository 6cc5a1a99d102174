"""Code that reads a projection's ``.weight``: the lazy ``FactoredWeight`` and the reader registry.

A low-rank layer holds no ``(out, in)`` weight, yet model code written for ``nn.Linear``
sometimes reads ``child.weight`` instead of calling the child:

- for its metadata only: transformers' T5 family (``T5DenseActDense``, mT5, UMT5, LongT5,
  SwitchTransformers, Pix2Struct, ...) checks ``isinstance(self.wo.weight, torch.Tensor)``
  and ``self.wo.weight.dtype`` before calling ``self.wo``;
- to decide on a fast path: ``nn.TransformerEncoderLayer`` (eval mode) gathers
  ``linear1.weight``/``linear2.weight`` and takes its fused kernel unless one of them
  ``has_torch_function``;
- to compute with it: ``nn.MultiheadAttention`` passes ``out_proj.weight`` to
  ``F.multi_head_attention_forward``.

The layers' ``weight`` is therefore a :class:`FactoredWeight`: a tensor subclass with the
dense weight's shape, dtype, device and ``requires_grad`` but no storage. Metadata reads
cost nothing. Any other use (an op, a function call) forms the dense weight from the
factors at that moment, differentiably (a reader's loss still trains ``U``, ``S``, ``V``),
counts it in the layer's ``dense_weight_reads`` and warns once per layer with a
:class:`DenseWeightWarning`: such a parent turns the layer into a slower dense one.

At conversion time, :func:`weight_reader_policy` says what a parent does with a child's
weight: from the registry (:func:`register_weight_reader`, seeded with the cases above),
else from a static look at the source of the parent's ``forward`` (and the methods it
calls on ``self``) for ``self.<child>.weight``.
"""

from __future__ import annotations

import ast
import inspect
import os
import sys
import textwrap
import warnings
import weakref
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any, Literal, Protocol

import torch
from torch import nn
from torch.utils._pytree import tree_map

from .common import InputError, InputTypeError

__all__ = [
    "DenseWeightWarning",
    "FactoredWeight",
    "ReaderPolicy",
    "WeightRead",
    "dense_product",
    "find_weight_readers",
    "lazy_weight",
    "register_weight_reader",
    "source_weight_reads",
    "weight_reader_policy",
]

ReaderPolicy = Literal["skip", "metadata", "materialize"]
READER_POLICIES: tuple[str, ...] = ("skip", "metadata", "materialize")


class DenseWeightWarning(UserWarning):
    """A low-rank layer's dense weight was formed because code used its ``.weight``."""


# ------------------------------------------------------------------------------------------
# the lazy weight
# ------------------------------------------------------------------------------------------


class FactoredLayer(Protocol):
    """What :class:`FactoredWeight` needs of a layer."""

    in_features: int
    out_features: int

    def weight_factors(
        self,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None]: ...


def dense_product(
    U: torch.Tensor, S: torch.Tensor, V: torch.Tensor, D: torch.Tensor | None = None
) -> torch.Tensor:
    """``diag(D)·U·diag(S)·Vᵀ``, differentiable in every factor.

    Half-precision factors are multiplied in float32 and the product is cast back (as
    ``dense_weight()`` does), so the result matches the layer's own forward to the
    precision of its dtype.
    """
    dtype = U.dtype
    if dtype not in (torch.float32, torch.float64):
        product = dense_product(U.float(), S.float(), V.float(), None if D is None else D.float())
        return product.to(dtype)
    # no no-op casts: under torch.compile an unused product must be dead code, and the
    # compiler's dead-code elimination keeps Tensor.to calls
    weight = (U * S) @ V.t()
    if D is not None:
        weight = weight * D[:, None]
    return weight


def _getters(*names: str) -> set[Callable[..., Any]]:
    return {getattr(torch.Tensor, n).__get__ for n in names if hasattr(torch.Tensor, n)}


def _methods(*names: str) -> set[Callable[..., Any]]:
    return {getattr(torch.Tensor, n) for n in names if hasattr(torch.Tensor, n)}


# Reads answered from the wrapper's own metadata, without forming the weight.
_METADATA_PROPERTIES = (
    "dtype", "shape", "device", "requires_grad", "ndim", "layout", "itemsize", "nbytes",
    "is_cuda", "is_cpu", "is_meta", "is_xpu", "is_mps", "is_sparse", "is_quantized",
    "is_mkldnn", "is_nested", "is_leaf", "grad", "grad_fn",
)  # fmt: skip
_METADATA_METHODS = (
    "size", "dim", "ndimension", "numel", "nelement", "is_floating_point", "is_complex",
    "is_signed", "element_size", "get_device", "stride", "is_contiguous", "__len__",
)  # fmt: skip
_FREE: set[Callable[..., Any]] = (
    _getters(*_METADATA_PROPERTIES)
    | _methods(*_METADATA_METHODS)
    | {torch.is_floating_point, torch.is_complex, torch.numel}
)
# In-place dunders: writing into a FactoredWeight would write into a temporary.
_INPLACE_DUNDERS = {
    "__setitem__", "__set__", "__delete__", "__iadd__", "__isub__", "__imul__",
    "__itruediv__", "__ifloordiv__", "__imod__", "__ipow__", "__imatmul__", "__iand__",
    "__ior__", "__ixor__", "__ilshift__", "__irshift__",
}  # fmt: skip


def _describe(layer: Any) -> str:
    rank = getattr(layer, "rank", None)
    return (
        f"{type(layer).__name__} ({layer.out_features}x{layer.in_features}"
        f"{'' if rank is None else f', rank {rank}'})"
    )


def _func_name(func: Any) -> str:
    name = getattr(func, "__name__", None) or repr(func)
    if name in ("__get__", "__set__"):  # a property of Tensor: name the property
        owner = getattr(func, "__self__", None)
        name = f"Tensor.{getattr(owner, '__name__', '?')} ({name[2:5]})"
    return name


class FactoredWeight(torch.Tensor):
    """The ``(out_features, in_features)`` weight of a low-rank layer, formed only when used.

    A wrapper tensor subclass without storage: ``dtype``, ``shape``, ``device``,
    ``requires_grad``, ``dim()``, ``size()``, ``numel()``, ``is_floating_point()``,
    ``isinstance(w, torch.Tensor)`` and ``repr`` are answered from its metadata. Any other
    use — an op (``F.linear(x, w)``, ``w.t()``, ``w @ x``), a function that takes it —
    reaches ``__torch_function__`` (above autograd), which replaces it by
    ``diag(D)·U·diag(S)·Vᵀ`` computed from the layer's current factors, differentiably,
    then runs the op. Each such product increments ``layer.dense_weight_reads``; the first
    one warns (:class:`DenseWeightWarning`).

    Writing into it (in-place ops, ``out=``, setting ``.data``) raises: the weight is a
    function of the factors, and a write would go to a temporary.

    Because it defines ``__torch_function__``, ``torch.overrides.has_torch_function`` is
    true for it: fused paths that check it (``nn.TransformerEncoderLayer``'s eval fast
    path) fall back to their standard path, which calls the layer.
    """

    _layer: FactoredLayer

    @staticmethod
    def __new__(cls, layer: FactoredLayer) -> FactoredWeight:
        U, S, V, D = layer.weight_factors()
        requires_grad = any(t is not None and t.requires_grad for t in (U, S, V, D))
        self = torch.Tensor._make_wrapper_subclass(
            cls,
            (layer.out_features, layer.in_features),
            dtype=U.dtype,
            device=U.device,
            requires_grad=requires_grad,
        )
        self._layer = layer
        return self

    @property
    def layer(self) -> FactoredLayer:
        """The layer whose factors this weight is the product of."""
        return self._layer

    def materialize(self) -> torch.Tensor:
        """The dense weight, formed now from the layer's factors (differentiable), counted."""
        layer = self._layer
        dense = dense_product(*layer.weight_factors())
        layer.dense_weight_reads = getattr(layer, "dense_weight_reads", 0) + 1
        return dense

    def __repr__(self, *, tensor_contents: Any = None) -> str:  # type: ignore[override]
        return (
            f"FactoredWeight(shape={tuple(self.shape)}, dtype={self.dtype}, "
            f"device={self.device}, of {_describe(self._layer)})"
        )

    @classmethod
    def __torch_function__(
        cls,
        func: Callable[..., Any],
        types: Any,
        args: tuple[Any, ...] = (),
        kwargs: dict[str, Any] | None = None,
    ) -> Any:
        kwargs = kwargs or {}
        if func in _FREE:
            with torch._C.DisableTorchFunctionSubclass():
                return func(*args, **kwargs)
        if func is torch.Tensor.__repr__ or func is torch.Tensor.__format__:
            return args[0].__repr__()
        name = getattr(func, "__name__", "")
        # torch.nn.init and other Python functions pass the tensor by keyword
        target = args[0] if args else next(iter(kwargs.values()), None)
        out = kwargs.get("out")
        writes = isinstance(target, FactoredWeight) and (
            name in _INPLACE_DUNDERS or (name.endswith("_") and not name.startswith("__"))
        )
        if writes or any(isinstance(t, FactoredWeight) for t in _leaves(out)):
            written = (
                target if writes else next(t for t in _leaves(out) if isinstance(t, FactoredWeight))
            )
            layer = written._layer
            raise RuntimeError(
                f"{_func_name(func)} would write into the weight of a {_describe(layer)}, "
                "which is computed from its factors U, S, V (and D) on each use: the write "
                "would go to a temporary. Write the factors instead (reset_parameters(), "
                "or layer.U / layer.S / layer.Vh), or convert back with to_linear()."
            )
        forming: list[FactoredWeight] = []

        def form(t: Any) -> Any:
            if isinstance(t, FactoredWeight):
                forming.append(t)
                return t.materialize()
            return t

        args, kwargs = tree_map(form, (args, kwargs))
        for weight in forming:
            _warn_once(weight._layer, func)
        return func(*args, **kwargs)

    @classmethod
    def __torch_dispatch__(
        cls,
        func: Any,
        types: Any,
        args: tuple[Any, ...] = (),
        kwargs: dict[str, Any] | None = None,
    ) -> Any:
        raise RuntimeError(
            f"{func} reached a FactoredWeight below __torch_function__ (torch function "
            "handling is disabled here), where the weight cannot be formed with its "
            "gradient: call the layer, or use layer.dense_weight() explicitly"
        )


def lazy_weight(layer: FactoredLayer) -> torch.Tensor:
    """A layer's ``weight``: a :class:`FactoredWeight`, or the traced product under compile.

    ``torch.compile`` and ``torch.export`` cannot trace the creation of a wrapper subclass
    (``_make_wrapper_subclass``), so while compiling the weight is the expression
    ``diag(D)·U·diag(S)·Vᵀ`` itself: a reader that only looks at its metadata leaves it
    unused, and the compiler removes it; a reader that computes with it gets it,
    differentiably. Reads under compile are neither counted nor warned about.
    """
    if torch.compiler.is_compiling():
        return dense_product(*layer.weight_factors())
    return FactoredWeight(layer)


def _leaves(value: Any) -> list[Any]:
    if value is None:
        return []
    if isinstance(value, (list, tuple)):
        return list(value)
    return [value]


def _warn_once(layer: Any, func: Any) -> None:
    if getattr(layer, "_dense_weight_warned", False):
        return
    layer._dense_weight_warned = True
    warnings.warn(
        f"{_func_name(func)} used the .weight of a {_describe(layer)}, so its dense weight "
        f"was formed from the factors ({layer.out_features}x{layer.in_features}, on every "
        "such use; counted in layer.dense_weight_reads, warned once per layer). The code "
        "computes with the child's weight instead of calling it, which makes the layer "
        "slower than the nn.Linear it replaced. Keep that child dense: "
        "register_weight_reader(ParentType, ['child']) before convert_model, or call the "
        "layer instead of reading its weight.",
        DenseWeightWarning,
        stacklevel=_caller_level(),
    )


_TORCH_DIR = os.path.dirname(torch.__file__)


def _caller_level() -> int:
    """The stack level of the first frame outside torch and this module (the reader)."""
    frame, level = sys._getframe(2), 2  # the caller of _warn_once is level 2 for warn()
    while frame is not None and (
        frame.f_code.co_filename == __file__ or frame.f_code.co_filename.startswith(_TORCH_DIR)
    ):
        frame, level = frame.f_back, level + 1
    return level


# ------------------------------------------------------------------------------------------
# the registry and the static check
# ------------------------------------------------------------------------------------------


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
