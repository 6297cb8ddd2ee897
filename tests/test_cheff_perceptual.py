"""LPIPS (VGG16) and the PatchGAN discriminator of the autoencoder's training loss.

The expected names and shapes are written out here from torchvision's vgg16 cfg and taming's
layer order, independently of the modules' construction code.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from cheff.checkpoints import CheckpointError
from cheff.models.discriminator import NLayerDiscriminator
from cheff.models.perceptual import LPIPS

# torchvision vgg16().features: (index, in, out) of every Conv2d.
VGG_CONVS = [
    (0, 3, 64), (2, 64, 64),
    (5, 64, 128), (7, 128, 128),
    (10, 128, 256), (12, 256, 256), (14, 256, 256),
    (17, 256, 512), (19, 512, 512), (21, 512, 512),
    (24, 512, 512), (26, 512, 512), (28, 512, 512),
]  # fmt: skip
SLICE_OF = {0: 1, 2: 1, 5: 2, 7: 2, 10: 3, 12: 3, 14: 3, 17: 4, 19: 4, 21: 4, 24: 5, 26: 5, 28: 5}
HEADS = {f"lin{k}.model.1.weight": (1, c, 1, 1) for k, c in enumerate([64, 128, 256, 512, 512])}


def torchvision_vgg16_state(seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    state = {}
    for i, cin, cout in VGG_CONVS:
        state[f"features.{i}.weight"] = torch.randn(cout, cin, 3, 3, generator=g) * 0.05
        state[f"features.{i}.bias"] = torch.randn(cout, generator=g) * 0.05
    state["classifier.0.weight"] = torch.randn(8, 8, generator=g)  # shape irrelevant: ignored
    state["classifier.0.bias"] = torch.randn(8, generator=g)
    state["classifier.6.weight"] = torch.randn(10, 8, generator=g)
    return state


def heads_state(seed: int = 1) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {k: torch.rand(shape, generator=g) for k, shape in HEADS.items()}


@pytest.fixture(scope="module")
def lpips() -> LPIPS:
    torch.manual_seed(0)
    return LPIPS()


@pytest.fixture(scope="module")
def vgg_file(tmp_path_factory) -> tuple[Path, dict[str, torch.Tensor]]:
    state = torchvision_vgg16_state()
    path = tmp_path_factory.mktemp("vgg") / "vgg16-397923af.pth"
    torch.save(state, path)
    return path, state


# --------------------------------------------------------------------------- LPIPS structure


def test_vgg_stack_has_torchvision_names_and_shapes(lpips) -> None:
    expected = {}
    for i, cin, cout in VGG_CONVS:
        expected[f"net.slice{SLICE_OF[i]}.{i}.weight"] = (cout, cin, 3, 3)
        expected[f"net.slice{SLICE_OF[i]}.{i}.bias"] = (cout,)
    got = {k: tuple(v.shape) for k, v in lpips.state_dict().items() if k.startswith("net.")}
    assert got == expected
    # the non-parametric layers sit where torchvision has them: pools at 4, 9, 16, 23
    pools = [n for n, m in lpips.net.named_modules() if isinstance(m, torch.nn.MaxPool2d)]
    assert pools == ["slice2.4", "slice3.9", "slice4.16", "slice5.23"]
    relus = [n for n, m in lpips.net.named_modules() if isinstance(m, torch.nn.ReLU)]
    assert [int(n.split(".")[1]) for n in relus] == [i + 1 for i, _, _ in VGG_CONVS]


def test_heads_scaling_and_frozen_state(lpips) -> None:
    state = lpips.state_dict()
    assert {k: tuple(v.shape) for k, v in state.items() if k.startswith("lin")} == HEADS
    assert set(state) == {
        *(k for k in state if k.startswith(("net.", "lin"))),
        "scaling_layer.shift",
        "scaling_layer.scale",
    }
    torch.testing.assert_close(
        state["scaling_layer.shift"], torch.tensor([-0.030, -0.088, -0.188]).view(1, 3, 1, 1)
    )
    torch.testing.assert_close(
        state["scaling_layer.scale"], torch.tensor([0.458, 0.448, 0.450]).view(1, 3, 1, 1)
    )
    assert not any(p.requires_grad for p in lpips.parameters())
    assert not lpips.training
    lpips.train()  # an enclosing loss module's .train() must not switch dropout on
    assert not any(m.training for m in lpips.modules())
    assert not lpips.pretrained


# --------------------------------------------------------------------------- loading


def test_load_vgg16_places_torchvision_tensors(vgg_file) -> None:
    path, state = vgg_file
    model = LPIPS()
    model.load_vgg16(path)
    ours = model.state_dict()
    for i in (0, 2, 7, 14, 17, 24, 28):
        for param in ("weight", "bias"):
            assert torch.equal(
                ours[f"net.slice{SLICE_OF[i]}.{i}.{param}"], state[f"features.{i}.{param}"]
            )
    assert model.sources == {"vgg16": str(path)} and not model.pretrained


def test_from_files_and_prefixed_training_checkpoint(vgg_file, tmp_path) -> None:
    vgg_path, vgg = vgg_file
    heads_path = tmp_path / "vgg.pth"
    heads = heads_state()
    torch.save(heads, heads_path)
    model = LPIPS.from_files(vgg16=vgg_path, heads=heads_path)
    assert model.pretrained
    for key, tensor in heads.items():
        assert torch.equal(model.state_dict()[key], tensor)

    # a Lightning training checkpoint holds the whole module as loss.perceptual_loss.*
    lightning = {
        "state_dict": {
            **{f"loss.perceptual_loss.{k}": v for k, v in model.state_dict().items()},
            "loss.discriminator.main.0.weight": torch.zeros(64, 3, 4, 4),
            "encoder.conv_in.weight": torch.zeros(1),
        },
        "global_step": 7,
    }
    ckpt = tmp_path / "last.ckpt"
    torch.save(lightning, ckpt)
    again = LPIPS.from_files(vgg16=ckpt, heads=ckpt)
    assert again.pretrained
    for key, tensor in model.state_dict().items():
        assert torch.equal(again.state_dict()[key], tensor), key

    # our own key names, unprefixed
    bare = tmp_path / "ours.pt"
    torch.save({k: v for k, v in model.state_dict().items() if k.startswith("net.")}, bare)
    third = LPIPS()
    third.load_vgg16(bare)
    assert torch.equal(third.net.slice5.get_submodule("28").weight, vgg["features.28.weight"])


def test_missing_and_misshaped_keys_are_named(vgg_file, tmp_path) -> None:
    _, state = vgg_file
    state = dict(state)
    del state["features.19.weight"]
    broken = tmp_path / "vgg-missing.pth"
    torch.save(state, broken)
    with pytest.raises(CheckpointError, match=r"vgg-missing\.pth.*features\.19\.weight"):
        LPIPS().load_vgg16(broken)

    heads = heads_state()
    heads["lin3.model.1.weight"] = torch.zeros(1, 256, 1, 1)
    del heads["lin4.model.1.weight"]
    bad = tmp_path / "heads-bad.pth"
    torch.save(heads, bad)
    with pytest.raises(CheckpointError) as error:
        LPIPS().load_heads(bad)
    message = str(error.value)
    assert "heads-bad.pth" in message and "lin4.model.1.weight" in message
    assert "lin3.model.1.weight (file (1, 256, 1, 1), model (1, 512, 1, 1))" in message

    with pytest.raises(CheckpointError, match="no such"):
        LPIPS().load_heads(tmp_path / "absent.pth")


class RunsCode:
    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_a_file_that_pickles_code_is_refused_unrun(tmp_path) -> None:
    marker = tmp_path / "code-ran"
    path = tmp_path / "vgg.pth"
    torch.save({**heads_state(), "extra": RunsCode(marker)}, path)
    model = LPIPS()
    with pytest.raises(CheckpointError, match="refused"):
        model.load_heads(path)
    with pytest.raises(CheckpointError, match="refused"):
        model.load_vgg16(path)
    assert not marker.exists()
    assert not model.sources


# --------------------------------------------------------------------------- the distance


def test_distance_properties_and_gradients(lpips) -> None:
    g = torch.Generator().manual_seed(3)
    x = torch.rand(2, 3, 16, 16, generator=g) * 2 - 1  # 16: relu5_3 is 1 x 1
    y = torch.rand(2, 3, 16, 16, generator=g) * 2 - 1
    with torch.no_grad():
        lpips.lin0.model[1].weight.fill_(1.0)  # random heads can be negative; make them not
        for k in range(1, 5):
            getattr(lpips, f"lin{k}").model[1].weight.abs_()
    # one batch of pairs (x, x), (x, y), (y, x): a CPU VGG pass costs ~0.5 s here
    out = lpips(torch.cat([x, x, y]), torch.cat([x, y, x]))
    assert out.shape == (6, 1, 1, 1)
    same, d_xy, d_yx = out.split(2)
    assert torch.equal(same, torch.zeros_like(same))
    assert (d_xy > 0).all()
    torch.testing.assert_close(d_xy, d_yx)
    # per sample: a pair alone gives the distance it had inside the batch
    torch.testing.assert_close(lpips(x[1:2], y[1:2]), d_xy[1:2])

    x_hat = x.clone().requires_grad_(True)
    lpips(x_hat, y).sum().backward()
    assert x_hat.grad is not None and torch.isfinite(x_hat.grad).all()
    assert x_hat.grad.abs().sum() > 0
    assert all(p.grad is None for p in lpips.parameters())


def test_one_layer_contribution_by_hand(lpips) -> None:
    """Heads 1 on layer 0, 0 elsewhere: the distance is the relu1_2 formula, written out."""
    g = torch.Generator().manual_seed(4)
    x = torch.rand(2, 3, 16, 16, generator=g) * 2 - 1
    y = torch.rand(2, 3, 16, 16, generator=g) * 2 - 1
    with torch.no_grad():
        lpips.lin0.model[1].weight.fill_(1.0)
        for k in range(1, 5):
            getattr(lpips, f"lin{k}").model[1].weight.zero_()
        got = lpips(x, y)

        shift = torch.tensor([-0.030, -0.088, -0.188]).view(1, 3, 1, 1)
        scale = torch.tensor([0.458, 0.448, 0.450]).view(1, 3, 1, 1)

        def relu1_2(t: torch.Tensor) -> torch.Tensor:
            s = lpips.net.slice1
            h = F.relu(F.conv2d((t - shift) / scale, s[0].weight, s[0].bias, padding=1))
            f = F.relu(F.conv2d(h, s[2].weight, s[2].bias, padding=1))
            return f / (f.pow(2).sum(1, keepdim=True).sqrt() + 1e-10)

        expected = (relu1_2(x) - relu1_2(y)).pow(2).sum(1).mean((1, 2)).view(2, 1, 1, 1)
    torch.testing.assert_close(got, expected)
    assert (got > 0).all()


# --------------------------------------------------------------------------- discriminator


def taming_keys(n_layers: int) -> list[str]:
    """taming's NLayerDiscriminator(use_actnorm=False) state-dict keys, written out."""
    keys = ["main.0.weight", "main.0.bias"]
    index = 2
    for _ in range(n_layers):  # (n_layers - 1) stride-2 blocks + the stride-1 block
        bn = [f"main.{index + 1}.{p}" for p in ("weight", "bias", "running_mean", "running_var")]
        keys += [f"main.{index}.weight", *bn, f"main.{index + 1}.num_batches_tracked"]
        index += 3
    return [*keys, f"main.{index}.weight", f"main.{index}.bias"]


