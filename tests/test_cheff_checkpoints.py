"""Checkpoint I/O: both official containers, our format, and files that must be refused.

The official-format files here are written the way the official code writes them (a Lightning
dict with ``state_dict``, extras included), from a tiny random autoencoder.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import typing
import zipfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from cheff import PRESETS, AutoencoderKL, CheckpointError, load_autoencoder
from cheff.checkpoints import (
    Placeholder,
    convert,
    describe,
    read_checkpoint,
    safe_torch_load,
    save_autoencoder,
)


@pytest.fixture(scope="module")
def tiny() -> AutoencoderKL:
    torch.manual_seed(0)
    return AutoencoderKL(PRESETS["tiny"].autoencoder).eval()


def lightning_file(path: Path, state: dict, **top_level: object) -> Path:
    torch.save({"state_dict": state, "epoch": 3, "global_step": 100, **top_level}, path)
    return path


class RunsCode:
    """Unpickling this calls ``os.system``: what a malicious checkpoint would do."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


@pytest.mark.parametrize("zip_format", [True, False], ids=["zip", "legacy"])
def test_a_checkpoint_that_pickles_code_is_refused_unrun(tiny, tmp_path, zip_format) -> None:
    marker = tmp_path / "code-ran"
    path = tmp_path / "evil.ckpt"
    torch.save(
        {"state_dict": tiny.state_dict(), "callbacks": RunsCode(marker)},
        path,
        _use_new_zipfile_serialization=zip_format,
    )
    with pytest.raises(CheckpointError, match="refused") as error:
        load_autoencoder(path)
    assert "system" in str(error.value) and str(path) in str(error.value)
    assert not marker.exists()


@dataclass
class _Metadata:
    ref_type: object = typing.Any


class _ConfigObject:
    """Like an OmegaConf ``DictConfig`` in ``hyper_parameters``: a class of a package cheff
    does not depend on, pickled with a state of nested objects; rebuilding it for real would
    run its code (here: touch a marker)."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker
        self.content = {"lr": 1e-4, "meta": _Metadata(), "args": argparse.Namespace(steps=5)}
        # builtins a legacy file names without their module ("GLOBAL dict")
        self.types = {"object_type": dict, "frozen": frozenset({1, 2}), "span": range(3)}

    def __setstate__(self, state: dict) -> None:
        Path(state["marker"]).touch()
        self.__dict__.update(state)


@pytest.mark.parametrize("zip_format", [True, False], ids=["zip", "legacy"])
def test_foreign_objects_beside_the_weights_become_placeholders(
    tiny, tmp_path, zip_format, caplog
) -> None:
    """FORMAT.md 1: hyper-parameters pickled as OmegaConf or argparse objects must not stop
    the weights from loading, nor run those classes' code."""
    marker = tmp_path / "setstate-ran"
    path = lightning_file(
        tmp_path / "hp.ckpt",
        dict(tiny.state_dict()),
        hyper_parameters={"config": _ConfigObject(marker), "seed": np.int64(3)},
    )
    if not zip_format:
        torch.save(torch.load(path, weights_only=False), path, _use_new_zipfile_serialization=False)
    marker.unlink(missing_ok=True)
    with caplog.at_level(logging.WARNING, logger="cheff.checkpoints"):
        model = load_autoencoder(path)
    assert not marker.exists()
    assert all(
        torch.equal(a, b) for a, b in zip(model.state_dict().values(), tiny.state_dict().values())
    )
    warned = " ".join(r.getMessage() for r in caplog.records)
    for name in ("_ConfigObject", "_Metadata", "argparse.Namespace", "typing.Any"):
        assert name in warned
    hp = safe_torch_load(path)["hyper_parameters"]
    assert isinstance(hp["config"], Placeholder) and hp["config"].name.endswith("_ConfigObject")
    assert hp["config"].state["content"]["lr"] == 1e-4 and hp["seed"] == 3


