"""Peak memory of `compress` on SmolLM2-135M (or Qwen2.5-Coder-0.5B), measured from outside
the process.

A child process loads SmolLM2-135M-Instruct (float32; the lm_head is tied to the
embeddings, counted once) or, with ``--model qwen``, Qwen2.5-Coder-0.5B-Instruct (float32,
630 M parameters, its lm_head untied), tokenizes 64 BBC articles (256 tokens, batches of
8) and runs `compress(model, batches, budget=0.8, exclude=["lm_head"])`. The parent takes
the child's whole-life peak resident memory from `os.wait4` (`ru_maxrss`). The child reports its
resident memory after loading the model and the data (the baseline), each stage's
`CompressionReport.costs`, and the held-out perplexity of the original and the compressed
model (the 32 articles after the calibration ones, as `budget_routes.py`; one article per
batch here, so that evaluating stays far below the pipeline's peak).

The library resets the process's peak (`VmHWM`) at the start of each stage to give each
stage its own figure, and the kernel's `ru_maxrss` is that same counter: with the resets,
`os.wait4` would only see the last stage's peak. The child therefore disables them by
default, and its stage peaks are then "since start" (cumulative): the stage where the
figure jumps holds the peak. `--stage-resets` keeps the library's resets for per-stage
figures (the `os.wait4` peak is then only the last stage's).

With ``--offload`` the model is compressed from disk, one block at a time
(`lowrank_layers.offload.compress_offloaded`, the CLI's ``convert --calibrate --offload``):
a first child writes the model once as a float32 safetensors folder into the cache (from
its GGUF file; not measured), the measured child holds only the tokenizer and the data
before the call (its baseline), and a third child reloads the result with
`load_pretrained` and evaluates it beside the original.

    python benchmarks/compress_memory.py [--model smollm2|qwen] [--budget 0.8] [--offload]
        [--calib-docs 64] [--seed 0] [--stage-resets] [--out out/compress_memory.md]
"""

from __future__ import annotations

import argparse
import json
import math
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import markdown_table

GIB = 2**30
NAMES = {"smollm2": "SmolLM2-135M", "qwen": "Qwen2.5-Coder-0.5B"}


