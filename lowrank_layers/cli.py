"""The ``lowrank-layers`` command line: ``convert``, ``inspect``.

Exit codes (docs/cli.md): 0 done; 2 a user mistake (a missing file, a file that is not
safetensors, an out-of-range value, conflicting flags, an existing DST without
``--overwrite``), found before any work; 1 the operating system refused to read or write
a path (permission denied, read-only file system, a file where a folder should be, disk
full); 130 interrupted (Ctrl-C), 128 + N ended by signal N (143: SIGTERM). Errors are one
line on stderr naming the path or value; a run that fails or is stopped leaves no
temporary file behind. Only the user's mistakes are usage errors: the library's
``InputError`` / ``InputTypeError`` (bad arguments, unreadable checkpoints) and the CLI's
own ``UsageError``. Any other exception is a bug, and propagates with its traceback
(exit code 1), so that it is seen and reported rather than passed off as a usage error.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
import os
import signal
import sys
import tempfile
import threading
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any, NoReturn

from . import __version__
from .atomic import destination_of, named_path
from .common import InputError, InputTypeError
from .config import ConversionConfig, HealConfig

__all__ = ["main"]

EXIT_ENVIRONMENT = 1
EXIT_USAGE = 2
EXIT_INTERRUPTED = 130


class UsageError(Exception):
    """A mistake of the user's: reported as one line, exit code 2."""


class EnvironmentProblem(Exception):
    """The operating system refused to read or write a path: one line, exit code 1."""


class _Terminated(BaseException):
    """Raised by the handler of SIGTERM (or SIGHUP): unwinds, so that cleanups run."""

    def __init__(self, signum: int) -> None:
        super().__init__(signum)
        self.signum = signum


class _Parser(argparse.ArgumentParser):
    """argparse, but its errors are one line (``lowrank-layers: error: ...``)."""

    def error(self, message: str) -> NoReturn:
        raise UsageError(message)


def _typed(convert, accept, allowed: str):
    """An argparse type: ``convert(text)`` that must satisfy ``accept``, else ``allowed``."""

    def parse(text: str):
        try:
            value = convert(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {allowed}, got {text!r}") from None
        if not accept(value):
            raise argparse.ArgumentTypeError(f"expected {allowed}, got {text}")
        return value

    return parse


_fraction = _typed(float, lambda v: 0.0 < v <= 1.0, "a number in (0, 1]")
_positive_int = _typed(int, lambda v: v >= 1, "a positive integer")
_non_negative_int = _typed(int, lambda v: v >= 0, "an integer >= 0")
_positive_float = _typed(float, lambda v: v > 0.0, "a number > 0")


def _build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="lowrank-layers", description="Low-rank replacements for nn.Linear.")
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)

    _add_convert(sub)
    _add_inspect(sub)
    return parser


def _add_convert(sub: Any) -> None:
    convert = sub.add_parser(
        "convert",
        help="factorize the Linear weights of a safetensors checkpoint",
        description="Factorize the 2-D weights of a safetensors checkpoint (a file, a sharded "
        "index, or a transformers model folder) and write a lowrank-layers checkpoint.",
    )
    convert.add_argument("src", type=Path, help=".safetensors file, .index.json, or folder")
    convert.add_argument("dst", type=Path, help="output .safetensors file or folder")
    _add_rule_flags(convert)
    _add_config_flags(convert)
    _add_compress_flags(convert)
    convert.add_argument(
        "--conv1d",
        choices=["auto", "gpt2", "none"],
        default="auto",
        help="which weights are stored (in, out) like GPT-2's Conv1D: 'auto' (from SRC's "
        "config.json; refused without one when names look like GPT-2's), 'gpt2' (c_attn, "
        "c_proj, c_fc, q_attn), 'none'",
    )
    convert.add_argument("--workers", type=_positive_int, default=1)
    convert.add_argument("--overwrite", action="store_true", help="replace an existing DST")
    convert.add_argument("--no-progress", action="store_true", help="no progress bar")