@pytest.mark.parametrize("zip_format", [True, False], ids=["zip", "legacy"])
def test_a_defaultdict_beside_the_weights_is_read_as_a_dict(tiny, tmp_path, zip_format) -> None:
    """Weights-only loading fills plain dicts only: a ``collections.defaultdict`` (a callback's
    or a loop's state, say) refused the whole file before; now it is a dict with its items."""
    import collections

    state = collections.defaultdict(list, {"seen": [1, 2]})
    state["nested"] = collections.defaultdict(int, {"steps": 5})
    path = tmp_path / "dd.ckpt"
    torch.save(
        {"state_dict": tiny.state_dict(), "loops": {"fit_loop": state}},
        path,
        _use_new_zipfile_serialization=zip_format,
    )
    model = load_autoencoder(path)
    assert all(
        torch.equal(a, b) for a, b in zip(model.state_dict().values(), tiny.state_dict().values())
    )
    loaded = safe_torch_load(path)["loops"]["fit_loop"]
    assert type(loaded) is dict and type(loaded["nested"]) is dict
    assert loaded == {"seen": [1, 2], "nested": {"steps": 5}}


class _OddDefaultdict:
    """Pickles as ``collections.defaultdict`` called with arguments no dict takes."""

    def __init__(self, *args: object) -> None:
        self.args = args

    def __reduce__(self):
        import collections

        return (collections.defaultdict, self.args)


@pytest.mark.parametrize("args", [(None, 5), (None, {}, {}), (None, [1])], ids=str)
def test_a_defaultdict_called_with_odd_arguments_is_a_checkpoint_error(
    tiny, tmp_path, args
) -> None:
    """A crafted file's arguments to an allowed global end in a CheckpointError naming the
    file (the CLI reports those), not a bare TypeError."""
    path = tmp_path / "odd.ckpt"
    torch.save({"state_dict": tiny.state_dict(), "loops": _OddDefaultdict(*args)}, path)
    with pytest.raises(CheckpointError, match="not a readable PyTorch checkpoint") as error:
        safe_torch_load(path)
    assert str(path) in str(error.value)


class _CallsEval:
    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (eval, (f"__import__('pathlib').Path({str(self.marker)!r}).touch()",))


class _CallsSubprocess:
    def __reduce__(self):  # pickled under its Python 2 name, commands.call
        import subprocess

        return (subprocess.call, (["true"],))


@pytest.mark.parametrize("zip_format", [True, False], ids=["zip", "legacy"])
def test_a_file_that_pickles_eval_is_refused_not_placeheld(tiny, tmp_path, zip_format) -> None:
    marker = tmp_path / "code-ran"
    path = tmp_path / "evil.ckpt"
    content = {"state_dict": dict(tiny.state_dict()), "x": _CallsEval(marker)}
    torch.save(content, path, _use_new_zipfile_serialization=zip_format)
    with pytest.raises(CheckpointError, match="refused: the file pickles builtins.eval"):
        load_autoencoder(path)
    assert not marker.exists()
    content["x"] = _CallsSubprocess()
    torch.save(content, path, _use_new_zipfile_serialization=zip_format)
    with pytest.raises(CheckpointError, match=r"refused: the file pickles (commands|subprocess)"):
        load_autoencoder(path)


def numpy1_names(path: Path) -> Path:
    """The file as numpy 1.x would have pickled it: numpy 2 renamed ``numpy.core`` to
    ``numpy._core``, and the released (torch 1.11 era) files carry the old name."""
    old, new = b"numpy._core.multiarray", b"numpy.core.multiarray"
    if not zipfile.is_zipfile(path):
        data = path.read_bytes()
        assert old in data
        path.write_bytes(data.replace(old, new))  # GLOBAL names are newline-terminated text
        return path
    renamed = path.with_suffix(".numpy1")
    with zipfile.ZipFile(path) as source, zipfile.ZipFile(renamed, "w") as target:
        for info in source.infolist():
            data = source.read(info.filename)
            if info.filename.endswith("data.pkl"):
                assert old in data
                data = data.replace(old, new)
            target.writestr(info, data)
    return renamed.replace(path)


@pytest.mark.parametrize("numpy1", [False, True], ids=["numpy2", "numpy1"])
@pytest.mark.parametrize("zip_format", [True, False], ids=["zip", "legacy"])
def test_numpy_scalars_in_a_lightning_file_are_allowed(tiny, tmp_path, zip_format, numpy1) -> None:
    """Lightning stores e.g. a monitored metric as a numpy scalar; that is data, not code, in
    either container and under either numpy's names."""
    path = tmp_path / "ae.ckpt"
    torch.save(
        {
            "state_dict": tiny.state_dict(),
            "callbacks": {"best_model_score": np.float64(0.25), "dtype": np.dtype("float32")},
        },
        path,
        _use_new_zipfile_serialization=zip_format,
    )
    if numpy1:
        numpy1_names(path)
    loaded = load_autoencoder(path)
    assert all(
        torch.equal(a, b) for a, b in zip(tiny.state_dict().values(), loaded.state_dict().values())
    )
    assert safe_torch_load(path)["callbacks"]["best_model_score"] == 0.25


