"""Gradient checkpointing changes memory and compute, never the numbers: the same loss and
the same gradients with it on and off, for every network that offers it."""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch
from torch import nn

from cheff.models.sr_unet import SRUNet, SRUNetConfig
from cheff.models.text_encoder import TextEncoder, TextEncoderConfig
from cheff.models.unet import UNetConfig, UNetModel


def _unet() -> tuple[nn.Module, Callable[[nn.Module], torch.Tensor]]:
    config = UNetConfig(
        model_channels=32,
        channel_mult=(1, 2),
        num_res_blocks=1,
        attention_levels=(1,),
        num_head_channels=32,
        context_dim=16,
    )
    x, context = torch.randn(2, 3, 8, 8), torch.randn(2, 5, 16)
    return UNetModel(config), lambda m: m(x, torch.tensor([3, 700]), context)


def _text_encoder() -> tuple[nn.Module, Callable[[nn.Module], torch.Tensor]]:
    config = TextEncoderConfig(vocab_size=20, max_seq_len=6, n_embed=16, n_layer=2, heads=2)
    ids = torch.randint(0, 20, (2, 6), generator=torch.Generator().manual_seed(0))
    return TextEncoder(config), lambda m: m(ids)


def _sr() -> tuple[nn.Module, Callable[[nn.Module], torch.Tensor]]:
    x = torch.randn(2, 2, 16, 16)
    model = SRUNet(SRUNetConfig(dim=8, dim_mults=(1, 1, 2), attention_layers=2))
    return model, lambda m: m(x, torch.tensor([10, 1500]))


@pytest.mark.parametrize("make", [_unet, _text_encoder, _sr], ids=["unet", "text", "sr"])
def test_checkpointing_gives_the_same_loss_and_gradients(make) -> None:
    torch.manual_seed(0)
    model, forward = make()
    model.train()
    results = []
    for enabled in (False, True):
        model.gradient_checkpointing = enabled
        model.zero_grad()
        loss = forward(model).square().mean()
        loss.backward()
        grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
        results.append((loss.detach(), grads))
    (plain_loss, plain), (checked_loss, checked) = results
    assert torch.equal(plain_loss, checked_loss)
    assert plain.keys() == checked.keys() and plain
    for name in plain:
        torch.testing.assert_close(checked[name], plain[name], rtol=1e-5, atol=1e-7, msg=name)


def _autoencoder() -> tuple[nn.Module, Callable[[nn.Module], torch.Tensor]]:
    from cheff.config import PRESETS
    from cheff.models.autoencoder import AutoencoderKL

    x = torch.rand(2, 3, 16, 16) * 2 - 1
    return AutoencoderKL(PRESETS["tiny"].autoencoder), lambda m: m.decode(m.encode(x).mean)


@pytest.mark.parametrize("make", [_unet, _sr, _autoencoder], ids=["unet", "sr", "autoencoder"])
def test_channels_last_gives_the_same_loss_and_gradients(make) -> None:
    """``train.channels_last`` (NHWC weights; the loop converts 4-D batches too)."""
    torch.manual_seed(0)
    model, forward = make()
    results = []
    for memory_format in (torch.contiguous_format, torch.channels_last):
        model.to(memory_format=memory_format)
        model.zero_grad()
        loss = forward(model).square().mean()
        loss.backward()
        grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
        results.append((loss.detach(), grads))
    (plain_loss, plain), (nhwc_loss, nhwc) = results
    torch.testing.assert_close(nhwc_loss, plain_loss, rtol=1e-5, atol=1e-7)
    for name in plain:
        torch.testing.assert_close(nhwc[name], plain[name], rtol=1e-4, atol=1e-6, msg=name)


def _tiny_sdm_run(collection, ae_path, **train: object) -> dict[str, object]:
    """Overrides for a short CPU run of the tiny SDM at 32 px; ``train``: ``train.*`` keys."""
    from conftest import TRAINING_HOLDOUT

    return {
        "data.data": str(collection),
        "data.holdout": TRAINING_HOLDOUT,
        "data.image_size": 32,
        "data.num_workers": 0,
        "ae": str(ae_path),
        "train.device": "cpu",
    } | {f"train.{key}": value for key, value in train.items()}


