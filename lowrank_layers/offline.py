"""Checkpoints without model code: ``convert_checkpoint`` and ``weight_spectra``.

:func:`convert_checkpoint` factorizes the 2-D weights of a dense safetensors checkpoint
(a file, a sharded checkpoint's index, or a transformers model folder) into a
lowrank-layers checkpoint, one tensor at a time, in worker processes or the ranks of a
``torch.distributed`` job; :func:`weight_spectra` reads the singular values of every weight
of a checkpoint. Built on :mod:`lowrank_layers.checkpoint_format` (the format),
:mod:`lowrank_layers.safetensors_io` (the files) and :mod:`lowrank_layers.layer_plan` (the
per-layer decision :func:`~lowrank_layers.convert_model` shares).
"""

from __future__ import annotations

import json
import math
import multiprocessing
import os
import re
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from .atomic import atomic_destination, clean_leftovers, commit, named_path, remove, temp_path
from .checkpoint import copy_model_folder, write_config_entry, write_model_card
from .checkpoint_format import (
    FORMAT_NAME,
    NARROWED_WEIGHT,
    check_format,
    format_metadata,
    guard,
    guard_key,
    is_narrowed_entry,
    lowrank_quantization_config,
    open_checkpoint,
)
from .common import InputError, all_finite, check_int, progress_bar
from .config import ConversionConfig, config_from
from .factorize import NONFINITE_REASON, factorize, relative_error
from .layer_plan import Shape, check_rank, converted_report, plan_layer
from .linear import FACTOR_NAMES
from .memory import pin_mmap_threshold, release_free_heap
from .policy import factor_parameters, layer_seed, select_rank
from .report import ConversionReport, LayerReport, skipped_report, warn_if_none_converted
from .safetensors_io import (
    FLOAT_DTYPES,
    INDEX_FILE,
    SINGLE_FILE,
    CheckpointError,
    CheckpointFiles,
    ShardWriter,
    TensorReader,
    header_reserve,
    read_header,
    shard_names,
    tensor_names,
    write_file,
    write_index,
)
from .selection import check_patterns, name_matches
from .targets import warn_unmatched_exclude

__all__ = [
    "CONV1D_MODEL_TYPES",
    "CONV1D_NAMES",
    "WeightSpectrum",
    "convert_checkpoint",
    "weight_spectra",
]


@dataclass(frozen=True)
class _Job:
    """What one worker converts: some tensors of one source file into one output file."""

    src: str
    keys: tuple[str, ...]
    out: str
    config: ConversionConfig
    selected: frozenset[str]
    threads: int
    transposed: frozenset[str] = frozenset()  # Conv1D weights, stored (in, out)


# transformers model types whose projections are Conv1D, with the modules' names
CONV1D_MODEL_TYPES = frozenset({"gpt2", "openai-gpt", "imagegpt", "decision_transformer"})
CONV1D_NAMES = r"(?:.*\.)?(?:c_attn|c_proj|c_fc|q_attn)"


