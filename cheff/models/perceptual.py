"""LPIPS (VGG16, v0.1 linear heads), the perceptual term of the autoencoder's training loss.

Module and buffer names follow taming-transformers' ``taming/modules/losses/lpips.py`` one to
one, because the official training stores this module inside its checkpoints as
``loss.perceptual_loss.*``; the weights themselves come from two files that are never
downloaded here: torchvision's ImageNet ``vgg16`` state dict (``features.N.*``) and the LPIPS
v0.1 ``vgg.pth`` heads (``linK.model.1.weight``). Files are read only through
:func:`cheff.checkpoints.safe_torch_load`, which never unpickles code.

The module is frozen after construction (no parameter wants a gradient, eval mode that
:meth:`LPIPS.train` does not leave); gradients still flow to the inputs.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import torch
from torch import Tensor, nn

from cheff.checkpoints import CheckpointError, safe_torch_load

# torchvision's vgg16 ``features`` (cfg "D"): output channels, "M" for a 2x2 max-pool.
VGG16_CFG = (64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512)
# taming's slices as half-open ranges of ``features`` indices, ending at relu1_2 ... relu5_3.
SLICES = ((0, 4), (4, 9), (9, 16), (16, 23), (23, 30))
CHANNELS = (64, 128, 256, 512, 512)
SHIFT = (-0.030, -0.088, -0.188)
SCALE = (0.458, 0.448, 0.450)
EPS = 1e-10
# Where a file may keep this module: alone, inside a loss module, inside a training checkpoint.
PREFIXES = ("", "perceptual_loss.", "loss.perceptual_loss.")


def vgg16_features() -> list[nn.Module]:
    """The 30 layers of torchvision's ``vgg16().features``, in order (torchvision not needed)."""
    layers: list[nn.Module] = []
    channels = 3
    for entry in VGG16_CFG:
        if entry == "M":
            layers.append(nn.MaxPool2d(kernel_size=2, stride=2))
        else:
            layers += [nn.Conv2d(channels, int(entry), 3, padding=1), nn.ReLU()]
            channels = int(entry)
    return layers


class ScalingLayer(nn.Module):
    """[-1, 1] input -> ImageNet-normalised input, with LPIPS' own constants."""

    def __init__(self) -> None:
        super().__init__()
        self.register_buffer("shift", torch.tensor(SHIFT)[None, :, None, None])
        self.register_buffer("scale", torch.tensor(SCALE)[None, :, None, None])

    def forward(self, x: Tensor) -> Tensor:
        return (x - self.shift) / self.scale


class VGG16Slices(nn.Module):
    """VGG16 ``features`` cut after relu1_2 ... relu5_3; layers keep torchvision's indices."""

    def __init__(self) -> None:
        super().__init__()
        layers = vgg16_features()
        for k, (start, stop) in enumerate(SLICES, start=1):
            block = nn.Sequential()
            for index in range(start, stop):
                block.add_module(str(index), layers[index])
            self.add_module(f"slice{k}", block)

    def forward(self, x: Tensor) -> list[Tensor]:
        outs = []
        for k in range(1, len(SLICES) + 1):
            x = getattr(self, f"slice{k}")(x)
            outs.append(x)
        return outs


