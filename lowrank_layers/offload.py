"""Compress a model whose weights stay on disk: one block at a time.

:func:`compress_offloaded` is :func:`~lowrank_layers.compress` for a transformers model
folder too large for memory: it reads the folder's safetensors tensors only as it needs
them and writes the converted model into a new folder as it makes it. What is resident at
any time is one block's weights and statistics, the calibration tokens' hidden states, and
whichever module outside the blocks runs at that moment (an embedding or an output head).

How (:class:`DiskModel` holds the pieces):

1. The model is built from its ``config.json`` with every parameter on the ``meta``
   device (buffers are made as usual: rotary frequencies, position ids); a parameter is
   read from the checkpoint, in the model's dtype, when its module runs, and dropped
   after. Tied parameters (an output head sharing the embedding) are read once for all
   the modules that hold them.
2. The loss-aware allocation's gradient pass runs block-major
   (:func:`~lowrank_layers.sensitivity.collect_sensitivity_blockwise`): a forward pass
   stashes each block's input on disk; the head (norm, output layer) runs on the last
   block's output to make the probe gradient; then each block, from the last, runs again
   with a gradient on its stashed input, its layers' second moments are summed and turned
   into their rank candidates while its weights are loaded, and the gradient goes on to the
   block before. A whole-model backward would hold every weight the forward read (autograd
   saves each ``nn.Linear``'s weight for the input gradient).
3. The plan is solved over all the candidates (small), as in memory.
4. The propagated conversion (:mod:`~lowrank_layers.propagate`) loads each block, converts
   it, and writes the converted block's tensors into the output file before releasing it;
   the block's layer inputs wait for their stage on disk. The tensors outside the blocks
   are copied across at the end, one at a time.

The result is the folder :func:`~lowrank_layers.hf.convert_pretrained` writes for the same
model in memory, the same plan and the same factors to float rounding: it reloads with
:func:`~lowrank_layers.load_pretrained`. Layers outside the blocks (an output head, a
pooler) stay dense: their statistics would need the whole model's passes.
"""

from __future__ import annotations

import contextlib
import os
import shutil
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .atomic import atomic_destination
from .blocks import find_blocks
from .checkpoint import (
    copy_model_folder,
    stored_entries,
    write_config_entry,
    write_model_card,
)
from .checkpoint_format import format_metadata, lowrank_quantization_config
from .common import InputError
from .config import ConversionConfig, config_from
from .hf_quantizer import auto_class_for
from .memory import release_free_heap
from .model_card import linear_layer_count
from .pipeline import CompressionReport, Offload, check_compress_config, run_compress
from .safetensors_io import (
    SINGLE_FILE,
    CheckpointError,
    CheckpointFiles,
    ShardWriter,
    TensorReader,
    header_reserve,
    locate_files,
)
from .targets import ON_DISK

__all__ = ["DiskModel", "compress_offloaded", "parameters_on_meta"]


@dataclass(eq=False)
class _Tensor:
    """One parameter of the model, wherever it is held (tied: several places)."""

    key: str  # its name in the checkpoint
    slots: list[tuple[nn.Module, str]]  # (module, attribute) holding it
    shape: torch.Size
    dtype: torch.dtype
    loaded: bool = False
    # the meta parameter standing in for it while on disk: one object for the model's life
    # (a conversion's layer selection keys weights by id, and a freed one's id is reused)
    placeholder: nn.Parameter | None = None


