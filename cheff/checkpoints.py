"""Checkpoint I/O, the one place that knows file formats.

Two families of files are read:

- **ours**: a safetensors file whose header metadata says what it is (``cheff.kind``) and
  carries the model config as JSON (``cheff.config``), so a checkpoint needs no side files;
- **the official releases** (``../shared/cheff-official/FORMAT.md``): PyTorch Lightning
  files with the weights under ``["state_dict"]`` (autoencoder and both LDMs; the LDMs hold the
  autoencoder as ``first_stage_model.*``) and the SR training files with ``["model"]``.

Loading never runs code from a file: ``torch.load(weights_only=True)``, plus an explicit
allow-list of harmless numpy globals that Lightning files sometimes pickle. Any other class
(``argparse.Namespace`` or OmegaConf configs in ``hyper_parameters``, say) is rebuilt as an
inert :class:`Placeholder`, since only the weights are read; a file that names a global only a
file crafted to run code would (``os.system``, ``builtins.eval``, ...) is refused.
"""

from __future__ import annotations

import importlib
import json
import logging
import pickle
import re
import struct
import warnings
import zipfile
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor, nn

from cheff import __version__
from cheff.config import AutoencoderConfig
from cheff.diffusion.schedules import LDM_BUFFER_NAMES

if TYPE_CHECKING:
    from cheff.models.autoencoder import AutoencoderKL
    from cheff.models.ldm import LatentDiffusion
    from cheff.models.sr import SuperResolution
    from cheff.models.unet import UNetConfig

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
# Globals of dict subclasses, rebuilt as plain dicts: weights-only loading fills no other
# mapping (a placeholder in their place could not take the items, and the file was refused).
AS_PLAIN_DICT = ("collections.defaultdict",)

# Modules whose globals no checkpoint needs and a file crafted to run code often names: such a
# file is refused, to say what it is. Safety does not rest on this list (no list of Python's
# code-running names is complete): every global not allowed is an inert placeholder anyway.
CODE_MODULES = frozenset(
    ("os", "posix", "nt", "subprocess", "sys", "shutil", "importlib", "runpy", "socket", "pty")
    + ("ctypes", "pickle", "_pickle", "marshal", "code", "codeop", "webbrowser", "pydoc")
    + ("multiprocessing", "signal", "operator", "functools", "types", "builtins", "timeit")
    + ("commands", "popen2", "pdb", "bdb", "trace", "profile", "cProfile", "asyncio")
)
# The builtins that are plain data types (a pickle may name these); every other is code.
DATA_BUILTINS = frozenset(
    f"builtins.{name}"
    for name in ("dict", "list", "tuple", "set", "frozenset", "int", "float", "complex", "str")
    + ("bytes", "bytearray", "bool", "slice", "range", "object")
)

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