def test_a_missing_key_is_named(tiny, tmp_path) -> None:
    state = dict(tiny.state_dict())
    del state["decoder.conv_out.bias"], state["encoder.mid.attn_1.q.weight"]
    with pytest.raises(CheckpointError, match="2 missing keys") as error:
        load_autoencoder(lightning_file(tmp_path / "ae.ckpt", state))
    assert "decoder.conv_out.bias" in str(error.value)
    assert "encoder.mid.attn_1.q.weight" in str(error.value)


def test_a_misshaped_key_is_named_with_both_shapes(tiny, tmp_path) -> None:
    state = dict(tiny.state_dict())
    state["decoder.mid.block_1.conv1.weight"] = torch.zeros(64, 64, 1, 1)
    with pytest.raises(CheckpointError, match="another shape") as error:
        load_autoencoder(lightning_file(tmp_path / "ae.ckpt", state))
    assert "decoder.mid.block_1.conv1.weight (file (64, 64, 1, 1), model (64, 64, 3, 3))" in str(
        error.value
    )


def test_loss_keys_are_ignored_other_extras_are_reported(tiny, tmp_path, caplog) -> None:
    state = dict(tiny.state_dict())
    state["loss.logvar"] = torch.zeros(())
    state["loss.perceptual_loss.net.slice1.0.weight"] = torch.zeros(64, 3, 3, 3)
    with caplog.at_level(logging.WARNING):
        load_autoencoder(lightning_file(tmp_path / "a.ckpt", state))
    assert "unexpected" not in caplog.text
    state["encoder.something_new.weight"] = torch.zeros(1)
    with caplog.at_level(logging.WARNING):
        load_autoencoder(lightning_file(tmp_path / "b.ckpt", state))
    assert "encoder.something_new.weight" in caplog.text


def test_an_explicit_config_that_does_not_fit_is_an_error(tiny, tmp_path) -> None:
    path = lightning_file(tmp_path / "ae.ckpt", tiny.state_dict())
    with pytest.raises(CheckpointError, match="missing keys"):
        load_autoencoder(path, PRESETS["paper"].autoencoder)


def test_our_format_round_trips_and_says_what_it_is(tiny, tmp_path) -> None:
    path = save_autoencoder(tiny, tmp_path / "ae.safetensors", note="test")
    info = describe(path)
    assert info["container"] == "cheff" and info["kind"] == "autoencoder"
    assert info["config"] == json.loads(json.dumps(tiny.config.to_dict()))
    assert info["metadata"]["note"] == "test"
    loaded = load_autoencoder(path)
    assert loaded.config == tiny.config
    x = torch.rand(1, 3, 8, 8) * 2 - 1
    with torch.no_grad():
        assert torch.equal(loaded.reconstruct(x), tiny.reconstruct(x))
    assert not list(tmp_path.glob("*.tmp"))


def test_convert_checks_the_weights_on_the_way(tiny, tmp_path) -> None:
    source = lightning_file(tmp_path / "ae.ckpt", dict(tiny.state_dict()))
    target = convert(source, tmp_path / "out" / "ae.safetensors")
    assert read_checkpoint(target).metadata["converted_from"] == "ae.ckpt"
    with pytest.raises(CheckpointError, match="known kinds"):
        convert(source, tmp_path / "x.safetensors", kind="vae")