def test_a_channels_last_run_trains_and_saves_plain_weights(
    training_collection, ae_path, tmp_path
) -> None:

    from cheff.checkpoints import load_ldm
    from cheff.config import SDM_PRESETS, apply_overrides
    from cheff.train.sdm import LDM_FILE, train_sdm

    settings = _tiny_sdm_run(training_collection, ae_path, max_steps=2, channels_last=True)
    config = apply_overrides(SDM_PRESETS["tiny"], settings)
    train_sdm(config, tmp_path / "run", progress=False)
    (step,) = sorted((tmp_path / "run" / "checkpoints").iterdir())
    ldm = load_ldm(step / LDM_FILE)
    assert all(p.is_contiguous() for p in ldm.parameters())


def test_train_compile_passes_its_mode_to_each_compiled_module(
    training_collection, ae_path, tmp_path, monkeypatch
) -> None:
    """``train.compile_mode`` reaches ``nn.Module.compile`` (recorded here instead of
    compiling, which takes minutes on a CPU); a mode torch does not know is refused."""

    from torch._inductor import list_mode_options

    from cheff.config import SDM_PRESETS, apply_overrides
    from cheff.train.sdm import train_sdm

    calls: list[tuple[str, dict]] = []
    monkeypatch.setattr(
        torch.nn.Module,
        "compile",
        lambda self, **kwargs: calls.append((type(self).__name__, kwargs)),
    )
    settings = _tiny_sdm_run(
        training_collection, ae_path, max_steps=1, compile=True, compile_mode="max-autotune"
    )
    train_sdm(apply_overrides(SDM_PRESETS["tiny"], settings), tmp_path / "run", progress=False)
    assert calls and all(kwargs == {"mode": "max-autotune"} for _, kwargs in calls), calls

    # train.compile_channels_last: the mode travels as its Inductor options (torch.compile
    # refuses a mode and options together), with Inductor's channels-last layout forced.
    calls.clear()
    settings["train.compile_channels_last"] = True
    train_sdm(apply_overrides(SDM_PRESETS["tiny"], settings), tmp_path / "run2", progress=False)
    wanted = {**list_mode_options("max-autotune"), "force_layout_optimization": True}
    assert calls and all(kwargs == {"options": wanted} for _, kwargs in calls), calls
    with pytest.raises(ValueError, match="compile_mode 'fastest': choose one of default"):
        apply_overrides(SDM_PRESETS["tiny"], {"train.compile_mode": "fastest"})
    with pytest.raises(ValueError, match="compile_channels_last sets torch.compile's layout"):
        apply_overrides(SDM_PRESETS["tiny"], {"train.compile_channels_last": "true"})


def test_compile_channels_last_options_are_ones_torch_accepts() -> None:
    """``compile_in_place(..., channels_last=True)`` really compiles (torch.compile checks its
    Inductor options when called, so no graph is built here): a renamed Inductor setting in a
    later torch would fail this, not a user's run minutes into its first step."""
    from torch._inductor import list_mode_options

    from cheff.config import COMPILE_MODES
    from cheff.train.loop import compile_in_place

    for mode in COMPILE_MODES:
        module = nn.Conv2d(4, 2, 3)
        compile_in_place(module, mode, channels_last=True)
        assert module._compiled_call_impl is not None
        # the options say what the mode says, and force the layout
        by_mode = torch._TorchCompileInductorWrapper(mode, None, None).config
        assert by_mode | {"force_layout_optimization": True} == {
            **list_mode_options(mode),
            "force_layout_optimization": True,
        }
    with pytest.raises(RuntimeError, match="Unexpected optimization option"):
        nn.Conv2d(4, 2, 3).compile(options={"force_layout_optimisation": True})