def _resident_bytes() -> int:
    """This process's current resident memory (``VmRSS``)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise OSError("no VmRSS in /proc/self/status")


def _max_rss_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # kB on Linux


def child(args: argparse.Namespace) -> None:
    """Load, measure the baseline, compress, evaluate; write the figures to ``args.child``."""
    import torch
    from common import load_bbc_news
    from conversion_quality import load_qwen, load_smollm2, perplexity

    import lowrank_layers.memory
    from lowrank_layers import compress
    from lowrank_layers.text import text_batches

    torch.set_num_threads(args.threads)
    if not args.stage_resets:  # keep the whole-life peak that os.wait4 reports
        lowrank_layers.memory.reset_peak_rss = lambda: False
    texts, _ = load_bbc_news(seed=0)
    order = torch.randperm(len(texts), generator=torch.Generator().manual_seed(0)).tolist()
    c, e = args.calib_docs, args.calib_docs + args.eval_docs
    model, tokenizer = (load_qwen if args.model == "qwen" else load_smollm2)()
    calib = text_batches(tokenizer, [texts[i] for i in order[:c]], max_length=256)
    evals = text_batches(tokenizer, [texts[i] for i in order[c:e]], max_length=256, batch_size=1)
    weights = sum(p.numel() * p.element_size() for p in model.parameters())  # tied: once
    figures = {
        "weights_fp32": sum(p.numel() * 4 for p in model.parameters()),
        "weights": weights,
        "baseline_rss": _resident_bytes(),
        "load_peak": _max_rss_bytes(),
        "calib_tokens": int(sum(int(b["attention_mask"].sum()) for b in calib)),
    }
    figures["ppl_original"] = perplexity(model, evals)
    start = time.perf_counter()
    report = compress(model, calib, budget=args.budget, exclude=["lm_head"], seed=args.seed)
    figures["seconds"] = time.perf_counter() - start
    figures["compress_peak"] = _max_rss_bytes()
    figures["costs"] = {
        stage: {"seconds": c.seconds, "peak_rss": c.peak_rss, "since_start": c.since_start}
        for stage, c in report.costs.items()
    }
    figures["ppl_compressed"] = perplexity(model, evals)
    figures["plan"] = report.plan
    Path(args.child).write_text(json.dumps(figures))


def model_folder(name: str) -> Path:
    """The model as a float32 safetensors folder in the cache, written once (in a child
    process: loading the GGUF file dequantizes all of it in memory)."""
    cache = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "lowrank-bench"
    folder = cache / f"{name}-safetensors"
    if not (folder / "config.json").exists():
        code = (
            "import sys; sys.path.insert(0, sys.argv[1]); import compress_memory as m; "
            "m.write_folder(sys.argv[2], sys.argv[3])"
        )
        here = str(Path(__file__).resolve().parent)
        subprocess.run([sys.executable, "-c", code, here, name, str(folder)], check=True)
    return folder


def write_folder(name: str, folder: str) -> None:
    """Write the model (dequantized from its GGUF file, float32) and its tokenizer as a
    safetensors model folder, renamed into place when complete."""
    import shutil

    from conversion_quality import load_qwen, load_smollm2

    model, tokenizer = (load_qwen if name == "qwen" else load_smollm2)()
    model.hf_quantizer = None  # loaded from GGUF: marked quantized, which save_pretrained refuses
    model.is_quantized = False
    model.config.__dict__.pop("quantization_config", None)
    tmp = Path(folder + ".part")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    tmp.rename(folder)


def offload_child(args: argparse.Namespace) -> None:
    """Compress the model folder from disk; the baseline holds the tokenizer and the data."""
    import torch
    from common import load_bbc_news
    from transformers import AutoTokenizer

    import lowrank_layers.memory
    from lowrank_layers import ConversionConfig
    from lowrank_layers.offload import compress_offloaded
    from lowrank_layers.safetensors_io import locate_files, read_header
    from lowrank_layers.text import text_batches

    torch.set_num_threads(args.threads)
    if not args.stage_resets:
        lowrank_layers.memory.reset_peak_rss = lambda: False
    folder = Path(args.folder)
    texts, _ = load_bbc_news(seed=0)
    order = torch.randperm(len(texts), generator=torch.Generator().manual_seed(0)).tolist()
    tokenizer = AutoTokenizer.from_pretrained(folder)
    calib = text_batches(tokenizer, [texts[i] for i in order[: args.calib_docs]], max_length=256)
    numel = 0
    for f in locate_files(folder).files:
        header, _ = read_header(f)
        numel += sum(math.prod(v["shape"]) for k, v in header.items() if k != "__metadata__")
    figures = {
        "weights_fp32": numel * 4,
        "baseline_rss": _resident_bytes(),
        "load_peak": _max_rss_bytes(),
        "calib_tokens": int(sum(int(b["attention_mask"].sum()) for b in calib)),
    }
    config = ConversionConfig(budget=args.budget, exclude=["lm_head"], seed=args.seed)
    start = time.perf_counter()
    report = compress_offloaded(folder, args.dst, calib, config, overwrite=True)
    figures["seconds"] = time.perf_counter() - start
    figures["compress_peak"] = _max_rss_bytes()
    figures["costs"] = {
        stage: {"seconds": c.seconds, "peak_rss": c.peak_rss, "since_start": c.since_start}
        for stage, c in report.costs.items()
    }
    figures["plan"] = report.plan
    Path(args.child).write_text(json.dumps(figures))


def evaluate_child(args: argparse.Namespace) -> None:
    """Held-out perplexity of the original folder and of the compressed one, reloaded."""
    import torch
    from common import load_bbc_news
    from conversion_quality import perplexity
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from lowrank_layers import load_pretrained
    from lowrank_layers.text import text_batches

    torch.set_num_threads(args.threads)
    texts, _ = load_bbc_news(seed=0)
    order = torch.randperm(len(texts), generator=torch.Generator().manual_seed(0)).tolist()
    c, e = args.calib_docs, args.calib_docs + args.eval_docs
    tokenizer = AutoTokenizer.from_pretrained(args.folder)
    evals = text_batches(tokenizer, [texts[i] for i in order[c:e]], max_length=256, batch_size=1)
    original = AutoModelForCausalLM.from_pretrained(args.folder, dtype=torch.float32).eval()
    figures = {"ppl_original": perplexity(original, evals)}
    del original
    compressed = load_pretrained(args.dst)
    figures["ppl_compressed"] = perplexity(compressed, evals)
    Path(args.child).write_text(json.dumps(figures))


def run_child(argv: list[str]) -> tuple[dict, int]:
    """Run this script as a child; its figures and its peak resident bytes from ``os.wait4``."""
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "figures.json"
        env = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_")}
        env.setdefault("HF_HUB_OFFLINE", "1")
        proc = subprocess.Popen([sys.executable, __file__, *argv, "--child", str(out)], env=env)
        _, status, usage = os.wait4(proc.pid, 0)
        if os.waitstatus_to_exitcode(status) != 0:
            raise SystemExit(f"the child failed with status {os.waitstatus_to_exitcode(status)}")
        return json.loads(out.read_text()), usage.ru_maxrss * 1024


def table(f: dict, peak: int, stage_resets: bool) -> str:
    """The markdown table of one run's figures."""
    fp32 = f["weights_fp32"]
    added = peak - f["baseline_rss"]
    since = ", since the last stage began" if stage_resets else ""
    rows = [
        ("model weights, fp32 (tied once)", f"{fp32 / GIB:.2f}", "1.00x"),
        ("loaded baseline (VmRSS)", f"{f['baseline_rss'] / GIB:.2f}", "-"),
        ("peak while loading (ru_maxrss)", f"{f['load_peak'] / GIB:.2f}", "-"),
        (
            f"**peak of the process (os.wait4{since})**",
            f"{peak / GIB:.2f}",
            f"{peak / fp32:.2f}x (whole process)",
        ),
        ("**peak minus baseline**", f"{added / GIB:.2f}", f"{added / fp32:.2f}x"),
    ]
    for stage, c in f["costs"].items():
        since = " (since start)" if c["since_start"] else ""
        over = (c["peak_rss"] - f["baseline_rss"]) / fp32
        rows.append((f"stage {stage}: peak RSS{since}, {c['seconds']:.0f} s",
                     f"{c['peak_rss'] / GIB:.2f}", f"{over:.2f}x"))  # fmt: skip
    return markdown_table(["what", "GiB", "over baseline, x fp32 weights"], rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", choices=("smollm2", "qwen"), default="smollm2")
    parser.add_argument("--budget", type=float, default=0.8)
    parser.add_argument("--calib-docs", type=int, default=64)
    parser.add_argument("--eval-docs", type=int, default=32)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0, help="compress's seed (the gradient "
                        "pass's token subset and sampled targets)")  # fmt: skip
    parser.add_argument("--stage-resets", action="store_true",
                        help="keep the library's per-stage VmHWM resets (os.wait4 then sees "
                        "only the last stage)")  # fmt: skip
    parser.add_argument(
        "--offload", action="store_true", help="compress from disk, one block at a time"
    )
    parser.add_argument("--out", type=Path, default=None, help="also write the table here")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--role", default="compress", help=argparse.SUPPRESS)
    parser.add_argument("--folder", help=argparse.SUPPRESS)
    parser.add_argument("--dst", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        {"compress": child, "offload": offload_child, "evaluate": evaluate_child}[args.role](args)
        return
    argv = [f"--model={args.model}", f"--budget={args.budget}", f"--seed={args.seed}",
            f"--calib-docs={args.calib_docs}", f"--eval-docs={args.eval_docs}",
            f"--threads={args.threads}"]  # fmt: skip
    argv += ["--stage-resets"] if args.stage_resets else []
    call = "compress"
    if args.offload:
        folder = model_folder(args.model)
        with tempfile.TemporaryDirectory() as tmp:
            paths = [f"--folder={folder}", f"--dst={Path(tmp) / 'compressed'}"]
            f, peak = run_child([*argv, *paths, "--role=offload"])
            f.update(run_child([*argv, *paths, "--role=evaluate"])[0])
        call = "compress_offloaded (weights on disk, one block at a time)"
    else:
        f, peak = run_child(argv)
    ratio = f["ppl_compressed"] / f["ppl_original"]
    baseline = "tokenizer + data, no model" if args.offload else "model + data"
    text = (
        f"{NAMES[args.model]}, {call}: budget={args.budget}, exclude=['lm_head'], "
        f"seed={args.seed}; loaded baseline: {baseline}; on "
        f"{args.calib_docs} BBC articles ({f['calib_tokens']} tokens), in a child process; "
        f"compress took {f['seconds']:.0f} s; held-out perplexity {f['ppl_original']:.3f} -> "
        f"{f['ppl_compressed']:.3f} ({ratio:.3f}x); "
        f"{'per-stage VmHWM resets kept' if args.stage_resets else 'VmHWM resets disabled'}\n\n"
        + table(f, peak, args.stage_resets)
    )
    if f["compress_peak"] < peak:
        text += (
            f"\n\nThe evaluation after compress raised the peak from "
            f"{f['compress_peak'] / GIB:.2f} GiB."
        )
    print(text)
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text + "\n\nplan: " + json.dumps(f["plan"]) + "\n")


if __name__ == "__main__":
    main()
