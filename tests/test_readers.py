"""Which parents read a child's ``.weight`` (``lowrank_layers.readers``): the registry,
the static check of a parent's source, and what they say of transformers' T5 family."""

from __future__ import annotations

import importlib

import pytest
import torch
from torch import nn

from lowrank_layers.readers import (
    WeightRead,
    find_weight_readers,
    register_weight_reader,
    source_weight_reads,
    weight_reader_policy,
)

from .test_lazy_weight import Reader

# ------------------------------------------------------------------------------------------
# the registry and the static check
# ------------------------------------------------------------------------------------------


class MetadataReader(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.proj = nn.Linear(8, 8)
        self.other = nn.Linear(8, 8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if isinstance(self.proj.weight, torch.Tensor) and x.dtype != self.proj.weight.dtype:
            x = x.to(self.proj.weight.dtype)
        assert self.proj.weight is not None and self.proj.weight.size(0) == 8
        return self.other(self.proj(x))


class HelperReader(nn.Module):
    """Computes with the weight in a method that forward calls."""

    def __init__(self) -> None:
        super().__init__()
        self.proj = nn.Linear(8, 8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._project(x)

    def _project(self, x: torch.Tensor) -> torch.Tensor:
        return x @ self.proj.weight.t()

    def unused(self) -> torch.Tensor:
        return self.proj.weight.sum()


class AliasReader(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.proj = nn.Linear(8, 8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = self.proj.weight
        return x * w.dtype.is_floating_point


def test_static_check_classifies_uses():
    assert source_weight_reads(MetadataReader) == {"proj": frozenset({"metadata"})}
    assert source_weight_reads(HelperReader) == {"proj": frozenset({"compute"})}
    assert source_weight_reads(AliasReader) == {"proj": frozenset({"compute"})}  # conservative
    assert source_weight_reads(Reader) == {"proj": frozenset({"compute"})}
    assert source_weight_reads(nn.Sequential) == {}

    meta = weight_reader_policy(MetadataReader(), "proj")
    assert meta == WeightRead(
        "metadata",
        "parent MetadataReader.forward reads proj.weight metadata only: served lazily",
        "source",
    )
    assert weight_reader_policy(MetadataReader(), "other") is None
    compute = weight_reader_policy(HelperReader(), "proj")
    assert compute is not None and compute.policy == "skip" and compute.source == "source"
    assert "register_weight_reader(HelperReader, ['proj'], policy='materialize')" in compute.reason


def test_register_weight_reader_overrides_and_is_inherited():
    class Parent(HelperReader):
        pass

    class Child(Parent):
        pass

    register_weight_reader(Parent, "proj", policy="materialize")
    read = weight_reader_policy(Child(), "proj")
    assert read == WeightRead(
        "materialize",
        "parent Child computes with proj.weight: dense weight formed on each use",
        "registry",
    )
    register_weight_reader(Child, ["proj"], reason="custom")
    assert weight_reader_policy(Child(), "proj") == WeightRead("skip", "custom", "registry")
    assert weight_reader_policy(Parent(), "proj").policy == "materialize"  # type: ignore[union-attr]


def test_find_weight_readers_lists_linear_children(gen):
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.TransformerEncoderLayer(16, 2, 32, batch_first=True), Reader(nn.Linear(4, 4))
    )
    found = find_weight_readers(model)
    assert {k: v.policy for k, v in found.items()} == {
        "0.self_attn.out_proj": "skip",
        "0.linear1": "metadata",
        "0.linear2": "metadata",
        "1.proj": "skip",
    }  # norm1/norm2 (1-D weights) are not listed


@pytest.mark.parametrize(
    ("args", "kwargs", "error", "match"),
    [
        (
            (int, ["x"]),
            {},
            TypeError,
            "parent_type must be an nn.Module subclass, got <class 'int'>",
        ),
        ((nn.Module, []), {}, ValueError, r"child_names must be one or more .*got \[\]"),
        ((nn.Module, [""]), {}, ValueError, "child_names must be one or more"),
        ((nn.Module, ["x"]), {"policy": "dense"}, ValueError, "policy must be one of .*'dense'"),
        ((nn.Module, ["x"]), {"reason": 3}, TypeError, "reason must be a str or None, got int"),
    ],
)
def test_register_weight_reader_rejects_bad_arguments(args, kwargs, error, match):
    with pytest.raises(error, match=match):
        register_weight_reader(*args, **kwargs)


def test_weight_reader_policy_rejects_bad_arguments():
    with pytest.raises(TypeError, match=r"parent must be an nn\.Module, got int"):
        weight_reader_policy(3, "x")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="child_name must be a non-empty attribute name"):
        weight_reader_policy(nn.Linear(2, 2), "")


# ------------------------------------------------------------------------------------------
# transformers' T5 family: metadata only, read from the source
# ------------------------------------------------------------------------------------------


T5_FAMILY = [
    ("t5", "T5DenseActDense"),
    ("t5", "T5DenseGatedActDense"),
    ("mt5", "MT5DenseActDense"),
    ("mt5", "MT5DenseGatedActDense"),
    ("umt5", "UMT5DenseActDense"),
    ("umt5", "UMT5DenseGatedActDense"),
    ("longt5", "LongT5DenseActDense"),
    ("switch_transformers", "SwitchTransformersDenseActDense"),
    ("pix2struct", "Pix2StructVisionMlp"),
    ("pix2struct", "Pix2StructTextDenseGatedActDense"),
    ("udop", "UdopDenseActDense"),
    ("udop", "UdopDenseGatedActDense"),
    ("pop2piano", "Pop2PianoDenseActDense"),
    ("kosmos2_5", "Kosmos2_5VisionMlp"),
]


@pytest.mark.parametrize(("module", "name"), T5_FAMILY)
def test_t5_family_reads_wo_weight_metadata_only(module, name):
    pytest.importorskip("transformers")
    try:
        mod = importlib.import_module(f"transformers.models.{module}.modeling_{module}")
    except ImportError:
        pytest.skip(f"transformers has no {module}")
    cls = getattr(mod, name, None)
    if cls is None:
        pytest.skip(f"this transformers has no {name}")
    assert source_weight_reads(cls) == {"wo": frozenset({"metadata"})}
