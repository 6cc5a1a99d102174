"""The lazy ``weight`` of the low-rank layers: :class:`FactoredWeight`.

A low-rank layer holds no ``(out, in)`` weight, yet model code written for ``nn.Linear``
sometimes reads ``child.weight`` instead of calling the child: for its metadata only
(transformers' T5 family checks ``isinstance(self.wo.weight, torch.Tensor)`` and its
``dtype``), to decide on a fast path (``nn.TransformerEncoderLayer``'s eval fast path), or
to compute with it (``nn.MultiheadAttention`` passes ``out_proj.weight`` to
``F.multi_head_attention_forward``).

The layers' ``weight`` is therefore a :class:`FactoredWeight`: a tensor subclass with the
dense weight's shape, dtype, device and ``requires_grad`` but no storage. Metadata reads
cost nothing. Any other use (an op, a function call) forms the dense weight from the
factors at that moment, differentiably (a reader's loss still trains ``U``, ``S``, ``V``),
counts it in the layer's ``dense_weight_reads`` and warns once per layer with a
:class:`DenseWeightWarning`: such a parent turns the layer into a slower dense one.
Which parents read which child's weight, decided at conversion time, is
:mod:`lowrank_layers.readers`.
"""

from __future__ import annotations

import os
import sys
import warnings
from collections.abc import Callable
from typing import Any, Protocol

import torch
from torch.utils._pytree import tree_map

__all__ = [
    "DenseWeightWarning",
    "FactoredLayer",
    "FactoredWeight",
    "dense_product",
    "lazy_weight",
]


class DenseWeightWarning(UserWarning):
    """A low-rank layer's dense weight was formed because code used its ``.weight``."""


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