def test_convert_unpickles_the_file_once(tiny, tmp_path, monkeypatch) -> None:
    """A released LDM pickle is several GB: ``--kind auto`` must not unpickle it twice (once
    for the kind, once for the weights)."""
    from typer.testing import CliRunner

    import cheff.checkpoints as module
    from cli.cheff_cli import app

    source = lightning_file(tmp_path / "ae.ckpt", dict(tiny.state_dict()))
    loads = []
    real = module.safe_torch_load
    monkeypatch.setattr(module, "safe_torch_load", lambda path: loads.append(path) or real(path))
    convert(source, tmp_path / "a.safetensors")
    assert loads == [source]
    result = CliRunner().invoke(app, ["convert", str(source), str(tmp_path / "b.safetensors")])
    assert result.exit_code == 0, result.output
    assert loads == [source, source]
    assert read_checkpoint(tmp_path / "b.safetensors").metadata["converted_from"] == "ae.ckpt"


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (b"", "not a readable PyTorch checkpoint"),
        (b"PK\x03\x04 truncated zip", "not a readable PyTorch checkpoint"),
        (b"\x10\x00\x00\x00\x00\x00\x00\x00{broken header", "not a readable safetensors"),
        (b"hello, not a checkpoint\n", "not a readable PyTorch checkpoint"),
        (b"<!DOCTYPE html><html>Sign in</html>", "not a readable PyTorch checkpoint"),
    ],
    ids=["empty", "truncated-zip", "broken-safetensors", "text", "html"],
)
def test_unreadable_files_are_errors_naming_the_file(tmp_path, content, message) -> None:
    path = tmp_path / "bad.pt"
    path.write_bytes(content)
    with pytest.raises(CheckpointError, match=message) as error:
        load_autoencoder(path)
    assert str(path) in str(error.value)


def test_files_that_hold_something_else_are_errors(tiny, tmp_path) -> None:
    with pytest.raises(CheckpointError, match="no such checkpoint"):
        load_autoencoder(tmp_path / "absent.pt")
    plain = tmp_path / "plain.safetensors"
    save_file({"w": torch.zeros(2)}, str(plain))
    with pytest.raises(CheckpointError, match="without cheff metadata"):
        load_autoencoder(plain)
    sr = tmp_path / "sr.pt"
    torch.save({"model": {"init_conv.weight": torch.zeros(10, 2, 7, 7)}, "epoch": 1}, sr)
    assert read_checkpoint(sr).kind == "sr"
    with pytest.raises(CheckpointError, match="no autoencoder in this sr-training file"):
        load_autoencoder(sr)
    odd = tmp_path / "odd.pt"
    torch.save({"weights": {}}, odd)
    with pytest.raises(CheckpointError, match="no 'state_dict'"):
        load_autoencoder(odd)


def test_cli_convert_and_inspect(tiny, tmp_path) -> None:
    from typer.testing import CliRunner

    from cli.cheff_cli import app

    runner = CliRunner()
    source = lightning_file(tmp_path / "ae.ckpt", dict(tiny.state_dict()))
    target = tmp_path / "ae.safetensors"
    result = runner.invoke(app, ["convert", str(source), str(target)])
    assert result.exit_code == 0 and target.is_file(), result.output
    result = runner.invoke(app, ["inspect", str(source), "--json"])
    assert result.exit_code == 0, result.output
    info = json.loads(result.stdout)
    assert info["container"] == "lightning" and info["kind"] == "autoencoder"
    assert info["metadata"] == {"epoch": 3, "global_step": 100}
    result = runner.invoke(app, ["inspect", str(target)])
    assert result.exit_code == 0 and "autoencoder (cheff file)" in result.stdout
    assert "converted_from: ae.ckpt" in result.stdout
    bad = tmp_path / "bad.pt"
    bad.write_bytes(b"not a checkpoint")
    for command in (["inspect", str(bad)], ["convert", str(bad), str(tmp_path / "x")]):
        result = runner.invoke(app, command)
        assert result.exit_code == 2 and "not a readable PyTorch checkpoint" in result.output
    unknown = lightning_file(tmp_path / "unknown.ckpt", {"head.weight": torch.zeros(2)})
    result = runner.invoke(app, ["convert", str(unknown), str(tmp_path / "y")])
    assert result.exit_code == 2 and "cannot tell which model" in result.output
    assert "give the kind" in result.output


def test_loaders_are_typed_with_the_model_they_return(tiny, tmp_path) -> None:
    """``load_autoencoder`` / ``load_sr`` said ``nn.Module``, hiding ``encode``, ``eps``, ...
    from type checkers; the annotations (TYPE_CHECKING imports) name what they return."""
    import typing

    import cheff.checkpoints as module
    from cheff.checkpoints import load_sr, save_sr
    from cheff.models.sr import SuperResolution
    from cheff.models.sr_unet import SRUNet, SRUNetConfig

    names = vars(module) | {"AutoencoderKL": AutoencoderKL, "SuperResolution": SuperResolution}
    sr = SuperResolution(SRUNet(SRUNetConfig(dim=8, dim_mults=(1, 1), attention_layers=0)))
    files = {
        load_autoencoder: save_autoencoder(tiny, tmp_path / "ae.safetensors"),
        load_sr: save_sr(sr, tmp_path / "sr.safetensors"),
    }
    for loader, path in files.items():
        returned = typing.get_type_hints(loader, names)["return"]
        assert returned in (AutoencoderKL, SuperResolution), loader.__name__
        assert isinstance(loader(path), returned), loader.__name__