def _folder_config(folder: Path) -> dict[str, Any]:
    """``folder/config.json`` as a dict; empty when there is none or it is not an object."""
    try:
        config = json.loads((folder / "config.json").read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return {}
    return config if isinstance(config, dict) else {}


def _load_time_conversions(config: Mapping[str, Any]) -> list[tuple[re.Pattern[str], str]]:
    """The tensors transformers renames or merges when it loads this model type.

    transformers >= 5 keeps some checkpoints in an older layout and converts them on load
    (Mixtral's ``block_sparse_moe.experts.<i>.w1.weight`` become ``mlp.experts.gate_up_proj``):
    a factorized tensor of that layout has no place in the loaded model. Empty without
    transformers, or for a folder transformers did not write.
    """
    model_type = config.get("model_type")
    if not isinstance(model_type, str) or "transformers_version" not in config:
        return []
    try:
        from transformers.conversion_mapping import get_checkpoint_conversion_mapping
    except ImportError:
        return []
    out = []
    for transform in get_checkpoint_conversion_mapping(model_type) or []:
        targets = ", ".join(getattr(transform, "target_patterns", None) or ())
        for source in getattr(transform, "source_patterns", None) or ():
            pattern = re.compile(re.escape(source).replace(r"\*", r"[^.]+"))
            out.append((pattern, f"{source!r} -> {targets!r}"))
    return out


def _conversion_reason(key: str, conversions: list[tuple[re.Pattern[str], str]]) -> str | None:
    """Why ``key`` is not factorized: transformers converts it when loading; or None."""
    for pattern, description in conversions:
        if pattern.search(key):
            return (
                f"transformers converts this tensor when loading the model ({description}), "
                "so a factorized one could not be loaded: convert the loaded model instead "
                "(convert_model, or the CLI with --budget)"
            )
    return None


def _conv1d_keys(
    selected: set[str], conv1d: bool | str | Sequence[str] | None, folder: Path
) -> set[str]:
    """The selected ``<module>.weight`` keys stored ``(in, out)`` (see ``conv1d``)."""
    patterns: str | Sequence[str] | None
    if conv1d is None:
        model_type = _folder_config(folder).get("model_type")
        if model_type is not None:
            patterns = CONV1D_NAMES if model_type in CONV1D_MODEL_TYPES else None
        else:
            like = sorted(k for k in selected if re.fullmatch(CONV1D_NAMES, k[: -len(".weight")]))
            if like:
                raise InputError(
                    f"convert_checkpoint: {like[0]} is named like a GPT-2 Conv1D weight, stored "
                    f"(in, out), and no config.json in {folder} says which model this is: pass "
                    "conv1d=True (GPT-2's Conv1D layers) or conv1d=False (every weight is "
                    "nn.Linear's (out, in)); CLI --conv1d gpt2 / none"
                )
            patterns = None
    elif isinstance(conv1d, bool):
        patterns = CONV1D_NAMES if conv1d else None
    else:
        patterns = conv1d
    if patterns is None:
        return set()
    return {k for k in selected if name_matches(k[: -len(".weight")], patterns)}


def _is_expert_tensor(key: str, info: dict[str, Any]) -> bool:
    """A fused 3-D expert tensor of a mixture of experts (``...experts.gate_up_proj``)."""
    return len(info["shape"]) == 3 and info["dtype"] in FLOAT_DTYPES and "expert" in key.lower()


def _expert_report(key: str, info: dict[str, Any]) -> LayerReport:
    n = math.prod(info["shape"])
    shape = "x".join(map(str, info["shape"]))
    return LayerReport(
        key, "experts (3-D)", None, None, None, n, n, None, 0.0,
        f"fused 3-D expert tensor ({shape}) is not converted",
    )  # fmt: skip


def convert_checkpoint(
    src: str | os.PathLike,
    dst: str | os.PathLike,
    config: ConversionConfig | None = None,
    *,
    conv1d: bool | str | Sequence[str] | None = None,
    workers: int = 1,
    overwrite: bool = False,
    progress: bool = False,
    **options: Any,
) -> ConversionReport:
    """Factorize the 2-D weights of a safetensors checkpoint, without model code.

    What to convert is a :class:`~lowrank_layers.ConversionConfig` (``config``) or its
    fields as keywords (``convert_checkpoint(src, dst, param_ratio=0.5)``), not both; its
    rank rule is a rank policy (a budget or a plan needs the model: use
    :func:`~lowrank_layers.compress` or :func:`~lowrank_layers.convert_model`).

    ``src`` is a ``.safetensors`` file, a sharded checkpoint's ``.index.json``, or a
    folder (a transformers model folder: its other files — config, tokenizer — are copied
    to ``dst``). Each tensor ``<module>.weight`` that is 2-D, floating point, selected by
    ``include`` / ``exclude`` (matched against ``<module>`` as in
    :func:`~lowrank_layers.convert_model`), not an embedding (unless ``embeddings=True``),
    and given a rank by the rule every conversion shares
    (:func:`~lowrank_layers.layer_plan.plan_layer`: threshold, break-even, speed) is read,
    factorized and written as ``<module>.U/.S/.Vh(/.D)``; every other tensor is copied
    bit for bit. Tensors are read and written one at a time: peak memory stays near the
    largest tensor and its factors, not the checkpoint: for 4096x8192 float32 weights,
    1.8x one weight above the import in the CLI or in worker processes (which return freed
    memory to the OS at once), about 2x in a process of the caller's own.

    The result loads with :func:`load_lowrank` into the dense architecture and gives the
    same outputs as :func:`~lowrank_layers.convert_model` with the same policy, method and
    seed. ``dst`` is a file when ``src`` is one file and ``dst`` ends in ``.safetensors``
    (with several ``workers``, their parts are merged into it; not under
    ``torch.distributed``, which needs a folder), else a folder mirroring ``src``'s shards
    (one shard per worker for a single-file source) with an index. It is written under a
    temporary name beside it and renamed at the end: nothing appears at ``dst`` unless the
    whole conversion succeeds, and an existing ``dst`` (with ``overwrite=True``) is
    replaced whole, a folder with all of its files.

    GPT-2 (transformers' ``Conv1D``) stores its projection weights ``(in, out)``, the
    transpose of ``nn.Linear``'s, which the tensors alone do not tell. ``conv1d`` says
    which weights are stored so: ``None`` (default) reads ``config.json`` beside the
    checkpoint (``model_type`` gpt2, openai-gpt, imagegpt or decision_transformer: their
    ``c_attn``, ``c_proj``, ``c_fc``, ``q_attn``) and, without a config, refuses a
    checkpoint with such names rather than guess; ``True`` / ``False``: those names are /
    no weight is ``Conv1D``; a regex or list (as ``include``): these modules are. Such a
    weight is factorized as the ``(out, in)`` matrix it is, and :func:`load_lowrank` puts
    the low-rank layer in place of the model's ``Conv1D``.

    A folder ``dst`` gets copies of the source folder's other files and subfolders (config,
    tokenizer, a sentence-transformers model's ``modules.json`` and ``1_Pooling/``; not
    its weights), and ``config.json`` a ``quantization_config`` describing the low-rank
    layers (see :func:`~lowrank_layers.load_pretrained`). Fused 3-D expert tensors
    (``...experts.gate_up_proj``) are copied and reported as not converted.

    Work is shared by ``workers`` processes on this machine, or, when called inside an
    initialised ``torch.distributed`` job (torchrun), by its ranks: each rank converts its
    share of the files into a common temporary folder and rank 0 writes the index and
    commits. Every rank returns the full report.

    Raises:
        FileNotFoundError, CheckpointError: a missing or unreadable ``src``.
        FileExistsError: ``dst`` exists and ``overwrite`` is False.
        NotADirectoryError: a folder above ``dst`` is a file.
        ValueError, TypeError: bad options (named, with the value and what is allowed).
    """
    config = config_from(config, options, caller="convert_checkpoint")
    _check_config(config)
    check_int("workers", workers)
    if conv1d is not None and not isinstance(conv1d, bool):
        check_patterns("conv1d", conv1d)
    src, dst = Path(src), named_path(Path(dst))
    ckpt = open_checkpoint(src)
    if ckpt.metadata.get("format") == FORMAT_NAME:
        raise CheckpointError(f"{src} is already a {FORMAT_NAME} checkpoint")
    headers = {f: read_header(f)[0] for f in ckpt.files}
    report = ConversionReport()
    selected = _select_tensors(ckpt, headers, config, report, src)
    transposed = _conv1d_keys(selected, conv1d, ckpt.folder or src.parent)
    world, rank_id = _dist_world()
    one_file = len(ckpt.files) == 1 and dst.suffix == ".safetensors"
    if one_file and world > 1:
        raise InputError(
            f"dst {str(dst)!r} names one .safetensors file, but the {world} ranks of a "
            "torch.distributed conversion write a folder (one shard per rank): pass a folder"
        )
    single_out = one_file and workers == 1  # else the workers' parts are merged into dst
    plan = _output_plan(ckpt, headers, max(workers, world), single_out)
    total_threads = torch.get_num_threads()
    threads = max(1, total_threads // max(1, min(workers, len(plan))))

    def jobs_in(folder: Path) -> list[_Job]:
        return [
            _Job(
                str(f),
                keys,
                str(folder / name) if not single_out else str(folder),
                config,
                frozenset(selected & set(keys)),
                threads if workers > 1 else total_threads,
                frozenset(transposed & set(keys)),
            )
            for f, keys, name in plan
        ]

    if world > 1:
        results = _run_distributed(jobs_in, dst, overwrite, rank_id, world, ckpt, plan, single_out)
    elif one_file and not single_out:  # several workers, one output file
        with atomic_destination(dst, is_dir=False, overwrite=overwrite) as tmp:
            parts = temp_path(named_path(dst))
            parts.mkdir()
            try:
                jobs = jobs_in(parts)
                results = _run_jobs(jobs, workers, progress)
                _merge_parts(tmp, [Path(job.out) for job in jobs], results)
            finally:
                remove(parts)
    else:
        with atomic_destination(dst, is_dir=not single_out, overwrite=overwrite) as tmp:
            results = _run_jobs(jobs_in(tmp), workers, progress)
            if not single_out:
                _finish_folder(tmp, ckpt, results, plan)
    for layer_reports, _, _, _ in results:
        report.layers.extend(layer_reports)
    report.layers.sort(key=lambda r: r.name)
    report.model_params_after = report.model_params_before - sum(
        r.params_before - r.params_after for r in report.converted
    )
    warn_if_none_converted(report, "convert_checkpoint", stacklevel=2)
    return report


def _select_tensors(
    ckpt: CheckpointFiles,
    headers: Mapping[Path, Mapping[str, Any]],
    config: ConversionConfig,
    report: ConversionReport,
    src: Path,
) -> set[str]:
    """The weights ``config`` selects; counts every tensor's parameters into ``report`` and
    reports fused experts and weights that transformers converts on load."""
    conversions = _load_time_conversions(_folder_config(ckpt.folder or src.parent))
    warn_unmatched_exclude(_module_names(headers), config.exclude)
    selected: set[str] = set()
    for f in ckpt.files:
        for key, info in headers[f].items():
            if key == "__metadata__":
                continue
            report.model_params_before += math.prod(info["shape"])
            module = key[: -len(".weight")] if key.endswith(".weight") else None
            if _is_expert_tensor(key, info):
                report.layers.append(_expert_report(key, info))
                continue
            if (
                module is None
                or len(info["shape"]) != 2
                or info["dtype"] not in FLOAT_DTYPES
                or not config.selects(module)
                or config.keeps_embedding(module)
            ):
                continue
            reason = _conversion_reason(key, conversions)
            if reason is not None:
                out_f, in_f = info["shape"]
                n = out_f * in_f
                report.layers.append(skipped_report(module, "Linear", in_f, out_f, n, reason))
                continue
            selected.add(key)
    if not selected:
        raise InputError(
            f"convert_checkpoint: no 2-D weight of {src} matched (include={config.include!r}, "
            f"exclude={config.exclude!r}, embeddings={config.embeddings})"
        )
    return selected


def _module_names(headers: Mapping[Path, Mapping[str, Any]]) -> set[str]:
    """The names of the modules a checkpoint's tensors belong to, their parents included
    (``a.b.weight`` gives ``a`` and ``a.b``), as a model's ``named_modules`` lists them."""
    names = set()
    for header in headers.values():
        for key in header:
            parts = key.split(".")[:-1]
            names.update(".".join(parts[: i + 1]) for i in range(len(parts)))
    return names


def _output_plan(
    ckpt: CheckpointFiles, headers: Mapping[Path, Mapping[str, Any]], parts: int, single: bool
) -> list[tuple[Path, tuple[str, ...], str]]:
    """``(source file, its tensors, output name)`` per job: a sharded source's shards, or a
    single file's tensors balanced into ``parts`` (one output file when ``single``)."""
    if len(ckpt.files) > 1:
        return [(f, tuple(tensor_names(headers[f])), f.name) for f in ckpt.files]
    f = ckpt.files[0]
    groups = _balance(tensor_names(headers[f]), headers[f], parts)
    names = [SINGLE_FILE] if single else shard_names(len(groups))
    return [(f, tuple(g), n) for g, n in zip(groups, names, strict=True)]


def _merge_parts(out: Path, parts: Sequence[Path], results: Sequence[tuple]) -> None:
    """Copy the workers' part files into one safetensors file, one tensor at a time."""
    metadata = format_metadata(_merged_layers(results), {})
    keys = [key for _, written, _, _ in results for key in written]

    def tensors() -> Iterable[torch.Tensor]:
        for part, (_, written, _, _) in zip(parts, results, strict=True):
            with TensorReader(part) as reader:
                for key in written:
                    yield reader.get(key)

    write_file(out, keys, tensors(), metadata)


def _merged_layers(results: Sequence[tuple]) -> dict[str, Any]:
    """The layer descriptions of every job's result, merged."""
    layers: dict[str, Any] = {}
    for _, _, part_layers, _ in results:
        layers.update(part_layers)
    return layers


def _balance(keys: list[str], header: dict[str, Any], n: int) -> list[list[str]]:
    """Split keys into ``n`` groups of similar byte size (largest first, into the lightest)."""
    n = max(1, min(n, len(keys)))
    sizes = {k: header[k]["data_offsets"][1] - header[k]["data_offsets"][0] for k in keys}
    groups: list[list[str]] = [[] for _ in range(n)]
    loads = [0] * n
    for key in sorted(keys, key=lambda k: (-sizes[k], k)):
        i = loads.index(min(loads))
        groups[i].append(key)
        loads[i] += sizes[key]
    order = {k: i for i, k in enumerate(keys)}
    return [sorted(g, key=order.__getitem__) for g in groups]


def _run_jobs(jobs: list[_Job], workers: int, progress: bool) -> list[tuple]:
    if workers == 1 or len(jobs) == 1:
        return [_convert_job(job, progress=progress) for job in jobs]
    ctx = multiprocessing.get_context("spawn")
    # the workers are processes of their own: their allocator can be set for conversion
    with ctx.Pool(min(workers, len(jobs)), initializer=pin_mmap_threshold) as pool:
        return pool.map(_convert_job, jobs)


def _convert_job(job: _Job, progress: bool = False) -> tuple:
    """Convert one job's tensors into its output file; returns (reports, keys, layers, bytes)."""
    torch.set_num_threads(job.threads)
    header, _ = read_header(Path(job.src))
    out_keys: list[str] = []
    for key in job.keys:
        if key in job.selected:
            module = key[: -len(".weight")]
            out_keys += [f"{module}.{n}" for n in (*FACTOR_NAMES, "weight")]
        else:
            out_keys.append(key)
    layers_bound = sum(len(k) + 200 for k in job.selected)
    reports: list[LayerReport] = []
    layers: dict[str, Any] = {}
    written: list[str] = []
    bias_of = {k[: -len(".bias")] for k in header if k.endswith(".bias")}
    keys: Iterable[str] = job.keys
    if progress:
        keys = progress_bar(job.keys, desc=Path(job.src).name, unit="tensor")
    with (
        ShardWriter(Path(job.out), header_reserve(out_keys, layers_bound + 512)) as writer,
        TensorReader(Path(job.src)) as reader,
    ):
        for key in keys:
            # Memory held per tensor W, beside the process's baseline (figures for a
            # 4096x8192 float32 W of 128 MiB at rank 410, CLI; MiB):
            #   read       W alone, read straight into its storage (get):   128
            #   factorize  + the SVD's working matrices, then the factors:   ≤ 55
            #   rel. error + the factors (20) and float64 (·, r) matrices:  ≤ 65
            #   write      the factors, from their own storage; W dropped:   20
            # plus ~35 that stays after the first tensor (MKL's cached buffers, code
            # pages): peak ≈ 225 above the import, under 2·W. Every name is unbound
            # before the next read (one still bound while `reader.get` runs holds two
            # tensors at once), and the heap's free pages go back to the OS.
            tensor = reader.get(key)
            if key not in job.selected:
                writer.add(key, tensor)
                written.append(key)
                del tensor
                continue
            module = key[: -len(".weight")]
            start = time.perf_counter()
            conv1d = key in job.transposed  # (in, out): factorize its (out, in) view
            W = tensor.t() if conv1d else tensor
            entry = _factorize_tensor(
                module, W, job.config, bias=module in bias_of, kind="Conv1D" if conv1d else "Linear"
            )
            del W
            if isinstance(entry, LayerReport):  # skipped: copy the weight unchanged
                writer.add(key, tensor)
                written.append(key)
                reports.append(entry)
                del tensor, entry
                release_free_heap()
                continue
            factors, layer_report, layer_entry = entry
            dtype = tensor.dtype
            del entry, tensor  # the factors alone are written
            for name in list(factors):
                writer.add(f"{module}.{name}", factors.pop(name))
                written.append(f"{module}.{name}")
            writer.add(guard_key(module), guard(dtype))
            written.append(guard_key(module))
            layer_report.seconds = time.perf_counter() - start
            reports.append(layer_report)
            layers[module] = layer_entry
            release_free_heap()
        size = writer.finish(format_metadata(layers, {}))
    return reports, written, layers, size


def _factorize_tensor(
    module: str,
    W: torch.Tensor,
    config: ConversionConfig,
    *,
    bias: bool,
    kind: str = "Linear",
) -> tuple[dict[str, torch.Tensor], LayerReport, dict[str, Any]] | LayerReport:
    """Factorize one ``(out, in)`` weight ``W`` (a transposed view for a ``Conv1D``), or the
    report of why it stays as it is."""
    out_f, in_f = W.shape
    shape = Shape(out_f, in_f, bias, W.dtype)

    def skipped(reason: str) -> LayerReport:
        return skipped_report(module, kind, in_f, out_f, W.numel(), reason)

    rule, reason = plan_layer(shape, config.policy, config)  # type: ignore[arg-type]
    if rule is None:
        return skipped(reason)  # type: ignore[arg-type]
    if not all_finite(W):  # two scalars; torch.isfinite(W) built 1.75·W of temporaries
        return skipped(NONFINITE_REASON)
    generator = torch.Generator().manual_seed(layer_seed(config.seed, module))
    # beside W: the randomized SVD's (·, rank + 10) working matrices, at most an iterate,
    # its LU basis and the next (≤ 55 MiB for 4096x8192 at rank 410, ~0.4·W, factors
    # included); or the exact SVD's U, S, Vh. No float32 copy of a float32 W.
    factors = factorize(W, rule, method=config.method, balance=config.balance, generator=generator)
    # the SVD's freed working matrices may stay in the heap, fragmented: give their pages
    # back before relative_error allocates its own (float64 (·, rank) matrices and blocks
    # of rows: ≤ 45 MiB for 4096x8192 at rank 410, ≤ 60 MiB when the error is below 10%)
    release_free_heap()
    reason = check_rank(shape, factors.rank, rule, config)
    if reason is not None:
        return skipped(reason)
    tensors = {
        "U": factors.U.contiguous(),
        "S": factors.S.contiguous(),
        "Vh": factors.V.mT.contiguous(),
    }
    if factors.D is not None:
        tensors["D"] = factors.D.contiguous()
    report = converted_report(
        module, "LowRankLinear", shape, factors.rank, row_scales=config.row_scales,
        relative_error=relative_error(W, factors),
    )  # fmt: skip
    entry = {
        "type": "LowRankLinear",
        "in_features": in_f,
        "out_features": out_f,
        "rank": factors.rank,
        "balance": factors.D is not None,
        "bias": bias,
    }
    return tensors, report, entry


def _check_config(config: ConversionConfig) -> None:
    """What a conversion without model code can do: a rank policy for ``LowRankLinear``
    layers, selected by name."""
    if config.policy is None:
        what = "no rank rule" if config.rule is None else config.rule
        raise InputError(
            f"convert_checkpoint takes a rank policy (rank, rank_ratio, energy or param_ratio), "
            f"got {what}: a budget or a rank plan needs the model to run (compress, "
            "convert_model)"
        )
    if config.filter_fn is not None:
        raise InputError(
            "convert_checkpoint selects weights by name (include, exclude); filter_fn needs "
            "the modules: use convert_model"
        )
    if config.layer != "lowrank":
        raise InputError(
            f"convert_checkpoint writes LowRankLinear layers, got layer={config.layer!r}: "
            "convert the loaded model with convert_model"
        )


def _finish_folder(tmp: Path, ckpt: CheckpointFiles, results: list[tuple], plan: list) -> None:
    """Beside the converted shards: the source folder's other files, the index (several
    shards), ``config.json``'s description of the low-rank layers and the model card."""
    if ckpt.folder is not None:
        copy_model_folder(ckpt.folder, tmp)
    layers = _merged_layers(results)
    write_config_entry(tmp / "config.json", lowrank_quantization_config(layers))
    write_model_card(tmp, layers)
    if len(plan) == 1 and plan[0][2] == SINGLE_FILE:
        return
    weight_map: dict[str, str] = {}
    total = 0
    for (_, _, name), (_, written, _, size) in zip(plan, results, strict=True):
        weight_map.update(dict.fromkeys(written, name))
        total += size
    write_index(tmp / INDEX_FILE, weight_map, format_metadata(layers, {}), total)


def _dist_world() -> tuple[int, int]:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_world_size(), torch.distributed.get_rank()
    return 1, 0


def _run_distributed(jobs_in, dst, overwrite, rank_id, world, ckpt, plan, single_out):
    """Each rank converts jobs rank, rank + world, ...; rank 0 writes the index and commits."""
    import torch.distributed as dist

    if single_out:  # cannot happen: world > 1 always writes a folder
        raise AssertionError("distributed conversion writes a folder")
    box: list[Any] = [None]
    error: list[Any] = [None]
    if rank_id == 0:
        try:
            if dst.exists() and not overwrite:
                raise FileExistsError(f"{dst} already exists (pass overwrite=True to replace it)")
            dst.parent.mkdir(parents=True, exist_ok=True)
            clean_leftovers(dst.parent, re.escape(dst.name))
            tmp = temp_path(dst)
            tmp.mkdir()
            box[0] = str(tmp)
        except BaseException as exc:
            error[0] = repr(exc)
    dist.broadcast_object_list(box, src=0)
    dist.broadcast_object_list(error, src=0)
    if error[0] is not None:
        raise FileExistsError(error[0]) if "FileExistsError" in error[0] else RuntimeError(error[0])
    tmp = Path(box[0])
    jobs = jobs_in(tmp)
    mine = {i: _convert_job(job) for i, job in enumerate(jobs) if i % world == rank_id}
    gathered: list[Any] = [None] * world
    dist.all_gather_object(gathered, mine)
    results = [None] * len(jobs)
    for part in gathered:
        for i, res in part.items():
            results[i] = res
    if rank_id == 0:
        try:
            _finish_folder(tmp, ckpt, results, plan)
            commit(tmp, dst)
        except BaseException:
            remove(tmp)
            raise
    dist.barrier()
    return results


# ------------------------------------------------------------------------------------------
# inspecting
# ------------------------------------------------------------------------------------------


@dataclass
class WeightSpectrum:
    """The singular values of one 2-D weight (or of a stored low-rank layer's ``S``)."""

    name: str
    out_features: int
    in_features: int
    singular_values: torch.Tensor
    stored_rank: int | None = None  # set for low-rank layers of a lowrank-layers checkpoint

    def rank_for(self, energy: float) -> int:
        return select_rank(self.singular_values, energy)

    def params_at(self, rank: int) -> int:
        return factor_parameters(self.out_features, self.in_features, rank, row_scales=False)


def weight_spectra(
    path: str | os.PathLike, *, include: str | Sequence[str] | None = None
) -> list[WeightSpectrum]:
    """Singular values of every 2-D floating-point ``*.weight`` in a checkpoint.

    Low-rank layers of a lowrank-layers checkpoint report the singular values of their
    stored factors (``diag(D)·U·diag(S)·Vᵀ``, computed from the small factors); narrowed
    dense layers, those of their stored (narrowed) weight. Tensors are
    read one at a time; each exact SVD runs in float32.
    """
    check_patterns("include", include)
    ckpt = open_checkpoint(Path(path))
    layers: dict[str, Any] = {}
    if ckpt.metadata.get("format") == FORMAT_NAME:
        layers, _ = check_format(ckpt.metadata, Path(path))
    readers: dict[Path, TensorReader] = {}

    def get(key: str) -> torch.Tensor:
        f = ckpt.weight_map[key]
        if f not in readers:
            readers[f] = TensorReader(f)
        return readers[f].get(key)

    spectra: list[WeightSpectrum] = []
    try:
        for key in sorted(ckpt.weight_map):
            module = key[: -len(".weight")] if key.endswith(".weight") else None
            if module is None or (include is not None and not name_matches(module, include)):
                continue
            W = get(key)
            if W.dim() != 2 or not W.is_floating_point():
                continue
            sv = torch.linalg.svdvals(W.to(torch.float32))
            spectra.append(WeightSpectrum(module, W.shape[0], W.shape[1], sv))
        for module, entry in sorted(layers.items()):
            if include is not None and not name_matches(module, include):
                continue
            if is_narrowed_entry(entry):  # a dense weight, stored under another name
                W = get(f"{module}.{NARROWED_WEIGHT}").to(torch.float32)
                spectra.append(WeightSpectrum(module, *W.shape, torch.linalg.svdvals(W)))
                continue
            parts = {
                n: get(f"{module}.{n}").to(torch.float32)
                for n in (*FACTOR_NAMES, "V")  # V: format 1
                if f"{module}.{n}" in ckpt.weight_map
            }
            U = parts["U"] * parts["D"][:, None] if "D" in parts else parts["U"]
            _, Ru = torch.linalg.qr(U)
            _, Rv = torch.linalg.qr(parts["Vh"].mT if "Vh" in parts else parts["V"])
            sv = torch.linalg.svdvals((Ru * parts["S"]) @ Rv.mT)
            spectra.append(
                WeightSpectrum(
                    module, entry["out_features"], entry["in_features"], sv, entry["rank"]
                )
            )
    finally:
        for reader in readers.values():
            reader.close()
    spectra.sort(key=lambda s: s.name)
    return spectra