def _add_rule_flags(parser: argparse.ArgumentParser) -> None:
    """The rank rule: one of the policy flags or --budget, and how a budget is shared."""
    policy = parser.add_mutually_exclusive_group(required=True)
    policy.add_argument("--rank", type=_positive_int, help="the same rank for every layer")
    policy.add_argument("--rank-ratio", type=_fraction, help="rank = ratio * min(in, out)")
    policy.add_argument("--energy", type=_fraction, help="keep this fraction of sum(sigma^2)")
    policy.add_argument(
        "--param-ratio", type=_fraction, help="keep at most this fraction of each weight"
    )
    policy.add_argument(
        "--budget",
        type=_fraction,
        help="keep at most this fraction of all converted weights, ranks chosen per layer "
        "(needs a transformers model folder as SRC; see --allocation)",
    )
    policy.add_argument(
        "--target-speedup",
        type=_positive_float,
        metavar="X",
        help="with --calibrate: the least-loss plan whose modelled forward speed-up of the "
        "converted layers, at --speedup-tokens per call (default 1), reaches X (above 1)",
    )
    parser.add_argument(
        "--allocation",
        choices=["auto", "loss", "uniform", "minimax", "greedy"],
        default="auto",
        help="how --budget is shared: 'loss' (needs --calibrate: ranks from each layer's "
        "estimated effect on the output, layers may stay dense), 'uniform' (the same ratio "
        "everywhere), 'minimax' / 'greedy' (from the spectra, without --calibrate); 'auto': "
        "'loss' with --calibrate, else 'minimax'",
    )


def _add_config_flags(parser: argparse.ArgumentParser) -> None:
    """The rest of ConversionConfig's fields, spelled like them."""
    parser.add_argument("--method", choices=["svd", "randomized"], default="svd")
    parser.add_argument("--balance", choices=["none", "rownorm", "rowsum"], default="none")
    parser.add_argument("--include", help="regex on the module name (full match)")
    parser.add_argument("--exclude", help="regex on the module name (full match)")
    parser.add_argument(
        "--embeddings",
        action="store_true",
        help="also factorize weights named like embeddings (embed_tokens, wte, shared, ...)",
    )
    parser.add_argument("--threshold", type=_non_negative_int, default=0)
    parser.add_argument(
        "--min-speedup",
        type=_positive_float,
        metavar="X",
        help="keep dense every layer whose factorized forward is not expected to be at least "
        "X times as fast as nn.Linear at --speedup-tokens tokens per call",
    )
    parser.add_argument(
        "--speedup-tokens",
        type=_positive_int,
        default=None,
        metavar="N",
        help="tokens per call (batch x sequence) the speed rules are judged at (default: "
        "--min-speedup at 1, decoding one sequence; the guard at 1 and at 1024)",
    )
    parser.add_argument(
        "--no-guard",
        action="store_true",
        help="also convert the layers that cannot pay (too small, the output layer, slower "
        "than nn.Linear at every token count, reached by no gradient), which are kept "
        "dense by default",
    )
    parser.add_argument("--seed", type=int, default=0)


def _add_compress_flags(parser: argparse.ArgumentParser) -> None:
    """Calibration text (then the model goes through compress) and healing."""
    parser.add_argument(
        "--calibrate",
        type=Path,
        metavar="TEXT",
        help="compress the model (loss-aware ranks, propagated activation-aware "
        "factorization, optional healing) calibrated on this text file or folder of .txt "
        "files (needs a transformers model folder as SRC); --calib-docs documents are drawn "
        "with --seed, round-robin over the folder's subfolders",
    )
    parser.add_argument(
        "--calib-docs",
        type=_positive_int,
        default=64,
        help="how many calibration documents to draw (default 64)",
    )
    parser.add_argument("--calib-max-length", type=_positive_int, default=256)
    parser.add_argument(
        "--no-narrow-mlps",
        action="store_true",
        help="with --calibrate: never cut an MLP's intermediate width (only per-layer ranks)",
    )
    parser.add_argument(
        "--no-propagate",
        action="store_true",
        help="with --calibrate: factorize every layer from the original model's inputs "
        "instead of propagating through the converted layers",
    )
    parser.add_argument(
        "--offload",
        action="store_true",
        help="with --calibrate: keep the weights on disk and compress one block at a time, "
        "for a model larger than memory (the same result; layers outside the repeated "
        "blocks stay dense; no healing)",
    )
    parser.add_argument(
        "--heal-steps", type=_positive_int, help="then distil towards the original this long"
    )
    parser.add_argument("--heal-seconds", type=_positive_float, help="or this many seconds")
    parser.add_argument("--heal-mode", choices=["end_to_end", "blockwise"], default="end_to_end")