def test_discriminator_keys_shapes_and_output() -> None:
    torch.manual_seed(0)
    disc = NLayerDiscriminator(input_nc=3, ndf=64, n_layers=3)
    state = disc.state_dict()
    assert list(state) == taming_keys(3)
    assert tuple(state["main.0.weight"].shape) == (64, 3, 4, 4)
    assert tuple(state["main.2.weight"].shape) == (128, 64, 4, 4)
    assert tuple(state["main.5.weight"].shape) == (256, 128, 4, 4)
    assert tuple(state["main.8.weight"].shape) == (512, 256, 4, 4)
    assert tuple(state["main.11.weight"].shape) == (1, 512, 4, 4)
    assert tuple(state["main.9.running_var"].shape) == (512,)

    def out_size(size: int, stride: int) -> int:  # kernel 4, padding 1
        return (size + 2 - 4) // stride + 1

    size = 64
    for stride in (2, 2, 2, 1, 1):
        size = out_size(size, stride)
    assert size == 6
    logits = disc(torch.randn(2, 3, 64, 64))
    assert logits.shape == (2, 1, size, size)

    small = NLayerDiscriminator(input_nc=1, ndf=8, n_layers=1)
    assert list(small.state_dict()) == taming_keys(1)
    size = 32
    for stride in (2, 1, 1):  # n_layers=1: the first conv, the stride-1 block, the last conv
        size = out_size(size, stride)
    assert small(torch.randn(1, 1, 32, 32)).shape == (1, 1, size, size) == (1, 1, 14, 14)


def test_discriminator_init_statistics_and_generator() -> None:
    disc = NLayerDiscriminator(generator=torch.Generator().manual_seed(5))
    convs = [m for m in disc.modules() if isinstance(m, torch.nn.Conv2d)]
    bns = [m for m in disc.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    weights = torch.cat([m.weight.flatten() for m in convs])
    assert abs(weights.mean().item()) < 1e-3
    assert abs(weights.std().item() - 0.02) < 1e-3
    gammas = torch.cat([m.weight for m in bns])
    assert abs(gammas.mean().item() - 1.0) < 5e-3 and abs(gammas.std().item() - 0.02) < 5e-3
    assert all(torch.equal(m.bias, torch.zeros_like(m.bias)) for m in bns)
    assert convs[0].bias is not None and convs[0].bias.abs().max() <= 1 / (3 * 16) ** 0.5
    assert [m.bias is None for m in convs] == [False, True, True, True, False]

    torch.manual_seed(123)  # the generator alone fixes the init, global RNG or not
    again = NLayerDiscriminator(generator=torch.Generator().manual_seed(5))
    for key, tensor in disc.state_dict().items():
        assert torch.equal(again.state_dict()[key], tensor), key