class DiskModel:
    """A model skeleton whose parameters stay in a safetensors checkpoint until used.

    Build it with :meth:`from_folder` (a transformers model folder) or from a model whose
    parameters are on the ``meta`` device and the checkpoint holding them. :meth:`load`
    reads a module's parameters (replacing the ``meta`` placeholders, tied places
    together), :meth:`unload` puts the placeholders back, and inside :meth:`streaming` every
    block and every other module holding parameters reads them when it runs and drops them
    when it returns, so a whole forward pass holds one block at a time.

    Raises:
        CheckpointError: the checkpoint lacks a parameter of the model.
    """

    def __init__(
        self, model: nn.Module, files: CheckpointFiles, device: torch.device | str = "cpu"
    ) -> None:
        self.model = model
        self.files = files
        self.device = torch.device(device)
        for module in model.modules():  # the buffers (rotary frequencies, ...) join them
            for name, buf in module._buffers.items():
                if buf is not None and buf.device != self.device and not buf.is_meta:
                    module._buffers[name] = buf.to(self.device)
        self._readers: dict[Path, TensorReader] = {}
        self.tensors: list[_Tensor] = []
        by_id: dict[int, _Tensor] = {}
        first_name: dict[int, str] = {}
        prefix = getattr(model, "base_model_prefix", "") or ""
        for mname, module in model.named_modules(remove_duplicate=False):
            for pname, p in module._parameters.items():
                if p is None:
                    continue
                full = f"{mname}.{pname}" if mname else pname
                entry = by_id.get(id(p))
                if entry is None:
                    entry = by_id[id(p)] = _Tensor("", [], p.shape, p.dtype)
                    first_name[id(entry)] = full
                    self.tensors.append(entry)
                if not any(m is module and n == pname for m, n in entry.slots):
                    entry.slots.append((module, pname))
                entry.key = entry.key or self._checkpoint_key(full, prefix)  # tied: any name
        missing = [first_name[id(e)] for e in self.tensors if not e.key]
        if missing:
            raise CheckpointError(
                f"the checkpoint holds no tensor for {len(missing)} parameter(s) of the "
                f"model: {', '.join(missing[:3])}{', ...' if len(missing) > 3 else ''}"
            )
        self.by_module: dict[int, list[_Tensor]] = {}
        for entry in self.tensors:
            for module, _ in entry.slots:
                self.by_module.setdefault(id(module), []).append(entry)
        self.unload(self.tensors)  # marked placeholders, tied places sharing one

    def _checkpoint_key(self, name: str, prefix: str) -> str:
        """The checkpoint's name for the parameter ``name``: itself, or with the model's
        ``base_model_prefix`` taken off or put on (a base model's checkpoint read into a
        model with a head, or the other way); "" when the checkpoint has neither."""
        short = name.removeprefix(f"{prefix}.") if prefix else name
        for key in (name, short, f"{prefix}.{name}" if prefix else name):
            if key in self.files.weight_map:
                return key
        return ""

    @classmethod
    def from_folder(
        cls, folder: str | os.PathLike, device: torch.device | str = "cpu"
    ) -> DiskModel:
        """The model of a transformers folder (the class
        :func:`~lowrank_layers.hf_quantizer.auto_class_for` picks, as
        :func:`~lowrank_layers.hf.convert_pretrained` loads it), its parameters left in the
        folder's safetensors, read onto ``device`` in the dtype ``from_pretrained`` would
        give them."""
        try:
            import transformers
        except ImportError as exc:
            raise ImportError("compressing a model folder from disk needs transformers: pip "
                              "install 'lowrank-layers[hf]'") from exc  # fmt: skip
        folder = Path(folder)
        config = transformers.AutoConfig.from_pretrained(folder)
        with parameters_on_meta():
            model = auto_class_for(config).from_config(config)
        return cls(model.eval(), locate_files(folder), device)

    def close(self) -> None:
        for reader in self._readers.values():
            reader.close()
        self._readers.clear()

    def __enter__(self) -> DiskModel:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def read(self, entry: _Tensor) -> torch.Tensor:
        """The checkpoint's tensor for ``entry``, in the model's dtype."""
        path = self.files.weight_map[entry.key]
        reader = self._readers.get(path)
        if reader is None:
            reader = self._readers[path] = TensorReader(path)
        value = reader.get(entry.key)
        if value.shape != entry.shape:
            raise InputError(
                f"{entry.key}: the checkpoint's tensor has shape {tuple(value.shape)}, the "
                f"model's parameter {tuple(entry.shape)}"
            )
        return value.to(device=self.device, dtype=entry.dtype)

    def entries(self, module: nn.Module, *, recurse: bool = True) -> list[_Tensor]:
        """The parameters held by ``module`` (and by the modules inside it)."""
        mods = module.modules() if recurse else [module]
        return list(dict.fromkeys(e for m in mods for e in self.by_module.get(id(m), [])))

    def load(self, module: nn.Module, *, recurse: bool = True) -> list[_Tensor]:
        """Read the parameters of ``module`` still on disk; those read (for :meth:`unload`)."""
        done = []
        for entry in self.entries(module, recurse=recurse):
            if entry.loaded:
                continue
            param = nn.Parameter(self.read(entry), requires_grad=False)
            for holder, name in entry.slots:
                holder._parameters[name] = param
            entry.loaded = True
            done.append(entry)
        return done

    def unload(self, entries: Sequence[_Tensor]) -> None:
        """Put the ``meta`` placeholders of ``entries`` back (their memory is freed once
        nothing else holds it)."""
        for entry in entries:
            if entry.placeholder is None:
                entry.placeholder = _placeholder(entry.shape, entry.dtype)
            param = entry.placeholder
            for holder, name in entry.slots:
                holder._parameters[name] = param
            entry.loaded = False

    @contextlib.contextmanager
    def holding(self, module: nn.Module) -> Iterator[None]:
        """``module``'s parameters loaded inside the block, released after."""
        loaded = self.load(module)
        try:
            yield
        finally:
            self.unload(loaded)
            release_free_heap()

    @contextlib.contextmanager
    def streaming(self, blocks: Sequence[nn.Module]) -> Iterator[None]:
        """Inside: each of ``blocks``, and each module outside them holding parameters of
        its own, reads its parameters when it is called (those still on disk) and drops
        them when it returns (or raises)."""
        inside = {id(m) for b in blocks for m in b.modules()}
        units: list[tuple[nn.Module, bool]] = [(b, True) for b in blocks]
        units += [
            (m, False)
            for m in self.model.modules()
            if id(m) not in inside and any(True for _ in m.parameters(recurse=False))
        ]
        handles = []
        for module, recurse in units:
            taken: list[list[_Tensor]] = []

            def pre(mod: nn.Module, args: Any, recurse: bool = recurse,
                    taken: list[list[_Tensor]] = taken) -> None:  # fmt: skip
                taken.append(self.load(mod, recurse=recurse))

            def post(mod: nn.Module, args: Any, out: Any,
                     taken: list[list[_Tensor]] = taken) -> None:  # fmt: skip
                if taken:
                    self.unload(taken.pop())

            setattr(pre, ON_DISK, True)  # the layer selection ignores these hooks
            setattr(post, ON_DISK, True)
            handles.append(module.register_forward_pre_hook(pre))
            handles.append(module.register_forward_hook(post, always_call=True))
        try:
            yield
        finally:
            for h in handles:
                h.remove()