def read_checkpoint(path: str | Path | Checkpoint) -> Checkpoint:
    """Read any supported file into a :class:`Checkpoint` (tensors on the CPU); a
    ``Checkpoint`` already read is returned as it is, so that a multi-GB pickle is unpickled
    once when several steps need it (``convert``)."""
    if isinstance(path, Checkpoint):
        return path
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

    Any other global the file pickles becomes a :class:`Placeholder` (a warning names them),
    except those of :data:`CODE_MODULES`, for which the file is refused with a
    :class:`CheckpointError` naming them. A zip file lists its globals up front; a legacy
    (pre-1.6, non-zip) file names them one at a time as weights-only loading meets them, so
    each one found is allowed (or replaced) and the load retried.
    """
    path = Path(path)
    mmap = zipfile.is_zipfile(path)  # the zip format can be memory-mapped (multi-GB files)
    names = _unsafe_globals(path) if mmap else []
    while True:
        _refuse_unsafe_globals(path, names)
        try:
            with torch.serialization.safe_globals(_allowed(names)):
                payload = torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
        except pickle.UnpicklingError as error:
            reason = _unpickler_reason(error)
            met = _GLOBAL_MET.search(reason)
            # torch names a builtin without its module ("GLOBAL dict"); the file says builtins.
            found = met and (met.group(1) if "." in met.group(1) else f"builtins.{met.group(1)}")
            if found and found not in names:  # a legacy file's next global
                names.append(found)  # refused above if harmful, else allowed: retry
                continue
            if "GLOBAL" not in reason and "Can only" not in reason:
                raise CheckpointError(
                    f"{path}: not a readable PyTorch checkpoint ({reason})"
                ) from None
            raise CheckpointError(
                f"{path}: refused: weights-only loading failed ({reason}). cheff never "
                "unpickles code; re-save the file's weights as a plain dict of tensors."
            ) from None
        except (
            RuntimeError,
            EOFError,
            zipfile.BadZipFile,
            KeyError,
            IndexError,
            ValueError,
            TypeError,
            AttributeError,
            struct.error,
        ) as error:  # what pickle raises on bytes that are no pickle at all, or an allowed
            # global (torch's own, numpy's, the defaultdict's) called with arguments it refuses
            raise CheckpointError(
                f"{path}: not a readable PyTorch checkpoint ({type(error).__name__}: {error})"
            ) from None
        as_dicts = [name for name in names if name in AS_PLAIN_DICT]
        replaced = [n for n in names if not _is_safe_global(n) and n not in AS_PLAIN_DICT]
        if replaced:
            log.warning(
                "%s: read %s as inert placeholders (only the weights are used)",
                path,
                ", ".join(replaced),
            )
        if as_dicts:
            log.info("%s: read %s as plain dicts", path, ", ".join(as_dicts))
        return payload


class Placeholder:
    """What an unpickled object of a class cheff does not load becomes: it keeps the name
    the file gave and whatever it was built from, and does nothing (no code of the file's
    classes runs; weights-only loading builds it through ``__new__`` and ``__setstate__``)."""

    name = "?"
    args: tuple = ()
    kwargs: dict = {}  # noqa: RUF012 (never mutated: __init__ rebinds it)
    state: Any = None

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        self.args, self.kwargs = args, kwargs

    def __setstate__(self, state: Any) -> None:
        self.state = state

    def __repr__(self) -> str:
        return f"<placeholder for {self.name}>"


def _placeholder(name: str) -> type[Placeholder]:
    return type("Placeholder", (Placeholder,), {"name": name, "__module__": __name__})


# How weights-only loading names a global it may not rebuild.
_GLOBAL_MET = re.compile(r"GLOBAL (\S+) was not an allowed global")


def _refuse_unsafe_globals(path: Path, names: list[str]) -> None:
    refused = [name for name in names if _is_code_global(name)]
    if refused:
        raise CheckpointError(
            f"{path}: refused: the file pickles {', '.join(refused)}, which would run code "
            "when loaded. cheff reads only tensors and plain containers "
            "(torch.load(weights_only=True)). If the file is yours and trusted, re-save just "
            "its weights: torch.save({'state_dict': sd}, ...) with sd a dict of tensors."
        )


def _is_code_global(name: str) -> bool:
    module = name.partition(".")[0]
    return module in CODE_MODULES and name not in DATA_BUILTINS


def _allowed(names: list[str]) -> list[Any]:
    """``names`` for ``safe_globals``, each under the name the file uses: the harmless
    numpy globals themselves (numpy 1 pickled ``numpy.core.multiarray.scalar``, which numpy 2
    calls ``numpy._core.multiarray.scalar``, so the object's own name would not match), any
    other a :class:`Placeholder` class of that name (never imported)."""
    allowed: list[Any] = [(_stand_in(name), name) for name in names]
    if any(map(_is_safe_global, names)):  # a numpy dtype is rebuilt through its class
        allowed += _numpy_dtype_classes()
    return allowed


def _stand_in(name: str) -> Any:
    """What global ``name`` is rebuilt with: a harmless numpy global itself, a plain-dict
    builder for a dict subclass, else an inert placeholder class of that name."""
    if _is_safe_global(name):
        return _import_global(name)
    if name in AS_PLAIN_DICT:
        return _plain_dict
    return _placeholder(name)


def _plain_dict(default_factory: Any = None, *args: Any) -> dict:
    """What a pickled ``collections.defaultdict(factory)`` is rebuilt as: an empty dict, which
    the pickle's items then fill (the factory, a placeholder, is dropped)."""
    return dict(*args)


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
    with warnings.catch_warnings():  # numpy 2 warns on numpy.core, the name numpy 1 wrote
        warnings.simplefilter("ignore", DeprecationWarning)
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
        if checkpoint.kind == "autoencoder":
            return checkpoint.state_dict
        if (
            checkpoint.kind == "ldm"
            and "autoencoder.encoder.conv_in.weight" in checkpoint.state_dict
        ):
            return checkpoint.subtree("autoencoder.")  # ours, as the official LDMs serve
        raise CheckpointError(
            f"{checkpoint.path}: holds a {checkpoint.kind!r} without an autoencoder; give an "
            "autoencoder file (or an LDM file holding one)"
        )
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
    path: str | Path | Checkpoint,
    config: AutoencoderConfig | None = None,
    *,
    device: torch.device | str = "cpu",
) -> AutoencoderKL:
    """An :class:`~cheff.models.autoencoder.AutoencoderKL` in eval mode from any supported file.

    Reads our safetensors files, the released ``cheff_autoencoder.pt`` (``loss.*`` ignored)
    and the ``first_stage_model.*`` inside either released LDM. ``config`` overrides the
    architecture the file implies (ours: its header; official: the parameter shapes).
    """
    checkpoint = read_checkpoint(path)
    state = _autoencoder_state(checkpoint)  # first: a file of another kind says so by name
    if config is None and checkpoint.config is not None:
        stored = checkpoint.config
        if checkpoint.kind == "ldm":
            stored = stored.get("autoencoder")
        config = None if stored is None else AutoencoderConfig.from_dict(stored)
    model = _autoencoder_from_state(state, checkpoint.path, config)
    return model.to(device).eval()


