"""What a conversion did, layer by layer: :class:`LayerReport` and :class:`ConversionReport`
(``convert_model``, ``convert_checkpoint`` and ``compress`` all return one)."""

from __future__ import annotations

import json
import warnings
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

from .speed import REPORT_TOKENS

__all__ = ["ConversionReport", "LayerReport", "skipped_report", "warn_if_none_converted"]


@dataclass
class LayerReport:
    """One matched module: converted, or skipped with its reason."""

    name: str
    kind: str
    in_features: int | None
    out_features: int | None
    rank: int | None
    params_before: int
    params_after: int
    relative_error: float | None
    seconds: float
    reason: str | None = None
    output_error: float | None = None  # relative, on error_data's inputs
    error_data: str | None = None  # "calibration" or "held-out": what output_error used
    # expected speed-up of the forward over nn.Linear (speed.expected_speedup) at
    # REPORT_TOKENS[0] and REPORT_TOKENS[1] tokens per call; None when not low rank
    speedup_few: float | None = None
    speedup_many: float | None = None
    # for a converted layer: what to know about it (a parent that reads its .weight)
    note: str | None = None

    @property
    def converted(self) -> bool:
        return self.reason is None


@dataclass
class ConversionReport:
    """What a conversion did, layer by layer.

    ``str(report)`` is an aligned table; :meth:`to_dict` / :meth:`to_json` are
    JSON-serialisable. Parameter counts are of the matched layers' weights and factors
    (biases excluded, as they are unchanged); ``model_params_before/after`` count the
    whole model.
    """

    layers: list[LayerReport] = field(default_factory=list)
    model_params_before: int = 0
    model_params_after: int = 0
    propagation: Any = None  # a propagate.PropagationReport when propagate=True

    @property
    def converted(self) -> list[LayerReport]:
        return [layer for layer in self.layers if layer.converted]

    @property
    def skipped(self) -> list[LayerReport]:
        return [layer for layer in self.layers if not layer.converted]

    @property
    def params_before(self) -> int:
        """Weight parameters of the converted layers before conversion."""
        return sum(layer.params_before for layer in self.converted)

    @property
    def params_after(self) -> int:
        """Factor parameters of the converted layers after conversion."""
        return sum(layer.params_after for layer in self.converted)

    @property
    def seconds(self) -> float:
        return sum(layer.seconds for layer in self.layers)

    def to_dict(self) -> dict[str, Any]:
        return {
            "layers": [{**asdict(layer), "converted": layer.converted} for layer in self.layers],
            "totals": {
                "converted": len(self.converted),
                "skipped": len(self.skipped),
                "params_before": self.params_before,
                "params_after": self.params_after,
                "model_params_before": self.model_params_before,
                "model_params_after": self.model_params_after,
                "seconds": self.seconds,
            },
        }

    def to_json(self, **kwargs: Any) -> str:
        return json.dumps(self.to_dict(), **kwargs)

    def __str__(self) -> str:
        calibrated = any(layer.output_error is not None for layer in self.layers)

        def num(value: float | None) -> str:
            return "-" if value is None else f"{value:.4f}"

        header = ["layer", "kind", "in", "out", "rank", "params", "after"]
        header += [f"x@{REPORT_TOKENS[0]}", f"x@{REPORT_TOKENS[1]}", "rel.err"]
        data = next((x.error_data for x in self.layers if x.error_data), "calibration")
        header += [f"out.err ({data})"] if calibrated else []
        header += ["s", "note"]
        rows = [header]
        for layer in self.layers:
            row = [
                layer.name,
                layer.kind,
                "-" if layer.in_features is None else str(layer.in_features),
                "-" if layer.out_features is None else str(layer.out_features),
                "-" if layer.rank is None else str(layer.rank),
                f"{layer.params_before:,}",
                f"{layer.params_after:,}",
                "-" if layer.speedup_few is None else f"{layer.speedup_few:.2f}",
                "-" if layer.speedup_many is None else f"{layer.speedup_many:.2f}",
                num(layer.relative_error),
            ]
            row += [num(layer.output_error)] if calibrated else []
            note = layer.note or "" if layer.converted else f"skipped: {layer.reason}"
            row += [f"{layer.seconds:.2f}", note]
            rows.append(row)
        widths = [max(len(row[i]) for row in rows) for i in range(len(header))]
        right = set(range(2, len(header) - 1))

        def fmt(row: Sequence[str]) -> str:
            cells = [
                cell.rjust(w) if i in right else cell.ljust(w)
                for i, (cell, w) in enumerate(zip(row, widths, strict=True))
            ]
            return "  ".join(cells).rstrip()

        lines = _legend(calibrated, data)
        lines += [fmt(rows[0]), fmt(["-" * w for w in widths])] + [fmt(r) for r in rows[1:]]
        saved = 1 - self.params_after / self.params_before if self.params_before else 0.0
        lines.append(
            f"converted {len(self.converted)} of {len(self.layers)} matched layers: "
            f"{self.params_before:,} -> {self.params_after:,} parameters ({saved:.1%} fewer); "
            f"model {self.model_params_before:,} -> {self.model_params_after:,}; "
            f"{self.seconds:.2f} s"
        )
        return "\n".join(lines)


def _legend(calibrated: bool, data: str) -> list[str]:
    """The lines above a report's table: what its error and speed columns mean."""
    if calibrated:
        errors = [
            f"out.err ({data}): the relative error of the layer's outputs, |(W - W')x| / |Wx| "
            f"over the {data} inputs: what the model sees, the column to read",
            "rel.err: the relative error of the weight itself, |W - W'| / |W|; factors fitted "
            "to data keep the directions the inputs use, so it may exceed 1 harmlessly",
        ]
    else:
        errors = [
            "rel.err: the relative error of the weight, |W - W'| / |W| (converted without "
            "data: the outputs' error is not known)"
        ]
    return [
        *errors,
        "x@N: expected speed-up of the layer's forward over nn.Linear at N tokens per call "
        "(lowrank_layers.speed.expected_speedup; a model, not a measurement)",
        "",
    ]


def skipped_report(
    name: str, kind: str, in_features: int | None, out_features: int | None, params: int,
    reason: str,
) -> LayerReport:  # fmt: skip
    """The report of a matched layer kept as it is, for ``reason``."""
    return LayerReport(
        name=name,
        kind=kind,
        in_features=in_features,
        out_features=out_features,
        rank=None,
        params_before=params,
        params_after=params,
        relative_error=None,
        seconds=0.0,
        reason=reason,
    )


def warn_if_none_converted(report: ConversionReport, caller: str, *, stacklevel: int) -> None:
    """A ``UserWarning`` when modules matched but none was converted, with the first reasons
    (the report lists every one)."""
    if report.converted or not report.layers:
        return
    examples = "; ".join(f"{s.name}: {s.reason}" for s in report.skipped[:3])
    more = f"; and {len(report.skipped) - 3} more" if len(report.skipped) > 3 else ""
    warnings.warn(
        f"{caller}: {len(report.layers)} modules matched but none was converted "
        f"({examples}{more}); the report lists every reason",
        UserWarning,
        stacklevel=stacklevel + 1,
    )