def _placeholder(shape: torch.Size, dtype: torch.dtype) -> nn.Parameter:
    """A ``meta`` parameter marked as held on disk (:data:`~lowrank_layers.targets.ON_DISK`):
    the conversion's layer selection accepts it."""
    param = nn.Parameter(torch.empty(shape, dtype=dtype, device="meta"), requires_grad=False)
    setattr(param, ON_DISK, True)
    return param


@contextlib.contextmanager
def parameters_on_meta() -> Iterator[None]:
    """Modules built inside keep their parameters on the ``meta`` device (buffers are made
    as usual): accelerate's ``init_empty_weights(include_buffers=False)``. Each parameter
    is allocated when made and moved to ``meta`` as it is registered, so one tensor at a
    time is real."""
    register = nn.Module.register_parameter

    def on_meta(module: nn.Module, name: str, param: nn.Parameter | None) -> None:
        register(module, name, param)
        if param is not None and not param.is_meta:
            meta = type(param)(param.to("meta"), requires_grad=param.requires_grad)
            meta.__dict__.update(param.__dict__)
            module._parameters[name] = meta

    nn.Module.register_parameter = on_meta  # type: ignore[method-assign]
    try:
        yield
    finally:
        nn.Module.register_parameter = register  # type: ignore[method-assign]


class _Writer:
    """The output checkpoint, written as the blocks are converted: each block's tensors
    when it is done, the rest at the end; the low-rank layers' description in the header."""

    def __init__(self, disk: DiskModel, container: str, path: Path) -> None:
        self.disk = disk
        self.container = container
        names = list(disk.model.state_dict(keep_vars=True))
        # each name may become three factors and a guard; the layers' description
        reserve = header_reserve([f"{n}.factor_U" for n in names for _ in range(4)],
                                 200 * len(names))  # fmt: skip
        self.file = ShardWriter(path, reserve)
        self.layers: dict[str, dict[str, Any]] = {}  # every low-rank layer, at the end
        self.blocks = list(disk.model.get_submodule(container))

    def block_scope(self, i: int) -> contextlib.AbstractContextManager[Any]:
        return self._block(i)

    @contextlib.contextmanager
    def _block(self, i: int) -> Iterator[None]:
        block = self.blocks[i]
        loaded = self.disk.load(block)
        try:
            yield
            self._write_module(block, f"{self.container}.{i}")
        finally:
            self.disk.unload(loaded)
            block.to("meta")  # the converted layers' tensors, written
            release_free_heap()

    def _write_module(self, module: nn.Module, name: str) -> None:
        for key, value in stored_entries(module, name)[1]:
            self.file.add(key, value.detach().contiguous())

    def finish(self) -> None:
        """The tensors outside the blocks (read from disk one at a time), tied ones once,
        and the header with the description of every low-rank layer."""
        on_disk = {id(h._parameters[a]): e for e in self.disk.tensors for h, a in e.slots}
        self.layers, entries = stored_entries(self.disk.model, keep_vars=True)
        aliases: dict[str, str] = {}
        seen: dict[int, str] = {}
        for key, value in entries:
            if key in self.file.entries:  # a block's, written with it
                continue
            if id(value) in seen:
                aliases[key] = seen[id(value)]
                continue
            seen[id(value)] = key
            if value.is_meta:
                value = self.disk.read(on_disk[id(value)])
            self.file.add(key, value.detach().contiguous())
            del value
        self.file.finish(format_metadata(self.layers, aliases))
        self.file.close()