class NetLinLayer(nn.Module):
    """Dropout + 1x1 convolution to one channel; the learned per-channel weights of LPIPS."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.model = nn.Sequential(nn.Dropout(), nn.Conv2d(channels, 1, 1, bias=False))

    def forward(self, x: Tensor) -> Tensor:
        return self.model(x)


def normalize_tensor(x: Tensor, eps: float = EPS) -> Tensor:
    """Unit length over channels at every position (eps as LPIPS: added to the norm)."""
    return x / (torch.sqrt(torch.sum(x**2, dim=1, keepdim=True)) + eps)


class LPIPS(nn.Module):
    """Learned perceptual distance; ``forward(input, target)`` -> (B, 1, 1, 1), inputs in [-1, 1].

    Constructed with random weights; :meth:`load_vgg16` and :meth:`load_heads` (or
    :meth:`from_files`) put real ones in, and :attr:`pretrained` says whether both did, so a
    training run can refuse to start (or say "random features") without them.
    """

    def __init__(self) -> None:
        super().__init__()
        self.scaling_layer = ScalingLayer()
        self.net = VGG16Slices()
        for k, channels in enumerate(CHANNELS):
            self.add_module(f"lin{k}", NetLinLayer(channels))
        self.sources: dict[str, str] = {}  # "vgg16" / "heads" -> the file they came from
        self.requires_grad_(False)
        self.eval()

    @property
    def pretrained(self) -> bool:
        return "vgg16" in self.sources and "heads" in self.sources

    @classmethod
    def from_files(cls, vgg16: str | Path, heads: str | Path) -> LPIPS:
        """Both halves from local files (a training checkpoint may be given as both)."""
        model = cls()
        model.load_vgg16(vgg16)
        model.load_heads(heads)
        return model

    def train(self, mode: bool = True) -> LPIPS:
        """Stay in eval: a frozen metric, whatever mode an enclosing loss module is put in.

        (taming calls ``.eval()`` once, so under Lightning's ``model.train()`` its heads'
        dropout is active during training; here it never is.)
        """
        return super().train(False)

    def forward(self, input: Tensor, target: Tensor) -> Tensor:
        outs0 = self.net(self.scaling_layer(input))
        outs1 = self.net(self.scaling_layer(target))
        value = 0
        for k, (f0, f1) in enumerate(zip(outs0, outs1)):
            diff = (normalize_tensor(f0) - normalize_tensor(f1)) ** 2
            value = value + getattr(self, f"lin{k}")(diff).mean(dim=(2, 3), keepdim=True)
        return value

    # ------------------------------------------------------------------ loading

    def load_vgg16(self, path: str | Path) -> None:
        """torchvision's ``vgg16`` state dict (``classifier.*`` ignored), or ``net.*`` keys."""
        path = Path(path)
        state = _tensors(path)
        ours = [k for k in self.state_dict() if k.startswith("net.")]
        if any(k.startswith("features.") for k in state):
            names = {k: _torchvision_name(k) for k in ours}
        else:
            prefix = _prefix(state, "net.slice1.")
            names = {k: prefix + k for k in ours}
        self._take(state, names, path, "VGG16 features")
        self.sources["vgg16"] = str(path)

    def load_heads(self, path: str | Path) -> None:
        """The LPIPS v0.1 linear heads (``linK.model.1.weight``), bare or prefixed."""
        path = Path(path)
        state = _tensors(path)
        prefix = _prefix(state, "lin")
        ours = [k for k in self.state_dict() if k.startswith("lin")]
        self._take(state, {k: prefix + k for k in ours}, path, "LPIPS linear heads")
        self.sources["heads"] = str(path)

    def _take(
        self, state: Mapping[str, Tensor], names: dict[str, str], path: Path, what: str
    ) -> None:
        """Copy ``state[names[k]]`` into our entry ``k``; name every missing or misshaped key."""
        expected = self.state_dict()
        missing = [f for f in names.values() if f not in state]
        misshaped = [
            f"{f} (file {tuple(state[f].shape)}, model {tuple(expected[k].shape)})"
            for k, f in names.items()
            if f in state and state[f].shape != expected[k].shape
        ]
        problems = [f"missing {', '.join(missing)}"] if missing else []
        problems += [f"another shape: {', '.join(misshaped)}"] if misshaped else []
        if problems:
            raise CheckpointError(f"{path}: does not fit the {what}: " + "; ".join(problems))
        with torch.no_grad():
            for k, f in names.items():
                expected[k].copy_(state[f])


def _torchvision_name(key: str) -> str:
    """``net.slice2.5.weight`` -> ``features.5.weight``."""
    _, _, index, param = key.split(".")
    return f"features.{index}.{param}"


def _prefix(state: Mapping[str, Tensor], probe: str) -> str:
    """The first of :data:`PREFIXES` under which ``state`` has a key starting with ``probe``."""
    for prefix in PREFIXES:
        if any(k.startswith(prefix + probe) for k in state):
            return prefix
    return ""


def _tensors(path: Path) -> dict[str, Tensor]:
    if not path.is_file():
        raise CheckpointError(f"{path}: no such weights file")
    payload = safe_torch_load(path)
    if isinstance(payload, Mapping) and isinstance(payload.get("state_dict"), Mapping):
        payload = payload["state_dict"]
    if not isinstance(payload, Mapping):
        raise CheckpointError(f"{path}: expected a dict of tensors, got {type(payload).__name__}")
    return {str(k): v for k, v in payload.items() if isinstance(v, Tensor)}