def _add_inspect(sub: Any) -> None:
    inspect = sub.add_parser(
        "inspect",
        help="singular-value energy of every weight in a checkpoint",
        description="Per 2-D weight: shape, the ranks keeping 90/95/99%% of the energy, "
        "the parameters kept at each and the expected speed-up of the forward.",
    )
    inspect.add_argument("path", type=Path, help=".safetensors file, .index.json, or folder")
    inspect.add_argument("--plot", type=Path, help="also write a PNG of the spectra")
    inspect.add_argument("--include", help="regex on the module name (full match)")
    inspect.add_argument(
        "--energies", type=_fraction, nargs="+", default=[0.9, 0.95, 0.99], metavar="E"
    )


def _check_writable(path: Path, flag: str, *, create: bool) -> None:
    """Refuse ``path`` (the value of ``flag``) before any work when it cannot be written.

    Its folder must exist (``create=False``) or be creatable below its nearest existing
    folder (``create=True``); that folder must accept a new file (probed with an anonymous
    temporary file, which leaves nothing).
    """
    folder = path.parent
    if not create and not folder.exists():
        raise UsageError(f"{flag} {path}: folder {folder} does not exist")
    while not folder.exists() and folder != folder.parent:
        folder = folder.parent
    if not folder.is_dir():
        raise EnvironmentProblem(f"cannot write {flag} {path}: {folder} is a file, not a folder")
    try:
        with tempfile.TemporaryFile(dir=folder):
            pass
    except OSError as exc:
        raise EnvironmentProblem(
            f"cannot write {flag} {path}: {folder}: {exc.strerror or exc}"
        ) from None


def _check_destination(dst: Path, overwrite: bool) -> None:
    """Refuse an existing DST without --overwrite, or one that cannot be written."""
    if dst.exists() and not overwrite:
        raise UsageError(f"DST {dst} already exists (pass --overwrite to replace it)")
    _check_writable(named_path(dst), "DST", create=True)


def _config(args: argparse.Namespace) -> ConversionConfig:
    """The run's one ConversionConfig, from the flags spelled like its fields (argparse
    checked each flag's range, ConversionConfig the rest)."""
    return ConversionConfig(
        rank=args.rank,
        rank_ratio=args.rank_ratio,
        energy=args.energy,
        param_ratio=args.param_ratio,
        budget=args.budget,
        target_speedup=args.target_speedup,
        allocation=args.allocation,
        include=args.include,
        exclude=args.exclude,
        threshold=args.threshold,
        embeddings=args.embeddings,
        method=args.method,
        balance=args.balance,
        seed=args.seed,
        min_speedup=args.min_speedup,
        speedup_tokens=args.speedup_tokens,
        guard=not args.no_guard,
    )