def test_an_official_file_with_another_stored_schedule_is_sampled_with_it(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """The official code samples with the schedule buffers it loads. An official file that
    stores another schedule than the paper's (an early official config trained with
    linear_end 0.0195) is sampled with its own, as the official code would (with a warning),
    and keeps it through ``cheff convert``; a file with the paper's keeps the recomputed one
    (the parity fixtures are matched with it)."""
    import logging

    from cheff_parity import fixture

    from cheff import Pipeline
    from cheff.checkpoints import convert, load_ldm
    from cheff.diffusion import NoiseSchedule
    from cheff.diffusion.schedules import ldm_linear_betas

    official = next(fixture("ldm_uncond").glob("*.pt"))
    with caplog.at_level(logging.WARNING, logger="cheff.checkpoints"):
        plain = load_ldm(official, num_head_channels=16)
    assert "noise schedule" not in caplog.text  # the fixture stores the paper's
    assert plain.schedule is None
    paper = NoiseSchedule.ldm()
    assert torch.equal(Pipeline(plain, device="cpu").schedule.alphas_cumprod, paper.alphas_cumprod)

    contents = torch.load(official, map_location="cpu", weights_only=True)
    betas = ldm_linear_betas(1000, 0.0015, 0.0195)
    stored = torch.cumprod(1 - betas, 0).float()
    contents["state_dict"]["alphas_cumprod"] = stored
    contents["state_dict"]["betas"] = betas.float()
    torch.save(contents, tmp_path / "early.pt")
    with caplog.at_level(logging.WARNING, logger="cheff.checkpoints"):
        early = load_ldm(tmp_path / "early.pt", num_head_channels=16)
    assert "stores another noise schedule than the paper's" in caplog.text
    assert "sampling uses the file's" in caplog.text
    pipe = Pipeline(early, device="cpu")
    assert torch.equal(pipe.alphas_cumprod, stored)  # the official code's float32 buffer
    assert torch.equal(pipe.schedule.betas, betas.float().double())
    assert pipe.schedule.ddim_offset == paper.ddim_offset
    ours = convert(tmp_path / "early.pt", tmp_path / "early.safetensors", kind="ldm",
                   num_head_channels=16)  # fmt: skip
    kept = load_ldm(ours).schedule
    assert torch.equal(kept.alphas_cumprod, early.schedule.alphas_cumprod)
    assert torch.equal(kept.betas, early.schedule.betas)
    given = NoiseSchedule.ldm(timesteps=500)  # an explicit schedule= still wins
    assert Pipeline(early, device="cpu", schedule=given).schedule is given

    del contents["state_dict"]["betas"]  # no betas buffer: derived from alphas_cumprod
    torch.save(contents, tmp_path / "no-betas.pt")
    derived = load_ldm(tmp_path / "no-betas.pt", num_head_channels=16).schedule
    assert torch.equal(derived.alphas_cumprod, stored.double())
    torch.testing.assert_close(derived.betas, betas, rtol=1e-4, atol=0)


@pytest.mark.parametrize(("name", "official_scale"), [("ldm_uncond", 1.0), ("ldm_t2i", 0.18215)])
def test_a_scale_factor_entry_in_an_official_file_is_dropped_as_officially(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, name: str, official_scale: float
) -> None:
    """A Lightning run with scale_by_std stores a ``scale_factor`` entry; the official wrapper
    builds its model without that buffer, so its strict=False load drops it and samples with
    the model's own. cheff does the same, says so, and takes an explicit one."""
    from cheff_parity import fixture

    from cheff.checkpoints import load_ldm

    official = next(fixture(name).glob("*.pt"))
    contents = torch.load(official, map_location="cpu", weights_only=True)
    contents["state_dict"]["scale_factor"] = torch.tensor(0.5)
    torch.save(contents, tmp_path / "scaled.pt")
    with caplog.at_level(logging.WARNING, logger="cheff.checkpoints"):
        model = load_ldm(tmp_path / "scaled.pt")
    assert model.scale_factor == official_scale
    assert "scale_factor entry (0.5) is not used" in caplog.text
    assert load_ldm(tmp_path / "scaled.pt", scale_factor=0.5).scale_factor == 0.5