def _autoencoder_from_state(
    state: Mapping[str, Tensor], path: Path, config: AutoencoderConfig | None = None
) -> AutoencoderKL:
    """An AutoencoderKL filled from ``state`` (config read off the shapes unless given)."""
    from cheff.models.autoencoder import AutoencoderKL

    if config is None:
        try:
            config = autoencoder_config_from_state(state)
        except CheckpointError as error:
            raise CheckpointError(f"{path}: {error}") from None
    model = AutoencoderKL(config)
    model.load_state_dict(check_state(model, state, path, ignore=AUTOENCODER_TRAINING_ONLY))
    return model


# --------------------------------------------------------------------------- latent diffusion

# The groups of an official LDM file (FORMAT.md section 1). The U-Net weights sampling uses are
# the live ``model.diffusion_model.*``; ``model_ema.*`` holds one copy per U-Net parameter.
UNET_PREFIX = "model.diffusion_model."
EMA_PREFIX = "model_ema."
EMA_COUNTERS = ("model_ema.decay", "model_ema.num_updates")
FIRST_STAGE_PREFIX = "first_stage_model."
COND_STAGE_PREFIX = "cond_stage_model."  # the t2i model's text encoder
#: Where our LDM and SR files keep the noise schedule the model was trained with.
SCHEDULE_PREFIX = "schedule."

# The official schedule buffers: recomputed by cheff.diffusion, unless alphas_cumprod holds
# another schedule than the paper's (then it and betas are read: _official_schedule).
SCHEDULE_BUFFERS = LDM_BUFFER_NAMES
LDM_GROUPS = (
    UNET_PREFIX,
    EMA_PREFIX,
    FIRST_STAGE_PREFIX,
    COND_STAGE_PREFIX,
    "scale_factor",
    *SCHEDULE_BUFFERS,
)
UNCOND_SCALE_FACTOR = 1.0  # not set by the official wrapper: the class default (FORMAT.md 3a)
T2I_SCALE_FACTOR = 0.18215  # the report-conditioned model's (FORMAT.md 3b)
T2I_NUM_HEADS = 8  # the released t2i U-Net's heads (not in the shapes)


def ema_key(unet_key: str) -> str:
    """Where a Lightning LDM keeps the EMA copy of a U-Net entry: every ``.`` deleted.

    ``input_blocks.0.0.weight`` -> ``model_ema.diffusion_modelinput_blocks00weight``.
    """
    return EMA_PREFIX + ("diffusion_model." + unet_key).replace(".", "")