def _run_convert(args: argparse.Namespace) -> None:
    """Three routes, by what the flags need: with --calibrate, compress (the model runs on
    the text); with --budget, the model's spectra (convert_model); else the tensors alone
    (convert_checkpoint)."""
    from .memory import pin_mmap_threshold
    from .offline import convert_checkpoint

    _check_destination(args.dst, args.overwrite)
    config = _config(args)
    staged = {
        "--no-propagate": args.no_propagate,
        "--no-narrow-mlps": args.no_narrow_mlps,
        "--offload": args.offload,
        "--target-speedup": args.target_speedup is not None,
        "--heal-steps": args.heal_steps is not None,
        "--heal-seconds": args.heal_seconds is not None,
    }
    if args.calibrate is None and any(staged.values()):
        flags = ", ".join(flag for flag, given in staged.items() if given)
        raise UsageError(f"{flags} need --calibrate TEXT")
    if args.calibrate is not None or args.budget is not None:
        _run_convert_with_model(args, config)
        return
    if args.whole_process:  # the process only converts: freed temporaries go back to the OS
        pin_mmap_threshold()
    report = convert_checkpoint(
        args.src,
        args.dst,
        config,
        conv1d={"auto": None, "gpt2": True, "none": False}[args.conv1d],
        workers=args.workers,
        overwrite=args.overwrite,
        progress=not args.no_progress and args.workers == 1 and sys.stderr.isatty(),
    )
    print(report)
    print(f"wrote {args.dst}")


def _run_convert_with_model(args: argparse.Namespace, config: ConversionConfig) -> None:
    from .hf import convert_pretrained
    from .pipeline import check_compress_config
    from .text import sample_texts

    if not args.src.is_dir():
        raise UsageError(
            f"--calibrate and --budget need a transformers model folder as SRC, got {args.src}"
        )
    if args.workers != 1:
        raise UsageError("--workers applies to conversion without model code")
    texts = None
    if args.calibrate is not None:
        check_compress_config(config)  # a config error is the only line, before the texts
        sample = sample_texts(args.calibrate, args.calib_docs, args.seed)
        print(sample.describe(), file=sys.stderr)
        texts = sample.texts
    healing = args.heal_steps is not None or args.heal_seconds is not None
    heal = HealConfig(args.heal_steps, args.heal_seconds, args.heal_mode) if healing else None
    report = convert_pretrained(
        args.src,
        args.dst,
        config,
        calibration_texts=texts,
        max_length=args.calib_max_length,
        heal=heal,
        propagate=not args.no_propagate,
        narrow_mlps=not args.no_narrow_mlps,
        offload=args.offload,
        overwrite=args.overwrite,
        progress=not args.no_progress and sys.stderr.isatty(),
    )
    print(report)
    print(f"wrote {args.dst}")


def _run_inspect(args: argparse.Namespace) -> None:
    from .offline import weight_spectra
    from .speed import REPORT_TOKENS, expected_speedup

    if args.plot is not None:  # before any work: a bad path would fail after the table
        if args.plot.suffix.lower() != ".png":
            raise UsageError(f"--plot must name a .png file, got {args.plot}")
        if importlib.util.find_spec("matplotlib") is None:
            raise UsageError(
                f"--plot {args.plot} needs matplotlib: pip install 'lowrank-layers[plot]'"
            )
        _check_writable(args.plot, "--plot", create=False)
    spectra = weight_spectra(args.path, include=args.include)
    if not spectra:
        raise UsageError(f"{args.path} holds no 2-D floating-point weight")
    few, many = REPORT_TOKENS
    header = ["layer", "shape", "params", "stored rank", f"x@{few}", f"x@{many}"]
    for e in args.energies:
        header += [f"rank@{e:g}", f"kept@{e:g}", f"x@{few}"]
    rows = [header]
    for s in spectra:
        dense = s.out_features * s.in_features

        def speedup(rank: int | None, tokens: int, s=s) -> str:
            if rank is None or rank >= min(s.out_features, s.in_features):
                return "-"
            return f"{expected_speedup(s.in_features, s.out_features, rank, tokens):.2f}"

        row = [
            s.name,
            f"{s.out_features}x{s.in_features}",
            f"{dense:,}",
            "-" if s.stored_rank is None else str(s.stored_rank),
            speedup(s.stored_rank, few),
            speedup(s.stored_rank, many),
        ]
        for e in args.energies:
            r = s.rank_for(e)
            row += [str(r), f"{s.params_at(r) / dense:.0%}", speedup(r, few)]
        rows.append(row)
    widths = [max(len(r[i]) for r in rows) for i in range(len(header))]
    for i, r in enumerate(rows):
        print(
            "  ".join(
                c.ljust(w) if j == 0 else c.rjust(w)
                for j, (c, w) in enumerate(zip(r, widths, strict=True))
            ).rstrip()
        )
        if i == 0:
            print("  ".join("-" * w for w in widths))
    print(
        f"{len(spectra)} weights; 'kept' is the fraction of a weight's parameters its factors "
        "hold at that rank (above 100%: no saving); 'x@N' the expected speed-up of the "
        "forward over nn.Linear at N tokens per call (lowrank_layers.speed.expected_speedup, "
        "a model)"
    )
    if args.plot is not None:
        from .plotting import plot_spectra

        plot_spectra({s.name: s.singular_values for s in spectra}, args.plot, title=str(args.path))
        print(f"wrote {args.plot}")


