"""Checkpoint I/O, the one place that knows file formats.

Two families of files are read:

- **ours**: a safetensors file whose header metadata says what it is (``cheff.kind``) and
  carries the model config as JSON (``cheff.config``), so a checkpoint needs no side files;
- **the official releases** (``../shared/cheff-official/FORMAT.md``): PyTorch Lightning
  files with the weights under ``["state_dict"]`` (autoencoder and both LDMs; the LDMs hold the
  autoencoder as ``first_stage_model.*``) and the SR training files with ``["model"]``.

Loading never runs code from a file: ``torch.load(weights_only=True)``, plus an explicit
allow-list of harmless numpy globals that Lightning files sometimes pickle. Anything else is
refused with the names of the globals the file wanted.
"""

from __future__ import annotations

import importlib
import json
import logging
import pickle
import zipfile
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from cheff import __version__
from cheff.config import AutoencoderConfig

log = logging.getLogger(__name__)

FORMAT_NAME = "cheff"
FORMAT_VERSION = "1"
SUFFIX = ".safetensors"

# Globals a weights-only unpickler may rebuild beyond torch's own set: numpy scalars and
# dtypes (Lightning stores e.g. a monitored metric as a numpy float). They construct data only.
SAFE_GLOBALS = (
    "numpy.core.multiarray.scalar",
    "numpy._core.multiarray.scalar",
    "numpy.dtype",
)
SAFE_GLOBAL_PATTERN = ("numpy.dtypes.", "DType")  # numpy 2: numpy.dtypes.Float64DType, ...

# Prefixes under which an official file may hold the autoencoder, and the keys beside it that
# belong to training only (the LPIPS + discriminator loss of the Lightning module).
AUTOENCODER_PREFIXES = ("", "first_stage_model.")
AUTOENCODER_TRAINING_ONLY = ("loss.",)
AUTOENCODER_GROUPS = ("encoder.", "decoder.", "quant_conv.", "post_quant_conv.")

# Where the official files keep their weights: (top-level key, container name).
OFFICIAL_CONTAINERS = (("state_dict", "lightning"), ("model", "sr-training"))


class CheckpointError(ValueError):
    """A checkpoint that cannot be used, with the file and the reason."""


@dataclass(frozen=True)
class Checkpoint:
    """The tensors of one file and what the file says about them."""

    path: Path
    container: str  # "cheff", "lightning" (["state_dict"]) or "sr-training" (["model"])
    state_dict: dict[str, Tensor]
    kind: str | None = None  # ours: the model kind; official files: guessed from the keys
    config: dict[str, Any] | None = None  # ours only: the model config
    metadata: dict[str, Any] = field(default_factory=dict)

    def subtree(self, prefix: str) -> dict[str, Tensor]:
        """Entries under ``prefix`` with the prefix removed."""
        return {k[len(prefix) :]: v for k, v in self.state_dict.items() if k.startswith(prefix)}


# --------------------------------------------------------------------------- reading


