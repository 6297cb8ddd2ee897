"""Pixel modes: --compat machex-v1 against the baseline in benchmarks/, the intensity rules,
and the JPEG reduced-scale decode against a full decode."""

from __future__ import annotations

import io
import json
import sys
import tarfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from test_build import chexpert_args
from typer.testing import CliRunner

from cli.machex_cli import app
from machex import load_manifest
from machex.build import BuildOptions, build_source, read_build_file
from machex.imaging import (
    Encoding,
    Intensity,
    PixelOptions,
    crop_box_for,
    decode_image,
    process_image,
    resize_and_crop,
)
from machex.sample import synthetic_radiograph
from machex.shards import read_member

sys.path.insert(0, str(Path(__file__).parents[1] / "benchmarks"))
from machex_v1_baseline import machex_v1  # noqa: E402

COMPAT = PixelOptions(compat="machex-v1")


def _inputs(tmp_path: Path) -> list[Path]:
    """One of each kind the sources ship: 8-bit PNG 1024, 12-bit-in-16 PNG landscape,
    grayscale JPEG portrait (odd sizes), RGB JPEG, small JPEG."""
    rng = np.random.default_rng(7)
    paths = []
    png8 = tmp_path / "nih.png"
    Image.fromarray(synthetic_radiograph(rng, 1024, 1024)).save(png8)
    png16 = tmp_path / "padchest.png"
    deep = synthetic_radiograph(rng, 1531, 1250, bits=12)
    Image.frombytes("I;16", (1531, 1250), deep.astype("<u2").tobytes()).save(png16)
    portrait = tmp_path / "mimic.jpg"
    Image.fromarray(synthetic_radiograph(rng, 1257, 1533)).save(portrait, quality=95)
    rgb = tmp_path / "rgb.jpg"
    gray = synthetic_radiograph(rng, 1036, 885)
    Image.fromarray(np.stack([gray, gray // 2 + 60, gray], axis=-1)).save(rgb, quality=90)
    small = tmp_path / "chexpert-small.jpg"
    Image.fromarray(synthetic_radiograph(rng, 320, 389)).save(small, quality=90)
    paths += [png8, png16, portrait, rgb, small]
    return paths


def test_compat_matches_the_original_pipeline_byte_for_byte(tmp_path: Path) -> None:
    for path in _inputs(tmp_path):
        ours = process_image(path, COMPAT)
        expected = machex_v1(path)
        assert ours.data == expected, path.name
        with Image.open(io.BytesIO(ours.data)) as image:
            assert image.mode == "RGB" and image.size == (1024, 1024)
        assert ours.intensity == "machex-v1"


def test_compat_matches_on_real_files(real_images: Path) -> None:
    for name in ("00000001_000.png", "16747_3_1.jpg"):
        ours = process_image(real_images / name, COMPAT)
        assert ours.data == machex_v1(real_images / name), name


def test_compat_crop_box_maps_to_the_baseline_crop(tmp_path: Path) -> None:
    path = _inputs(tmp_path)[2]  # 1257 x 1533 portrait
    box = process_image(path, COMPAT).crop_box
    assert box.x0 == 0 and box.x1 == pytest.approx(1257)
    resized_h = int(1024 * 1533 / 1257)
    top = int(round((resized_h - 1024) / 2.0))
    assert box.y0 == pytest.approx(top * 1533 / resized_h)


def test_compat_rejects_other_pixel_options() -> None:
    with pytest.raises(ValueError, match="--encoding"):
        PixelOptions(compat="machex-v1", encoding=Encoding.png)
    with pytest.raises(ValueError, match="unknown compat"):
        PixelOptions(compat="machex-v9")


def test_minmax_stretches_each_image(tmp_path: Path) -> None:
    flat = np.full((1024, 1024), 100, np.uint8)
    flat[:, 512:] = 140
    path = tmp_path / "low-contrast.png"
    Image.fromarray(flat).save(path)
    raw = process_image(path, PixelOptions(encoding=Encoding.png))
    stretched = process_image(path, PixelOptions(encoding=Encoding.png, intensity=Intensity.minmax))
    assert set(np.unique(_decode(raw.data))) == {100, 140}
    assert set(np.unique(_decode(stretched.data))) == {0, 255}
    assert stretched.intensity == "minmax"


def test_window_uses_the_given_window_or_falls_back_to_raw(tmp_path: Path) -> None:
    ramp = (np.arange(1024 * 1024) % 4096).astype(np.uint16).reshape(1024, 1024)
    path = tmp_path / "ramp.png"
    Image.frombytes("I;16", (1024, 1024), ramp.astype("<u2").tobytes()).save(path)
    options = PixelOptions(encoding=Encoding.png, intensity=Intensity.window)
    windowed = process_image(path, options, window=(2048.0, 1024.0))
    pixels = _decode(windowed.data).astype(int)
    expected = np.clip(np.rint((ramp - 1536.0) * 255 / 1024), 0, 255)
    assert np.array_equal(pixels, expected) and windowed.intensity == "window"
    fallback = process_image(path, options)
    assert fallback.intensity == "raw"
    assert np.array_equal(
        _decode(fallback.data),
        _decode(process_image(path, PixelOptions(encoding=Encoding.png)).data),
    )


def test_reduced_scale_jpeg_decode_matches_a_full_decode(tmp_path: Path) -> None:
    """The DCT-scaled decode must land on the same window: compare with a full decode."""
    rng = np.random.default_rng(3)
    image = synthetic_radiograph(rng, 2544, 3056)
    image = np.clip(image + rng.normal(0, 2, image.shape), 0, 255).astype(np.uint8)
    path = tmp_path / "large.jpg"
    Image.fromarray(image).save(path, quality=95)
    fast = decode_image(path, min_short_edge=1024)
    assert fast.reduction == 2 and (fast.width, fast.height) == (2544, 3056)
    assert fast.pixels.shape == (1528, 1272)
    full = decode_image(path)
    box = crop_box_for(2544, 3056)
    ours = _decode(process_image(path, PixelOptions(encoding=Encoding.png)).data)
    reference = resize_and_crop(full.pixels, box)
    difference = ours.astype(float) - reference.astype(float)
    psnr = 10 * np.log10(255**2 / np.mean(difference**2))
    assert psnr > 40, psnr
    shifted = np.roll(reference, 1, axis=1).astype(float)  # one pixel off would be far worse
    assert psnr > 10 * np.log10(255**2 / np.mean((ours - shifted) ** 2)) + 3


def test_build_records_pixel_modes(sample_roots_pristine, tmp_path: Path) -> None:
    out = tmp_path / "out"
    root = sample_roots_pristine["chexpert"]
    build_source("chexpert", root, out, BuildOptions(pixels=COMPAT, workers=1))
    options = read_build_file(out)["sources"]["chexpert"]["options"]
    assert options["pixels"]["compat"] == "machex-v1"
    assert options["fingerprint"]["compat"] == "machex-v1"
    row = load_manifest(out, "images").iloc[0]
    data = read_member(out / row["shard"], row["offset"], row["size"])
    with Image.open(io.BytesIO(data)) as image:
        assert image.mode == "RGB"
    with tarfile.open(out / row["shard"]) as tar:
        meta = json.loads(tar.extractfile(f"{row['key']}.json").read())
    assert meta["compat"] == "machex-v1" and meta["intensity"] == "machex-v1"
    args = chexpert_args(root, tmp_path / "o2", "--compat", "machex-v1", "--encoding", "png")
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 2 and "--encoding" in result.output


def _decode(data: bytes) -> np.ndarray:
    with Image.open(io.BytesIO(data)) as image:
        return np.asarray(image)