def _on_signal(signum: int, frame: object) -> None:
    signal.signal(signum, signal.SIG_DFL)  # a second one ends the process at once
    raise _Terminated(signum)


@contextlib.contextmanager
def _signals_unwind() -> Iterator[None]:
    """Turn SIGTERM and SIGHUP into :class:`_Terminated` while the block runs.

    A signal's default action ends the process on the spot, leaving the temporary files of
    a write in progress; an exception unwinds through their cleanups. Only a signal left to
    its default action is taken over (one ignored, as ``nohup`` ignores SIGHUP, or handled
    by the caller stays so), and the previous handlers come back afterwards. Only in the
    main thread (the only one Python delivers signals to).
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous: dict[int, object] = {}
    for name in ("SIGTERM", "SIGHUP"):
        signum = getattr(signal, name, None)
        if signum is not None and signal.getsignal(signum) is signal.SIG_DFL:
            previous[signum] = signal.signal(signum, _on_signal)
    try:
        yield
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, signal.SIG_DFL if handler is None else handler)  # type: ignore[arg-type]


def _one_line(exc: BaseException) -> str:
    message = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
    # the library's advice names its keyword; here it is a flag
    return message.replace("pass overwrite=True", "pass --overwrite")


def _os_error_line(exc: OSError) -> str:
    """``<path>: <reason>`` for an error of the OS, the path as the user knows it."""
    reason = exc.strerror or _one_line(exc)
    if exc.filename is None:
        return reason
    return f"{destination_of(os.fsdecode(exc.filename))}: {reason}"


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``lowrank-layers`` console script; returns the exit code."""
    try:
        with _signals_unwind():
            args = _build_parser().parse_args(argv)
            # run as the program (console script, python -m): this process is ours to tune;
            # main([...]) called from Python leaves the caller's process as it is
            args.whole_process = argv is None
            commands = {"convert": _run_convert, "inspect": _run_inspect}
            commands[args.command](args)
    except (UsageError, InputError, InputTypeError, ImportError) as exc:
        print(f"lowrank-layers: error: {_one_line(exc)}", file=sys.stderr)
        return EXIT_USAGE
    except EnvironmentProblem as exc:
        print(f"lowrank-layers: error: {_one_line(exc)}", file=sys.stderr)
        return EXIT_ENVIRONMENT
    except OSError as exc:
        if exc.errno is None:  # raised by this library with a message: a path given wrong
            print(f"lowrank-layers: error: {_one_line(exc)}", file=sys.stderr)
            return EXIT_USAGE
        print(f"lowrank-layers: error: {_os_error_line(exc)}", file=sys.stderr)
        return EXIT_ENVIRONMENT
    except KeyboardInterrupt:
        print("lowrank-layers: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    except _Terminated as exc:
        name = signal.Signals(exc.signum).name
        print(f"lowrank-layers: terminated by {name}", file=sys.stderr)
        return 128 + exc.signum
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