def read_checkpoint(path: str | Path) -> Checkpoint:
    """Read any supported file into a :class:`Checkpoint` (tensors on the CPU)."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: no such checkpoint file")
    with open(path, "rb") as handle:
        head = handle.read(9)
    if len(head) == 9 and head[8:9] == b"{":
        return _read_ours(path)
    return _read_official(path)


def _read_ours(path: Path) -> Checkpoint:
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(path), framework="pt", device="cpu") as handle:
            metadata = dict(handle.metadata() or {})
            state = {key: handle.get_tensor(key) for key in handle.keys()}  # noqa: SIM118
    except SafetensorError as error:
        raise CheckpointError(f"{path}: not a readable safetensors file ({error})") from None
    if metadata.get("format") != FORMAT_NAME:
        raise CheckpointError(
            f"{path}: a safetensors file without cheff metadata (format={metadata.get('format')!r})"
            "; cheff writes 'format': 'cheff', 'kind' and 'config' into the header"
        )
    try:
        config = json.loads(metadata.get("config", "null"))
    except json.JSONDecodeError as error:
        raise CheckpointError(f"{path}: the header's config is not JSON ({error})") from None
    return Checkpoint(path, "cheff", state, metadata.get("kind"), config, metadata)


def _read_official(path: Path) -> Checkpoint:
    payload = safe_torch_load(path)
    if not isinstance(payload, Mapping):
        raise CheckpointError(f"{path}: expected a dict at the top level, got {type(payload)}")
    found = [(k, c) for k, c in OFFICIAL_CONTAINERS if isinstance(payload.get(k), Mapping)]
    if not found:
        raise CheckpointError(
            f"{path}: no 'state_dict' (Lightning) or 'model' (SR) entry; top-level keys: "
            f"{sorted(map(str, payload))[:20]}"
        )
    key, container = found[0]
    state = payload[key]
    tensors = {str(k): v for k, v in state.items() if isinstance(v, Tensor)}
    skipped = sorted(str(k) for k, v in state.items() if not isinstance(v, Tensor))
    if skipped:
        log.warning("%s: ignoring %d non-tensor entries, e.g. %s", path, len(skipped), skipped[:3])
    others = {k: v for k, v in payload.items() if k in ("epoch", "global_step", "steps")}
    return Checkpoint(path, container, tensors, guess_kind(tensors, container), None, others)


def safe_torch_load(path: str | Path) -> Any:
    """``torch.load`` that never runs code: weights-only, plus :data:`SAFE_GLOBALS`.

    A file that pickles any other global (a class, a function such as ``os.system``) is
    refused with a :class:`CheckpointError` naming those globals.
    """
    path = Path(path)
    mmap = zipfile.is_zipfile(path)  # the zip format can be memory-mapped (multi-GB files)
    unsafe = _unsafe_globals(path) if mmap else []
    refused = [name for name in unsafe if not _is_safe_global(name)]
    if refused:
        raise CheckpointError(
            f"{path}: refused: the file pickles {', '.join(refused)}, which would run code "
            "when loaded. cheff reads only tensors and plain containers "
            "(torch.load(weights_only=True)). If the file is yours and trusted, re-save just "
            "its weights: torch.save({'state_dict': sd}, ...) with sd a dict of tensors."
        )
    allowed = [_import_global(name) for name in unsafe]
    if unsafe:  # a numpy dtype is rebuilt through its class, which the scan does not list
        allowed += _numpy_dtype_classes()
    try:
        with torch.serialization.safe_globals(allowed):
            return torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
    except pickle.UnpicklingError as error:  # legacy (non-zip) files are checked only here
        reason = _unpickler_reason(error)
        if "GLOBAL" not in reason and "Can only build" not in reason:
            raise CheckpointError(f"{path}: not a readable PyTorch checkpoint ({reason})") from None
        raise CheckpointError(
            f"{path}: refused: weights-only loading failed ({reason}). cheff never unpickles "
            "code; re-save the file's weights as a plain dict of tensors."
        ) from None
    except (RuntimeError, EOFError, zipfile.BadZipFile) as error:
        raise CheckpointError(f"{path}: not a readable PyTorch checkpoint ({error})") from None


def _unpickler_reason(error: pickle.UnpicklingError) -> str:
    """The one informative line of torch's long weights-only message."""
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    marker = "WeightsUnpickler error:"
    for line in lines:
        if "GLOBAL" in line:
            return line
    for index, line in enumerate(lines):
        if line.endswith(marker) and index + 1 < len(lines):
            return lines[index + 1]
    return lines[0] if lines else repr(error)


def _unsafe_globals(path: Path) -> list[str]:
    try:
        return list(torch.serialization.get_unsafe_globals_in_checkpoint(path))
    except (RuntimeError, zipfile.BadZipFile, pickle.UnpicklingError) as error:
        raise CheckpointError(f"{path}: not a readable PyTorch checkpoint ({error})") from None


def _is_safe_global(name: str) -> bool:
    prefix, suffix = SAFE_GLOBAL_PATTERN
    return name in SAFE_GLOBALS or (name.startswith(prefix) and name.endswith(suffix))


def _numpy_dtype_classes() -> list[type]:
    import numpy.dtypes

    suffix = SAFE_GLOBAL_PATTERN[1]
    return [getattr(numpy.dtypes, n) for n in dir(numpy.dtypes) if n.endswith(suffix)]


