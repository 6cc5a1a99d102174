"""A global budget with calibration data, through every public call that accepts both.

SmolLM2-135M-Instruct at 80% of its Linear parameters (lm_head, tied to the embeddings,
excluded), calibrated on the same 64 BBC articles (256 tokens) as
`conversion_quality.py`, perplexity on its held-out articles:

- `compress(model, batches, budget=0.8)`;
- `convert_model(model, budget=0.8, calibration=batches)`: refuses and names `compress`
  (it used to share the budget from the whitened spectra: 7.1x);
- `lowrank_layers.hf.convert_pretrained(folder, dst, config, calibration_texts=texts)` on
  the model saved as a transformers folder, reloaded with `load_pretrained` (the CLI's
  `lowrank-layers convert folder dst --calibrate texts/ --budget 0.8` is this call).

    python benchmarks/budget_routes.py [--budget 0.8]
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import load_bbc_news, machine_description, markdown_table
from conversion_quality import load_smollm2, perplexity

from lowrank_layers import ConversionConfig, compress, convert_model, load_pretrained
from lowrank_layers.hf import convert_pretrained
from lowrank_layers.text import text_batches


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--budget", type=float, default=0.8)
    parser.add_argument("--calib-docs", type=int, default=64)
    parser.add_argument("--eval-docs", type=int, default=32)  # as conversion_quality.py
    args = parser.parse_args()
    torch.set_num_threads(2)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    texts, _ = load_bbc_news(seed=0)
    order = torch.randperm(len(texts), generator=torch.Generator().manual_seed(0)).tolist()
    c, e = args.calib_docs, args.calib_docs + args.eval_docs
    calib_texts = [texts[i] for i in order[:c]]
    eval_texts = [texts[i] for i in order[c:e]]  # disjoint from the calibration
    config = ConversionConfig(budget=args.budget, exclude=["lm_head"])

    model, tokenizer = load_smollm2()
    calib = text_batches(tokenizer, calib_texts, max_length=256)
    evals = text_batches(tokenizer, eval_texts, max_length=256)
    base = perplexity(model, evals)
    rows = [("original", "-", f"{base:.2f}", "1.00x", "-")]

    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp) / "smollm2"
        # the dequantized model, as a transformers folder: the GGUF record goes (its weights
        # are float now), as it would for a user saving a dequantized model
        model.hf_quantizer = None
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
        model.save_pretrained(folder)
        tokenizer.save_pretrained(folder)

        start = time.perf_counter()
        report = compress(model, calib, config)
        ppl = perplexity(model, evals)
        plan = report.plan
        rows.append(("compress(model, batches, config)", "converted", f"{ppl:.2f}",
                     f"{ppl / base:.2f}x", f"{time.perf_counter() - start:.0f}"))  # fmt: skip
        print(f"compress: {ppl:.2f}", file=sys.stderr)

        fresh, _ = load_smollm2()
        try:
            convert_model(fresh, config, calibration=calib)
            outcome = "converted (a trap)"
        except ValueError as exc:
            outcome = f"refused: {exc}"
        rows.append(("convert_model(model, config, calibration=batches)", outcome, "-", "-", "-"))
        del fresh

        start = time.perf_counter()
        dst = Path(tmp) / "converted"
        routed = convert_pretrained(folder, dst, config, calibration_texts=calib_texts)
        same = routed.plan == plan
        loaded = load_pretrained(dst)
        ppl = perplexity(loaded, evals)
        rows.append(("convert_pretrained(folder, dst, config, calibration_texts=texts)",
                     f"converted (plan {'equal to' if same else 'differs from'} compress's)",
                     f"{ppl:.2f}", f"{ppl / base:.2f}x",
                     f"{time.perf_counter() - start:.0f}"))  # fmt: skip
        print(f"convert_pretrained: {ppl:.2f}, same plan: {same}", file=sys.stderr)

    print(f"SmolLM2-135M at budget={args.budget}, {c} calibration and {args.eval_docs} held-out "
          f"BBC articles (256 tokens); {machine_description()}\n")  # fmt: skip
    print(markdown_table(["call", "outcome", "perplexity", "ratio", "s"], rows))


if __name__ == "__main__":
    main()
