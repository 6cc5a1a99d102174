"""The model card (``README.md``) of every model folder the library writes.

It says what the folder is (a lowrank-layers checkpoint, which layers are low-rank) and how
to load it, because a load without the library fails with messages of transformers and
safetensors that do not name it (see docs/checkpoints.md). A folder that already has a
``README.md`` (copied from the source model) keeps it, with the card appended as a
delimited section; a later save replaces that section.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

from .checkpoint_format import is_narrowed_entry

__all__ = ["linear_layer_count", "model_card", "with_model_card"]

_START = "<!-- lowrank-layers: start -->"
_END = "<!-- lowrank-layers: end -->"
_FRONT_MATTER = "---\nlibrary_name: lowrank-layers\ntags:\n- lowrank-layers\n- low-rank\n---\n"


def _section(layers: Mapping[str, Mapping[str, Any]], linear_layers: int | None) -> str:
    narrowed = [e for e in layers.values() if is_narrowed_entry(e)]
    lowrank = [e for e in layers.values() if not is_narrowed_entry(e)]
    n = len(lowrank)
    of = f" of its {linear_layers}" if linear_layers is not None else ""
    also = f" and {len(narrowed)} are narrowed (`nn.Linear` of fewer features)" if narrowed else ""
    dense = sum(e["in_features"] * e["out_features"] for e in lowrank) + sum(
        e["original_in_features"] * e["original_out_features"] for e in narrowed
    )
    factors = sum(e["rank"] * (e["in_features"] + e["out_features"] + 1) for e in lowrank)
    factors += sum(e["in_features"] * e["out_features"] for e in narrowed)
    return f"""{_START}
## lowrank-layers

A lowrank-layers checkpoint: {n}{of} linear layers are low-rank (`U diag(S) Vh`){also};
their weights hold {factors:,} parameters where the dense layers held {dense:,}. The
layers are described in the safetensors metadata and, in a transformers model folder, in
`config.json` (`quantization_config`).

Load it with the library installed:

```python
import lowrank_layers
from transformers import AutoModel

model = AutoModel.from_pretrained(folder)  # or lowrank_layers.load_pretrained(folder)
```

or, into any `nn.Module` of the dense architecture,
`lowrank_layers.load_lowrank(model, folder)`.

**Loading without `import lowrank_layers` fails**, with `ignore_mismatched_sizes=True`
too: transformers warns `Unknown quantization type, got lowrank-layers`, then fails on the
guard tensors stored as the dense `<layer>.weight` (`RuntimeError: shape '[2]' is invalid
for input of size 1`, or another error about the `F4` dtype). Install the library
(`pip install lowrank-layers`) and import it before loading.
{_END}
"""


def linear_layer_count(model: Any, layers: Mapping[str, Any]) -> int:
    """How many layers of ``model`` (an ``nn.Module``) are low-rank (named in ``layers``) or
    could be: ``nn.Linear`` and transformers' ``Conv1D``."""
    from torch import nn

    return sum(
        1
        for name, m in model.named_modules()
        if name in layers or isinstance(m, nn.Linear) or type(m).__name__ == "Conv1D"
    )


def model_card(layers: Mapping[str, Mapping[str, Any]], *, linear_layers: int | None = None) -> str:
    """A ``README.md`` for a folder holding a checkpoint with these low-rank ``layers`` (the
    checkpoint format's descriptions); ``linear_layers``, when known, is how many layers
    the model has that could have been converted."""
    return _FRONT_MATTER + "\n" + _section(layers, linear_layers)


def with_model_card(
    existing: str | None,
    layers: Mapping[str, Mapping[str, Any]],
    *,
    linear_layers: int | None = None,
) -> str:
    """``existing`` (a folder's ``README.md``, or None) with the card's section added, or
    replacing the one an earlier save added; the whole card when there was none."""
    if existing is None:
        return model_card(layers, linear_layers=linear_layers)
    section = _section(layers, linear_layers)
    pattern = re.compile(re.escape(_START) + r".*?" + re.escape(_END) + r"\n?", re.DOTALL)
    if pattern.search(existing):
        return pattern.sub(lambda _: section, existing, count=1)
    return existing.rstrip("\n") + "\n\n" + section