def _import_global(name: str) -> Any:
    module, _, attribute = name.rpartition(".")
    return getattr(importlib.import_module(module), attribute)


def guess_kind(state: Mapping[str, Tensor], container: str) -> str | None:
    """What an official file holds, from its keys (official files do not say)."""
    if container == "sr-training":
        return "sr"
    if "model.diffusion_model.input_blocks.0.0.weight" in state:
        return "ldm-t2i" if any(k.startswith("cond_stage_model.") for k in state) else "ldm"
    if "encoder.conv_in.weight" in state:
        return "autoencoder"
    return None


# --------------------------------------------------------------------------- matching


def check_state(
    model: nn.Module,
    state: Mapping[str, Tensor],
    path: Path,
    *,
    ignore: Iterable[str] = (),
) -> dict[str, Tensor]:
    """The entries of ``state`` that ``model`` needs; every missing or misshaped one is an error.

    Keys starting with a prefix in ``ignore`` are dropped silently; other extra keys are
    dropped with a warning (the official loaders use ``strict=False`` and ignore them too).
    """
    expected = model.state_dict()
    ignore = tuple(ignore)
    missing = [k for k in expected if k not in state]
    misshaped = [
        f"{k} (file {tuple(state[k].shape)}, model {tuple(expected[k].shape)})"
        for k in expected
        if k in state and state[k].shape != expected[k].shape
    ]
    extra = [k for k in state if k not in expected and not k.startswith(ignore)]
    problems = []
    if missing:
        problems.append(f"{len(missing)} missing keys: {_some(missing)}")
    if misshaped:
        problems.append(f"{len(misshaped)} keys with another shape: {_some(misshaped)}")
    if problems:
        raise CheckpointError(
            f"{path}: does not fit {type(model).__name__}: " + "; ".join(problems)
        )
    if extra:
        log.warning("%s: ignoring %d unexpected keys, e.g. %s", path, len(extra), _some(extra))
    return {k: state[k] for k in expected}


def _some(names: list[str], limit: int = 8) -> str:
    shown = ", ".join(names[:limit])
    return shown + (f", ... ({len(names) - limit} more)" if len(names) > limit else "")


# --------------------------------------------------------------------------- autoencoder


def autoencoder_config_from_state(state: Mapping[str, Tensor]) -> AutoencoderConfig:
    """Read the architecture off the parameter shapes (official files carry no config)."""
    try:
        conv_in = state["encoder.conv_in.weight"]
        levels = 1 + max(int(k.split(".")[2]) for k in state if k.startswith("encoder.down."))
        blocks = 1 + max(
            int(k.split(".")[4]) for k in state if k.startswith("encoder.down.0.block.")
        )
        base = conv_in.shape[0]
        mult = tuple(
            state[f"encoder.down.{i}.block.0.conv2.weight"].shape[0] // base for i in range(levels)
        )
        return AutoencoderConfig(
            in_channels=conv_in.shape[1],
            out_channels=state["decoder.conv_out.weight"].shape[0],
            base_channels=base,
            channel_mult=mult,
            num_res_blocks=blocks,
            attention_levels=tuple(
                i for i in range(levels) if f"encoder.down.{i}.attn.0.q.weight" in state
            ),
            z_channels=state["encoder.conv_out.weight"].shape[0] // 2,
            embed_dim=state["quant_conv.weight"].shape[0] // 2,
        )
    except (KeyError, ValueError, IndexError) as error:
        raise CheckpointError(
            f"cannot read an autoencoder architecture off these keys ({error!r})"
        ) from None


def _autoencoder_state(checkpoint: Checkpoint) -> dict[str, Tensor]:
    if checkpoint.container == "cheff":
        if checkpoint.kind != "autoencoder":
            raise CheckpointError(
                f"{checkpoint.path}: holds a {checkpoint.kind!r}, not an autoencoder"
            )
        return checkpoint.state_dict
    for prefix in AUTOENCODER_PREFIXES:
        if f"{prefix}encoder.conv_in.weight" in checkpoint.state_dict:
            state = checkpoint.subtree(prefix)
            if prefix:  # inside an LDM: only the autoencoder's own groups
                state = {k: v for k, v in state.items() if k.startswith(AUTOENCODER_GROUPS)}
            return state
    raise CheckpointError(
        f"{checkpoint.path}: no autoencoder in this {checkpoint.container} file (looked for "
        f"'encoder.conv_in.weight' under the prefixes {list(AUTOENCODER_PREFIXES)})"
    )


