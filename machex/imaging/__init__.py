"""Pixels: decode -> intensity rule -> resize and crop -> encode. Knows nothing of CSVs."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from machex.imaging.compat import COMPAT_MODES, machex_v1_pixels
from machex.imaging.decode import DEFAULT_MAX_PIXELS, Decoded, decode_image
from machex.imaging.encode import Encoding, encode
from machex.imaging.errors import DecompressionBombError, ImageDecodeError
from machex.imaging.geometry import (
    OUTPUT_SIZE,
    CropBox,
    MappedBox,
    crop_box_for,
    map_box,
    resample_window,
    resize_and_crop,
)
from machex.imaging.intensity import Intensity, IntensityRange, intensity_range
from machex.imaging.png import PngDecoder


@dataclass(frozen=True)
class PixelOptions:
    """Everything about the pixels that changes the output bytes.

    ``compat="machex-v1"`` replaces the whole pipeline by the original MaCheX one (RGB JPEG
    q95); it then requires ``encoding=jpeg`` and ``intensity=raw``. ``png_decoder`` is the
    exception to the rule above: it changes the speed, never the bytes.
    """

    encoding: Encoding = Encoding.jpeg
    image_size: int = OUTPUT_SIZE
    max_pixels: int = DEFAULT_MAX_PIXELS
    intensity: Intensity = Intensity.raw
    compat: str | None = None
    png_decoder: PngDecoder = PngDecoder.auto

    def __post_init__(self) -> None:
        if self.png_decoder is PngDecoder.imagecodecs:  # refused here if missing, not per image
            self.png_decoder.use_imagecodecs()
        if self.compat is None:
            return
        if self.compat not in COMPAT_MODES:
            raise ValueError(f"unknown compat mode {self.compat!r}; choose one of {COMPAT_MODES}")
        if self.encoding is not Encoding.jpeg or self.intensity is not Intensity.raw:
            raise ValueError(
                f"--compat {self.compat} fixes the pixels (RGB JPEG q95, 16-bit >> 8): "
                "leave --encoding and --intensity at their defaults"
            )


@dataclass(frozen=True)
class ProcessedImage:
    """The encoded output plus what is needed to map coordinates back to the source.

    ``intensity`` names the rule that was applied (``window`` falls back to ``raw`` for a
    file without a window; ``machex-v1`` for the compat pipeline)."""

    data: bytes
    crop_box: CropBox
    orig_width: int
    orig_height: int
    bits: int
    intensity: str = Intensity.raw.value
    header: dict[str, str | int | float] = field(default_factory=dict)  # DICOM allow-list


def process_image(
    path: Path,
    options: PixelOptions = PixelOptions(),
    *,
    window: tuple[float, float] | None = None,
) -> ProcessedImage:
    """Decode ``path``, map its intensities, resize the short edge to ``options.image_size``,
    centre-crop, encode. ``window`` is the source's (centre, width), if it has one."""
    if options.compat is not None:
        data, box, width, height, bits, header = machex_v1_pixels(
            path, options.image_size, max_pixels=options.max_pixels
        )
        return ProcessedImage(data, box, width, height, bits, options.compat, header)
    windowing = options.intensity is Intensity.window
    decoded = decode_image(
        path,
        max_pixels=options.max_pixels,
        min_short_edge=options.image_size,
        voi=windowing,
        png_decoder=options.png_decoder,
    )
    box = crop_box_for(decoded.width, decoded.height, options.image_size)
    if decoded.windowed:  # the file's VOI LUT was applied in decoding: map its range as is
        span = IntensityRange(0.0, float(2**decoded.bits - 1), Intensity.window)
    else:  # the file's own window before one the metadata gives
        window = decoded.window or window
        span = intensity_range(decoded.image, decoded.bits, options.intensity, window)
    pixels = resample_window(
        decoded.image,
        box.reduced(decoded.reduction),
        target_max=options.encoding.max_value,
        source_min=span.low,
        source_max=span.high,
        clip_source=span.mode is Intensity.window,
    )
    return ProcessedImage(
        encode(pixels, options.encoding),
        box,
        decoded.width,
        decoded.height,
        decoded.bits,
        span.mode.value,
        decoded.header,
    )


__all__ = [
    "COMPAT_MODES",
    "DEFAULT_MAX_PIXELS",
    "OUTPUT_SIZE",
    "CropBox",
    "DecompressionBombError",
    "Decoded",
    "Encoding",
    "ImageDecodeError",
    "Intensity",
    "MappedBox",
    "PixelOptions",
    "PngDecoder",
    "ProcessedImage",
    "crop_box_for",
    "decode_image",
    "encode",
    "map_box",
    "process_image",
    "resample_window",
    "resize_and_crop",
]