def compress_offloaded(
    src: str | os.PathLike,
    dst: str | os.PathLike,
    calibration: Sequence[Any],
    config: ConversionConfig | None = None,
    *,
    sensitivity_tokens: int | None = 8192,
    objective: str = "auto",
    narrow_mlps: bool = True,
    device: torch.device | str = "cpu",
    overwrite: bool = False,
    progress: bool = False,
    **options: Any,
) -> CompressionReport:
    """:func:`~lowrank_layers.compress` a transformers model folder ``src`` into ``dst``,
    its weights read from disk one block at a time (see the module's description).

    ``calibration``: token batches for the model (``text_batches`` of the folder's
    tokenizer). ``config`` (or its fields as keywords) and the options are
    :func:`~lowrank_layers.compress`'s; the
    layers outside the model's repeated blocks stay dense
    (:data:`~lowrank_layers.layer_plan.OUTSIDE_BLOCKS_REASON`).
    The weights are read onto ``device`` (a CUDA device: the calibration batches must be
    there too), where every statistic is made. ``dst`` gets ``model.safetensors``, the
    folder's other files, ``config.json`` marked and the model card, as
    :func:`~lowrank_layers.hf.convert_pretrained` writes them; it is written atomically,
    with the scratch files (the blocks' hidden states) inside it until it is complete.
    The conversion always propagates (:mod:`~lowrank_layers.propagate`) and does not heal
    (healing trains the whole model at once).

    Returns:
        A :class:`~lowrank_layers.CompressionReport`.

    Raises:
        ValueError: a bad option; ``dst`` the same folder as ``src``; no repeated blocks;
            blocks that cannot be run one at a time; a checkpoint that lacks one of the
            model's parameters.
        TypeError: ``config`` not a ``ConversionConfig``.
    """
    config = config_from(config, options, caller="compress_offloaded")
    src, dst = Path(src), Path(dst)
    check_compress_config(config)
    if dst.resolve() == src.resolve():
        raise InputError(
            f"compress_offloaded reads its weights from src while it writes dst: give dst a "
            f"folder other than src ({src})"
        )
    if not (src / "config.json").exists():
        raise InputError(f"{src} is not a transformers model folder (no config.json)")
    with (
        DiskModel.from_folder(src, device) as disk,
        atomic_destination(dst, is_dir=True, overwrite=overwrite) as tmp,
    ):
        model = disk.model
        names = [n for n, m in model.named_modules() if isinstance(m, nn.Linear)]
        found = find_blocks(model, names)
        if found is None:
            raise InputError(
                f"{src}: the model has no repeated blocks holding its Linear layers; "
                "compressing from disk works one block at a time"
            )
        container, blocks = found
        scratch = tmp / ".scratch"
        scratch.mkdir()
        writer = _Writer(disk, container, tmp / SINGLE_FILE)
        offload = Offload(container, blocks, disk.holding, writer.block_scope, scratch, disk.device)
        try:
            with disk.streaming(blocks):
                report = run_compress(
                    model, calibration, config, sensitivity_tokens=sensitivity_tokens,
                    objective=objective, narrow_mlps=narrow_mlps, progress=progress,
                    offload=offload,
                )  # fmt: skip
            writer.finish()
        finally:
            writer.file.close()
            shutil.rmtree(scratch, ignore_errors=True)
        copy_model_folder(src, tmp)
        write_config_entry(tmp / "config.json", lowrank_quantization_config(writer.layers))
        write_model_card(tmp, writer.layers,
                         linear_layers=linear_layer_count(model, writer.layers))  # fmt: skip
    return report