def load_autoencoder(
    path: str | Path,
    config: AutoencoderConfig | None = None,
    *,
    device: torch.device | str = "cpu",
) -> nn.Module:
    """An :class:`~cheff.models.autoencoder.AutoencoderKL` in eval mode from any supported file.

    Reads our safetensors files, the released ``cheff_autoencoder.pt`` (``loss.*`` ignored)
    and the ``first_stage_model.*`` inside either released LDM. ``config`` overrides the
    architecture the file implies (ours: its header; official: the parameter shapes).
    """
    from cheff.models.autoencoder import AutoencoderKL

    checkpoint = read_checkpoint(path)
    state = _autoencoder_state(checkpoint)
    if config is None:
        if checkpoint.config is not None:
            config = AutoencoderConfig.from_dict(checkpoint.config)
        else:
            try:
                config = autoencoder_config_from_state(state)
            except CheckpointError as error:
                raise CheckpointError(f"{checkpoint.path}: {error}") from None
    model = AutoencoderKL(config)
    model.load_state_dict(
        check_state(model, state, checkpoint.path, ignore=AUTOENCODER_TRAINING_ONLY)
    )
    return model.to(device).eval()


# --------------------------------------------------------------------------- writing


def save_checkpoint(
    model: nn.Module,
    path: str | Path,
    *,
    kind: str,
    config: Mapping[str, Any],
    extra: Mapping[str, str] | None = None,
) -> Path:
    """Write ``model``'s weights and config as one safetensors file; returns the path."""
    from safetensors.torch import save_file

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    metadata = {
        "format": FORMAT_NAME,
        "format_version": FORMAT_VERSION,
        "kind": kind,
        "config": json.dumps(dict(config), sort_keys=True),
        "cheff_version": __version__,
        **dict(extra or {}),
    }
    tensors = {k: v.detach().to("cpu").contiguous() for k, v in model.state_dict().items()}
    tmp = path.with_name(path.name + ".tmp")
    save_file(tensors, str(tmp), metadata=metadata)
    tmp.replace(path)  # never a half-written checkpoint under the final name
    return path


def save_autoencoder(model: nn.Module, path: str | Path, **extra: str) -> Path:
    return save_checkpoint(
        model, path, kind="autoencoder", config=model.config.to_dict(), extra=extra
    )


# Loaders by kind: ``cheff convert`` and ``cheff inspect`` go through this table, and each
# later model adds its loader and saver here.
LOADERS = {"autoencoder": (load_autoencoder, save_autoencoder)}


def convert(source: str | Path, target: str | Path, *, kind: str = "autoencoder") -> Path:
    """Turn an official file into ours (weights checked against the model on the way)."""
    try:
        load, save = LOADERS[kind]
    except KeyError:
        raise CheckpointError(
            f"cannot convert a {kind!r}; known kinds: {sorted(LOADERS)}"
        ) from None
    model = load(source)
    return save(model, target, converted_from=Path(source).name)


def describe(path: str | Path) -> dict[str, Any]:
    """What a file holds, for ``cheff inspect``: container, kind, config, tensor groups."""
    checkpoint = read_checkpoint(path)
    groups: dict[str, dict[str, int]] = {}
    for key, tensor in checkpoint.state_dict.items():
        group = groups.setdefault(key.split(".")[0], {"entries": 0, "elements": 0})
        group["entries"] += 1
        group["elements"] += tensor.numel()
    return {
        "path": str(checkpoint.path),
        "container": checkpoint.container,
        "kind": checkpoint.kind,
        "config": checkpoint.config,
        "entries": len(checkpoint.state_dict),
        "groups": groups,
        "metadata": {
            k: v for k, v in checkpoint.metadata.items() if k not in ("config", "format", "kind")
        },
    }