def unet_config_from_state(
    state: Mapping[str, Tensor], *, num_head_channels: int = 32, num_heads: int = T2I_NUM_HEADS
) -> UNetConfig:
    """A :class:`~cheff.models.unet.UNetConfig` read off the U-Net's parameter shapes.

    ``state`` holds U-Net keys without the ``model.diffusion_model.`` prefix. Channels, the
    channel multipliers (so the released (1, 2, 3, 4) is told from the YAML's (1, 2, 4, 4)),
    residual blocks per level, the levels with attention and ``conv_resample`` are all in the
    shapes; the head split is not: ``num_head_channels`` (default 32, the released model's).
    A report-conditioned U-Net (``transformer_blocks`` keys) gets ``context_dim`` from the
    cross-attention's ``attn2.to_k`` and the transformer depth from the block indices; its
    heads are ``num_heads`` (default 8, the released t2i model's).
    """
    from cheff.models.unet import UNetConfig

    try:
        to_k = sorted(k for k in state if k.endswith(".transformer_blocks.0.attn2.to_k.weight"))
        spatial: dict[str, Any] = {}
        if to_k:
            depth = 1 + max(
                int(k.split(".transformer_blocks.")[1].split(".")[0])
                for k in state
                if k.startswith(to_k[0].split(".transformer_blocks.")[0] + ".transformer_blocks.")
            )
            spatial = {
                "num_head_channels": None,
                "num_heads": num_heads,
                "context_dim": int(state[to_k[0]].shape[1]),
                "transformer_depth": depth,
            }
        else:
            spatial = {"num_head_channels": num_head_channels}
        conv_in = state["input_blocks.0.0.weight"]
        base = conv_in.shape[0]
        n_in = 1 + max(int(k.split(".")[1]) for k in state if k.startswith("input_blocks."))
        n_out = 1 + max(int(k.split(".")[1]) for k in state if k.startswith("output_blocks."))

        def is_resblock(index: int) -> bool:
            return f"input_blocks.{index}.0.in_layers.2.weight" in state

        # input_blocks: conv, then per level num_res_blocks ResBlocks and a Downsample (whose
        # average-pooling variant has no weights, so count up to the first non-ResBlock).
        blocks = next((i for i in range(1, n_in) if not is_resblock(i)), n_in) - 1
        if blocks < 1 or n_out % (blocks + 1) or n_in != n_out:
            raise ValueError(f"{n_in} input and {n_out} output blocks do not form a U-Net")
        firsts = [1 + level * (blocks + 1) for level in range(n_out // (blocks + 1))]
        widths = [state[f"input_blocks.{i}.0.out_layers.3.weight"].shape[0] for i in firsts]
        if any(width % base for width in widths):
            raise ValueError(f"level widths {widths} are not multiples of {base}")
        attended = {".".join(k.split(".")[:3]) for k in state if k.startswith("input_blocks.")}
        return UNetConfig(
            in_channels=conv_in.shape[1],
            out_channels=state["out.2.weight"].shape[0],
            model_channels=base,
            channel_mult=tuple(width // base for width in widths),
            num_res_blocks=blocks,
            attention_levels=tuple(
                level for level, i in enumerate(firsts) if f"input_blocks.{i}.1" in attended
            ),
            conv_resample=len(firsts) == 1 or f"input_blocks.{blocks + 1}.0.op.weight" in state,
            **spatial,
        )
    except (KeyError, ValueError, IndexError) as error:
        raise CheckpointError(
            f"cannot read a U-Net architecture off these keys ({error!r}); pass config="
        ) from None


def load_ldm(
    path: str | Path | Checkpoint,
    ae: str | Path | nn.Module | None = None,
    *,
    use_ema: bool = False,
    config: UNetConfig | None = None,
    scale_factor: float | None = None,
    device: torch.device | str = "cpu",
    num_head_channels: int | None = None,
    num_heads: int | None = None,
) -> LatentDiffusion:
    """A :class:`~cheff.models.ldm.LatentDiffusion` in eval mode from an LDM file.

    Reads the released ``cheff_diff_uncond.pt`` (and Lightning files like it) and our
    safetensors files. The U-Net gets the live ``model.diffusion_model.*`` weights, which the
    official samplers use; ``use_ema=True`` takes the ``model_ema.*`` copies instead (an error
    when the file has none). ``config`` (a ``UNetConfig``) overrides the architecture read off
    the shapes; ``num_head_channels`` (unconditional) or ``num_heads`` (report model) set
    just the head split, which an official file does not store (default 32 and 8, the
    released models').

    Autoencoder: ``ae`` (a path for :func:`load_autoencoder`, or an ``AutoencoderKL``) when
    given, else the file's own (``first_stage_model.*``; what the official loader ends up with,
    since the LDM file's copy overrides a separately given AE file), else none. Scale factor:
    ``scale_factor`` when given, else our file's (its header), else the official model's: 1.0
    for the unconditional model, 0.18215 for the report-conditioned one (a ``scale_factor``
    entry in an official file is dropped by the official loader, so here too, with a warning).

    A report-conditioned file (``cond_stage_model.*``, ``transformer_blocks`` in the U-Net)
    gives a model with ``conditioning_key="crossattn"``, SpatialTransformer attention and the
    file's text encoder (:meth:`~cheff.models.ldm.LatentDiffusion.context`); its heads are 8
    unless ``config`` says otherwise. The EMA counters are not read.

    Noise schedule (:attr:`~cheff.models.ldm.LatentDiffusion.schedule`, what sampling uses):
    the one our file stores (the training run's), or an official file's buffers when they
    are not the paper's schedule; else None, the paper's.
    """
    from cheff.models.autoencoder import AutoencoderKL
    from cheff.models.ldm import LatentDiffusion
    from cheff.models.unet import UNetModel

    checkpoint = read_checkpoint(path)
    if checkpoint.container == "cheff":
        unet_state, file_config, file_ae, file_scale, file_text = _our_ldm(checkpoint, use_ema)
        condition = (checkpoint.config or {}).get("condition")
        schedule = _our_schedule(checkpoint)
    else:
        condition = None  # the released t2i model: reports
        found = _official_ldm(checkpoint, use_ema)
        unet_state, file_config, file_ae, file_scale, file_text = found
        schedule = _official_schedule(checkpoint)
    split = {"num_head_channels": num_head_channels, "num_heads": num_heads}
    split = {name: value for name, value in split.items() if value is not None}
    if split and file_config is not None:
        raise CheckpointError(
            f"{checkpoint.path}: our files store their head split; {', '.join(split)} is for "
            "official files"
        )
    if config is None:
        config = file_config
    if config is None:
        config = _unet_config(unet_state, checkpoint, split)
    unet = UNetModel(config)
    if checkpoint.container == "cheff":
        where = "the file's unet.*"
    else:
        where = f"the U-Net's {EMA_PREFIX}* copies" if use_ema else f"the file's {UNET_PREFIX}*"
    try:
        unet.load_state_dict(check_state(unet, unet_state, checkpoint.path))
    except CheckpointError as error:
        raise CheckpointError(f"{error} (keys named as in {where}; {config})") from None

    if ae is None:
        autoencoder = file_ae() if file_ae is not None else None
    elif isinstance(ae, AutoencoderKL):
        autoencoder = ae
    elif isinstance(ae, (str, Path)):
        autoencoder = load_autoencoder(ae)
    else:
        raise TypeError(f"ae: a path or an AutoencoderKL, not {type(ae).__name__}")
    if ae is not None and file_ae is not None:
        log.warning(
            "%s: using the given autoencoder instead of the file's own (%s*, which the "
            "official loader keeps); leave ae out to use the file's",
            checkpoint.path,
            FIRST_STAGE_PREFIX if checkpoint.container != "cheff" else "autoencoder.",
        )
    scale = scale_factor if scale_factor is not None else file_scale
    text_encoder = file_text() if file_text is not None else None
    if (text_encoder is None) != (config.context_dim is None):
        raise CheckpointError(
            f"{checkpoint.path}: a U-Net with context_dim={config.context_dim} and "
            f"{'no' if text_encoder is None else 'a'} text encoder ({COND_STAGE_PREFIX}*) do "
            "not make a model"
        )
    model = LatentDiffusion(
        unet,
        autoencoder,
        scale_factor=scale,
        conditioning_key=None if text_encoder is None else "crossattn",
        text_encoder=text_encoder,
        condition=condition if text_encoder is not None else None,
        schedule=schedule,
    )
    return model.to(device).eval()


def _official_schedule(checkpoint: Checkpoint) -> Any:
    """The noise schedule an official file's buffers hold when it is not the paper's, else
    None (the paper's, recomputed in float64 as the parity fixtures are matched).

    The official code samples with the buffers it loads from the file; an early official
    config trained the unconditional model with ``linear_end`` 0.0195, not 0.0295. Such a
    file is sampled with its own schedule, as the official code would (logged)."""
    from cheff.diffusion import NoiseSchedule
    from cheff.diffusion.schedules import LDM_DDIM_OFFSET

    stored = checkpoint.state_dict.get("alphas_cumprod")
    if not isinstance(stored, Tensor):
        return None
    if stored.ndim != 1 or not stored.numel():
        log.warning(
            "%s: its alphas_cumprod buffer has shape %s, not a schedule; sampling uses the paper's",
            checkpoint.path,
            tuple(stored.shape),
        )
        return None
    expected = NoiseSchedule.ldm().alphas_cumprod.to(torch.float32)
    if stored.shape == expected.shape and torch.allclose(
        stored.float(), expected, rtol=0, atol=1e-6
    ):
        return None
    alphas_cumprod = stored.double()
    betas = checkpoint.state_dict.get("betas")
    if not isinstance(betas, Tensor) or betas.shape != stored.shape:
        previous = torch.cat([alphas_cumprod.new_ones(1), alphas_cumprod[:-1]])
        betas = 1 - alphas_cumprod / previous
    log.warning(
        "%s stores another noise schedule than the paper's (alphas_cumprod[-1] %.6g, the "
        "paper's %.6g; %d steps): sampling uses the file's, as the official code does",
        checkpoint.path,
        float(alphas_cumprod[-1]),
        float(expected[-1]),
        stored.numel(),
    )
    return NoiseSchedule(betas.double(), alphas_cumprod, ddim_offset=LDM_DDIM_OFFSET)


def _unet_config(
    state: Mapping[str, Tensor], checkpoint: Checkpoint, split: Mapping[str, int]
) -> UNetConfig:
    try:
        config = unet_config_from_state(state, **split)
    except CheckpointError as error:
        raise CheckpointError(f"{checkpoint.path}: {error}") from None
    heads = (
        f"heads of {config.num_head_channels} channels"
        if config.num_head_channels is not None
        else f"{config.num_heads} heads"
    )
    log.info(
        "%s: U-Net %s read off the shapes; %s (not in the file: the released model's unless "
        "given; cheff convert --num-head-channels / --num-heads)",
        checkpoint.path,
        config.channel_mult,
        heads,
    )
    return config


def _official_ldm(checkpoint: Checkpoint, use_ema: bool) -> tuple[dict, None, Any, float, Any]:
    """U-Net state, no config (read off the shapes), a lazy autoencoder, the scale factor,
    a lazy text encoder (None for the unconditional model)."""
    state, path = checkpoint.state_dict, checkpoint.path
    if checkpoint.kind not in ("ldm", "ldm-t2i"):
        raise CheckpointError(
            f"{path}: not a latent diffusion model (no {UNET_PREFIX}* weights in this "
            f"{checkpoint.container} file; it looks like {checkpoint.kind or 'nothing known'})"
        )
    unknown = [k for k in state if not k.startswith(LDM_GROUPS)]
    if unknown:
        log.warning("%s: ignoring %d unexpected keys, e.g. %s", path, len(unknown), _some(unknown))
    live = checkpoint.subtree(UNET_PREFIX)
    if use_ema:
        if not any(k.startswith(EMA_PREFIX) and k not in EMA_COUNTERS for k in state):
            raise CheckpointError(
                f"{path}: use_ema=True, but the file has no EMA weights ({EMA_PREFIX}*); its "
                f"live weights ({UNET_PREFIX}*, use_ema=False) are what the official samplers use"
            )
        names = {key: ema_key(key) for key in live}
        missing = [name for name in names.values() if name not in state]
        if missing:
            raise CheckpointError(
                f"{path}: {len(missing)} EMA copies missing: {_some(missing)} (the file has "
                f"EMA weights for only part of the U-Net)"
            )
        unet_state = {key: state[name] for key, name in names.items()}
    else:
        unet_state = live

    file_ae = None
    if f"{FIRST_STAGE_PREFIX}encoder.conv_in.weight" in state:
        ae_state = {
            k: v
            for k, v in checkpoint.subtree(FIRST_STAGE_PREFIX).items()
            if k.startswith(AUTOENCODER_GROUPS)
        }

        def file_ae() -> nn.Module:
            return _autoencoder_from_state(ae_state, path)

    file_text = None
    default_scale = UNCOND_SCALE_FACTOR
    if checkpoint.kind == "ldm-t2i":
        text_state = checkpoint.subtree(COND_STAGE_PREFIX)
        default_scale = T2I_SCALE_FACTOR

        def file_text() -> nn.Module:
            return _text_encoder_from_state(text_state, path)

    if "scale_factor" in state and float(state["scale_factor"]) != default_scale:
        # A run trained with scale_by_std stores its own; the official wrapper builds the
        # model without that buffer, and its strict=False load drops the entry.
        log.warning(
            "%s: its scale_factor entry (%g) is not used: the official code samples it with "
            "%g, as cheff does; pass scale_factor= (Python) to use the file's",
            path,
            float(state["scale_factor"]),
            default_scale,
        )
    return unet_state, None, file_ae, default_scale, file_text


def _text_encoder_from_state(
    state: Mapping[str, Tensor], path: Path, config: Any = None
) -> nn.Module:
    """A TextEncoder filled from ``state`` (no prefix; config read off the shapes unless
    given). ``transformer.to_logits`` is loaded too, though inference never uses it."""
    from cheff.models.text_encoder import TextEncoder, config_from_state

    if config is None:
        try:
            config = config_from_state(state)
        except (KeyError, ValueError) as error:
            raise CheckpointError(f"{path}: cannot read the text encoder ({error!r})") from None
    model = TextEncoder(config)
    model.load_state_dict(check_state(model, state, path))
    return model


def _our_ldm(checkpoint: Checkpoint, use_ema: bool) -> tuple[dict, Any, Any, float, Any]:
    from cheff.models.text_encoder import TextEncoderConfig
    from cheff.models.unet import UNetConfig

    path, config = checkpoint.path, checkpoint.config or {}
    if checkpoint.kind != "ldm":
        raise CheckpointError(f"{path}: holds a {checkpoint.kind!r}, not a latent diffusion model")
    if use_ema:
        raise CheckpointError(
            f"{path}: use_ema=True, but cheff files hold one set of U-Net weights (chosen when "
            "the file was written); load it without the EMA weights (use_ema=False, or drop --ema)"
        )
    try:
        unet_config = UNetConfig.from_dict(config["unet"])
        ae_config = config.get("autoencoder")
        ae_config = None if ae_config is None else AutoencoderConfig.from_dict(ae_config)
        text_config = config.get("text_encoder")
        text_config = None if text_config is None else TextEncoderConfig(**text_config)
    except (KeyError, TypeError, ValueError) as error:
        raise CheckpointError(f"{path}: the header's LDM config is unusable ({error!r})") from None
    file_ae = None
    if ae_config is not None:

        def file_ae() -> nn.Module:
            return _autoencoder_from_state(checkpoint.subtree("autoencoder."), path, ae_config)

    file_text = None
    if text_config is not None:

        def file_text() -> nn.Module:
            return _text_encoder_from_state(checkpoint.subtree("text_encoder."), path, text_config)

    default_scale = UNCOND_SCALE_FACTOR if text_config is None else T2I_SCALE_FACTOR
    scale = float(config.get("scale_factor", default_scale))
    return checkpoint.subtree("unet."), unet_config, file_ae, scale, file_text


def read_vocab(path: str | Path) -> str | None:
    """The tokenizer vocabulary (``vocab.txt`` text) a trained report model's file carries;
    None for other files (official ones included). Reads the header only."""
    return _our_metadata(path).get("vocab")


def read_training_holdout(path: str | Path) -> tuple[str, str | None] | None:
    """The held-out set our trained file was trained without (``"none"``: every image was
    used) and the SHA-256 of its keys then (None where unknown); None for files that do not
    say (official ones, and ours from before it was recorded). Reads the header only."""
    metadata = _our_metadata(path)
    name = metadata.get("holdout")
    return None if name is None else (name, metadata.get("holdout_sha256") or None)


def read_image_size(path: str | Path) -> int | None:
    """The image side our trained LDM or SR file was trained at (its ``image_size`` header
    entry); None for other files (the released LDMs are 256 px models, the SRs 1024 px)."""
    value = _our_metadata(path).get("image_size")
    return None if value is None else int(value)


def read_low_size(path: str | Path) -> int | None:
    """The input side our trained SR file was trained from (its ``low_size`` header entry);
    None for other files (the released SRs take 256 px)."""
    value = _our_metadata(path).get("low_size")
    return None if value is None else int(value)


def _our_metadata(path: str | Path) -> dict[str, str]:
    """The header metadata of our safetensors file, {} for any other file (reads the header
    only)."""
    path = Path(path)
    with open(path, "rb") as handle:
        if handle.read(9)[8:9] != b"{":
            return {}
    from safetensors import safe_open

    with safe_open(str(path), framework="pt", device="cpu") as handle:
        return dict(handle.metadata() or {})


# --------------------------------------------------------------------------- super-resolution


def load_sr(
    path: str | Path | Checkpoint, *, config: Any = None, device: torch.device | str = "cpu"
) -> SuperResolution:
    """A :class:`~cheff.models.sr.SuperResolution` in eval mode from an SR file.

    Reads the released ``cheff_sr_base.pt`` / ``cheff_sr_fine.pt`` (``{"model": state_dict,
    "optimizer", "epoch", "steps"}``, the U-Net's keys without a prefix; the optimiser state
    is ignored) strictly, and our safetensors files (``unet.*``, the config in the header). The
    architecture of an official file is read off the shapes (GroupNorm groups: 8, as
    released); ``config`` (an ``SRUNetConfig``) overrides it. The noise schedule our file
    stores goes into ``schedule`` (the released files store none: the paper's cosine one).
    """
    from cheff.models.sr import SuperResolution
    from cheff.models.sr_unet import SRUNet, SRUNetConfig, config_from_state

    checkpoint = read_checkpoint(path)
    if checkpoint.container == "cheff":
        if checkpoint.kind != "sr":
            raise CheckpointError(
                f"{checkpoint.path}: holds a {checkpoint.kind!r}, not an SR model"
            )
        state = checkpoint.subtree("unet.")
        try:
            file_config = SRUNetConfig.from_dict((checkpoint.config or {})["unet"])
        except (KeyError, TypeError, ValueError) as error:
            raise CheckpointError(
                f"{checkpoint.path}: the header's SR config is unusable ({error!r})"
            ) from None
    else:
        if checkpoint.kind != "sr":
            raise CheckpointError(
                f"{checkpoint.path}: not a super-resolution model (an SR file keeps its U-Net "
                f"under ['model'] with init_conv/downs/ups keys; this {checkpoint.container} "
                f"file looks like {checkpoint.kind or 'nothing known'})"
            )
        state = checkpoint.state_dict
        try:
            file_config = config_from_state(state)
        except (KeyError, ValueError, IndexError) as error:
            raise CheckpointError(
                f"{checkpoint.path}: cannot read an SR U-Net off these keys ({error!r}); pass "
                "config="
            ) from None
    unet = SRUNet(config or file_config)
    unet.load_state_dict(check_state(unet, state, checkpoint.path))
    schedule = _our_schedule(checkpoint) if checkpoint.container == "cheff" else None
    return SuperResolution(unet, schedule).to(device).eval()


def save_sr(model: nn.Module, path: str | Path, **extra: str) -> Path:
    """A :class:`~cheff.models.sr.SuperResolution` as ``unet.*`` with its config."""
    config: dict[str, Any] = {"unet": model.unet.config.to_dict()}
    tensors = _schedule_entries(model.schedule, config)
    return save_checkpoint(model, path, kind="sr", config=config, extra=extra, tensors=tensors)


# --------------------------------------------------------------------------- writing


def save_checkpoint(
    model: nn.Module,
    path: str | Path,
    *,
    kind: str,
    config: Mapping[str, Any],
    extra: Mapping[str, str] | None = None,
    tensors: Mapping[str, Tensor] | None = None,
) -> Path:
    """Write ``model``'s weights and config as one safetensors file; returns the path.
    ``tensors``: more entries beside the weights (a model's noise schedule)."""
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
    entries = {**model.state_dict(), **dict(tensors or {})}
    entries = {k: v.detach().to("cpu").contiguous() for k, v in entries.items()}
    tmp = path.with_name(path.name + ".tmp")
    save_file(entries, str(tmp), metadata=metadata)
    tmp.replace(path)  # never a half-written checkpoint under the final name
    return path


def save_autoencoder(model: nn.Module, path: str | Path, **extra: str) -> Path:
    return save_checkpoint(
        model, path, kind="autoencoder", config=model.config.to_dict(), extra=extra
    )


def save_ldm(model: nn.Module, path: str | Path, **extra: str) -> Path:
    """A :class:`~cheff.models.ldm.LatentDiffusion` as ``unet.*`` + ``autoencoder.*`` weights,
    (+ ``text_encoder.*`` for a report-conditioned one), with the U-Net, autoencoder (or null)
    and text encoder (or null) configs and the scale factor in the header."""
    from dataclasses import asdict

    autoencoder, text_encoder = model.autoencoder, model.text_encoder
    config = {
        "unet": model.unet.config.to_dict(),
        "autoencoder": None if autoencoder is None else autoencoder.config.to_dict(),
        "text_encoder": None if text_encoder is None else asdict(text_encoder.config),
        "scale_factor": model.scale_factor,
        "conditioning_key": model.conditioning_key,
        "condition": model.condition,
    }
    tensors = _schedule_entries(model.schedule, config)
    return save_checkpoint(model, path, kind="ldm", config=config, extra=extra, tensors=tensors)


def _schedule_entries(schedule: Any, config: dict[str, Any]) -> dict[str, Tensor]:
    """A model's noise schedule (when it has one) as ``schedule.*`` tensors, float64 as
    computed, and its DDIM offset in ``config``: the sampler then uses exactly the schedule
    the model was trained with."""
    if schedule is None:
        return {}
    config["schedule"] = {"ddim_offset": schedule.ddim_offset}
    return {
        SCHEDULE_PREFIX + "betas": schedule.betas,
        SCHEDULE_PREFIX + "alphas_cumprod": schedule.alphas_cumprod,
    }


def _our_schedule(checkpoint: Checkpoint) -> Any:
    """The noise schedule our file stores (:func:`_schedule_entries`), or None (files written
    before schedules were stored: the paper's is assumed)."""
    from cheff.diffusion import NoiseSchedule

    stored = checkpoint.subtree(SCHEDULE_PREFIX)
    if not stored:
        return None
    try:
        offset = int((checkpoint.config or {})["schedule"]["ddim_offset"])
        return NoiseSchedule(stored["betas"], stored["alphas_cumprod"], ddim_offset=offset)
    except (KeyError, TypeError, ValueError) as error:
        raise CheckpointError(
            f"{checkpoint.path}: the stored noise schedule is unusable ({error!r})"
        ) from None


# Loaders by kind: ``cheff convert`` and ``cheff inspect`` go through this table, and each
# later model adds its loader and saver here.
LOADERS = {
    "autoencoder": (load_autoencoder, save_autoencoder),
    "ldm": (load_ldm, save_ldm),
    "sr": (load_sr, save_sr),
}


# What ``convert`` makes of each kind of file it may be given (``kind="auto"``).
CONVERTED_KIND = {"autoencoder": "autoencoder", "ldm": "ldm", "ldm-t2i": "ldm", "sr": "sr"}


def convert(source: str | Path, target: str | Path, *, kind: str = "auto", **options: Any) -> Path:
    """Turn an official file into ours (weights checked against the model on the way);
    ``options`` go to the kind's loader (an LDM's ``num_head_channels`` / ``num_heads``).
    ``kind`` "auto" converts the whole model the file holds; "autoencoder" takes an LDM
    file's first_stage_model."""
    if kind != "auto" and kind not in LOADERS:
        raise CheckpointError(
            f"cannot convert a {kind!r}; known kinds: {sorted(LOADERS)} (or 'auto')"
        )
    checkpoint = read_checkpoint(source)  # once: the kind and the weights come from it
    load, save = LOADERS[resolve_kind(checkpoint) if kind == "auto" else kind]
    model = load(checkpoint, **options)
    return save(model, target, converted_from=checkpoint.path.name)


def resolve_kind(source: str | Path | Checkpoint) -> str:
    """The :data:`LOADERS` kind of the whole model ``source`` holds, read off its keys."""
    checkpoint = read_checkpoint(source)
    found = checkpoint.kind
    if found not in CONVERTED_KIND:
        raise CheckpointError(
            f"{checkpoint.path}: cannot tell which model this file holds (no autoencoder, LDM or "
            f"SR weights under the official names); give the kind: one of {sorted(LOADERS)}"
        )
    return CONVERTED_KIND[found]


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
            k: (f"{len(v.splitlines())} tokens" if k == "vocab" else v)
            for k, v in checkpoint.metadata.items()
            if k not in ("config", "format", "kind")
        },
    }
