"""DICOM -> one channel of calibrated pixels, with nothing of the header but an allow-list.

Order of operations (the foundation rule, extended to DICOM):

1. refuse what is not one grayscale radiograph: several frames, colour, 1- or 32-bit
   samples, pixel data whose length does not match Rows x Columns;
2. decode with ``BitsStored`` set to ``BitsAllocated``: never trust ``BitsStored`` (some
   VinDr-CXR files misstate it, and a decoder then masks real bits away);
3. apply the modality LUT (rescale slope and intercept, or a LUT); a negative minimum is
   moved to 0 so that the raw rule below has a range to work with;
4. ``b`` = the smallest bit depth (>= 8) covering the real maximum;
5. MONOCHROME1 is inverted within that range, ``x -> (2**b - 1) - x``: a MONOCHROME1 file and
   its MONOCHROME2 twin give one picture.

With ``voi=True`` (``--intensity window``) a VOI LUT sequence is applied in decoding; a
window centre/width is passed on (mirrored with the inversion) for the resampler to clip to.
"""

from __future__ import annotations

import gzip
import io
import logging
import struct
import threading
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from PIL import Image

from machex.imaging.errors import DecompressionBombError, ImageDecodeError
from machex.imaging.intensity import bits_for_peak

if TYPE_CHECKING:
    from pydicom.dataset import FileDataset

#: File names the DICOM decoder takes (lower case); anything else goes to Pillow.
DICOM_SUFFIXES = (".dcm", ".dicom", ".dcm.gz", ".dicom.gz")

#: The only header values that may leave the decoder: DICOM keyword -> output name. Nothing
#: that identifies a person, an institution or a device; ids come from the dataset's own
#: published metadata, never from the header.
HEADER_ALLOW_LIST: dict[str, str] = {
    "ViewPosition": "view_position",
    "PatientSex": "sex",
    "PatientAge": "age",
    "Rows": "rows",
    "Columns": "columns",
    "PhotometricInterpretation": "photometric_interpretation",
    "BitsAllocated": "bits_allocated",
    "BitsStored": "bits_stored",
}

_AGE_UNITS = {"Y": 1.0, "M": 1 / 12, "W": 7 / 365.25, "D": 1 / 365.25}


def is_dicom(path: Path) -> bool:
    """By name: ``.dcm``, ``.dicom`` and their ``.gz`` forms."""
    return path.name.lower().endswith(DICOM_SUFFIXES)


@dataclass(frozen=True)
class DicomPixels:
    """What ``read_dicom`` hands to the pipeline.

    ``image`` is mode ``L`` (8-bit) or ``F`` (whole values 0..2**bits-1), already in
    MONOCHROME2 sense. ``window`` is the file's (centre, width) in those values when a
    window was asked for and the file has one; ``windowed`` says a VOI LUT was applied in
    decoding. ``header`` holds only ``HEADER_ALLOW_LIST`` fields.
    """

    image: Image.Image
    bits: int
    width: int
    height: int
    window: tuple[float, float] | None
    windowed: bool
    header: dict[str, str | int | float]


def read_dicom(path: Path, *, max_pixels: int, voi: bool = False) -> DicomPixels:
    """Decode one DICOM file; raise ``ImageDecodeError`` with the reason."""
    from pydicom.pixels import apply_modality_lut
    from pydicom.uid import RLELossless

    dataset = open_dicom(path)
    check_header(dataset, path, max_pixels)
    header = allowed_header(dataset)  # before BitsStored is overridden: as the file says
    syntax = _transfer_syntax(dataset, path)
    if not syntax.is_compressed:
        _check_native_length(dataset, path)
    signed = int(dataset.get("PixelRepresentation", 0) or 0) == 1
    if (not syntax.is_compressed or syntax == RLELossless) and not signed:
        # Native and RLE data do not state their precision: read every allocated bit, or
        # pydicom masks real bits away. Signed data keeps BitsStored: its sign bit is HighBit
        # (data not sign-extended above it would read as large positive values).
        dataset.BitsStored = dataset.BitsAllocated
        dataset.HighBit = dataset.BitsAllocated - 1
    elif syntax in JPEG_PROCESS_SYNTAXES:
        # The stream states its precision (SOF), but pydicom masks the decoded values to the
        # header's BitsStored: a header that understates it would lose real bits.
        precision = _jpeg_precision(dataset)
        if precision is not None and int(dataset.BitsStored) < precision <= int(
            dataset.BitsAllocated
        ):
            dataset.BitsStored = precision
            dataset.HighBit = precision - 1
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            stored = dataset.pixel_array
    except Exception as exc:  # noqa: BLE001 - every decoder failure is this file's failure
        raise ImageDecodeError(
            f"{path.name}: pixel data does not decode as the header says: {exc}"
        ) from None
    rows, columns = int(dataset.Rows), int(dataset.Columns)
    if stored.shape != (rows, columns):
        raise ImageDecodeError(
            f"{path.name}: decoded pixels have shape {stored.shape}, the header says "
            f"{rows}x{columns}"
        )

    # Integer data stays integer (and fast) unless a rescale or a LUT makes it otherwise.
    values = stored
    if _has_modality_transform(dataset):
        values = np.asarray(apply_modality_lut(stored, dataset), dtype=np.float64)
    windowed = voi and bool(dataset.get("VOILUTSequence"))  # an empty one: no LUT
    if windowed:  # output 0 .. 2**n - 1, n the LUT's declared depth
        values = _apply_voi_table(values, dataset, path)
    low = float(values.min())
    if low < 0:
        values = values - low if values.dtype.kind == "f" else values.astype(np.int32) - int(low)
    peak = float(values.max())
    bits = bits_for_peak(peak)
    if windowed:
        bits = max(bits, _lut_bits(dataset))
    top = 2**bits - 1
    monochrome1 = str(dataset.PhotometricInterpretation).strip() == "MONOCHROME1"
    if monochrome1:
        values = top - values  # top >= peak: no wrap-around in an unsigned type

    window = None
    if voi and not windowed:
        window = _window(dataset, shift=min(low, 0.0))
        if window is not None and monochrome1:
            window = (top - window[0], window[1])
    return DicomPixels(_as_image(values, bits), bits, columns, rows, window, windowed, header)


#: Transfer syntaxes of the JPEG processes (ITU T.81), whose streams state their sample
#: precision in their SOF segment (JPEG-LS and JPEG 2000 are decoded at their own precision).
JPEG_PROCESS_SYNTAXES = (
    "1.2.840.10008.1.2.4.50",  # baseline, 8 bit
    "1.2.840.10008.1.2.4.51",  # extended, 12 bit
    "1.2.840.10008.1.2.4.57",  # lossless
    "1.2.840.10008.1.2.4.70",  # lossless, first-order prediction (the common one)
)
#: SOF markers: every 0xFFCn but DHT (C4), JPG (C8) and DAC (CC).
_SOF_MARKERS = frozenset(range(0xC0, 0xD0)) - {0xC4, 0xC8, 0xCC}


def _transfer_syntax(dataset: FileDataset, path: Path) -> Any:
    """The file's transfer syntax; for a file without one in its meta (an old raw dataset),
    the native syntax pydicom read it in, set on the dataset (pydicom decodes only with one)."""
    from pydicom import uid

    syntax = dataset.file_meta.get("TransferSyntaxUID")
    if syntax is not None:
        return syntax
    encoding = getattr(dataset, "original_encoding", None)
    if not encoding or encoding[0] is None:
        raise ImageDecodeError(f"{path.name}: no transfer syntax, and none can be inferred")
    implicit, little = encoding
    native = {
        (True, True): uid.ImplicitVRLittleEndian,
        (False, True): uid.ExplicitVRLittleEndian,
        (False, False): uid.ExplicitVRBigEndian,
    }.get((bool(implicit), bool(little)))
    if native is None:
        raise ImageDecodeError(f"{path.name}: no transfer syntax, and none can be inferred")
    dataset.file_meta.TransferSyntaxUID = native
    return native


def _jpeg_precision(dataset: FileDataset) -> int | None:
    """The sample precision the first frame's JPEG stream states, if it can be read."""
    from pydicom.encaps import generate_frames

    try:
        frame = next(generate_frames(dataset.PixelData, number_of_frames=1))
    except Exception:  # noqa: BLE001 - then the decoder says what is wrong with the data
        return None
    return sof_precision(frame)


def sof_precision(stream: bytes) -> int | None:
    """P of the first SOF segment of a JPEG stream (ITU T.81, B.2.2), walking its segments;
    None where the stream is not one or ends first."""
    if stream[:2] != b"\xff\xd8":
        return None
    at = 2
    while at + 4 < len(stream):
        if stream[at] != 0xFF:
            return None
        marker = stream[at + 1]
        if marker == 0xFF:  # a fill byte
            at += 1
        elif marker in _SOF_MARKERS:
            return stream[at + 4]
        elif marker == 0x01 or 0xD0 <= marker <= 0xD8:  # segments without a length
            at += 2
        else:
            at += 2 + int.from_bytes(stream[at + 2 : at + 4], "big")
    return None


def _has_modality_transform(dataset: FileDataset) -> bool:
    """A modality LUT or a rescale other than ``x * 1 + 0``."""
    if "ModalityLUTSequence" in dataset:
        return True
    try:
        slope = float(dataset.get("RescaleSlope", 1) or 1)
        intercept = float(dataset.get("RescaleIntercept", 0) or 0)
    except (TypeError, ValueError):
        return True  # let pydicom make sense of it
    return slope != 1 or intercept != 0


def _as_image(values: np.ndarray, bits: int) -> Image.Image:
    """Mode ``L`` for whole values within 8 bits, else ``F``. Whole values within 16 bits go
    through Pillow's own ``I;16`` -> ``F`` conversion, several times faster than numpy's
    float copies of a 7-megapixel image."""
    whole = values.dtype.kind in "iu" or bool(np.all(values == np.round(values)))
    if whole and bits == 8:
        return Image.fromarray(values.astype(np.uint8))
    if whole and bits <= 16:
        height, width = values.shape
        data = np.ascontiguousarray(values, dtype="<u2")
        # frombuffer maps the array (no zero-filled image first); convert makes the copy.
        return Image.frombuffer("I;16", (width, height), data, "raw", "I;16", 0, 1).convert("F")
    return Image.fromarray(values.astype(np.float32))


def allowed_header(dataset: object) -> dict[str, str | int | float]:
    """The allow-listed header fields present in ``dataset``, as plain values."""
    out: dict[str, str | int | float] = {}
    for keyword, name in HEADER_ALLOW_LIST.items():
        value = getattr(dataset, keyword, None)
        if value is None or value == "":
            continue
        if keyword == "PatientAge":
            years = parse_age(str(value))
            if years is not None:
                out[name] = years
        elif isinstance(value, int):
            out[name] = int(value)
        else:
            out[name] = str(value).strip()
    return out


def parse_age(text: str) -> float | None:
    """DICOM age string (``045Y``, ``006M``, ``003W``, ``010D``; bare ``62`` read as years)
    -> years; None if malformed."""
    text = text.strip().upper()
    if text.isdigit():  # a unit-less number, as some de-identified files write it: years
        return float(int(text))
    if len(text) < 2 or text[-1] not in _AGE_UNITS or not text[:-1].isdigit():
        return None
    return round(int(text[:-1]) * _AGE_UNITS[text[-1]], 3)


def open_dicom(path: Path) -> FileDataset:
    """Read the dataset (``.gz`` transparently); ``ImageDecodeError`` if it is not DICOM or
    is cut short (pydicom reads a truncated file quietly, as far as it goes)."""
    import pydicom
    from pydicom.errors import BytesLengthException, InvalidDicomError

    size = 0
    try:
        source: io.BytesIO | Path = path
        if path.name.lower().endswith(".gz"):
            with gzip.open(path, "rb") as handle:
                source = io.BytesIO(handle.read())
            size = len(source.getbuffer())
        else:
            size = path.stat().st_size
        # pydicom warns about many harmless oddities, and logs what it warns: keep both for
        # the truncation check below, out of the user's log.
        with warnings.catch_warnings(record=True) as caught, _quiet_pydicom_log():
            warnings.simplefilter("always")
            dataset = pydicom.dcmread(source)
    except FileNotFoundError:
        raise ImageDecodeError(f"file not found: {path}") from None
    except (EOFError, struct.error):  # an element header past the end
        raise _truncated(path, size or path.stat().st_size) from None
    except (InvalidDicomError, BytesLengthException, OSError, ValueError, KeyError) as exc:
        raise ImageDecodeError(f"cannot read {path.name} as DICOM: {exc}") from None
    if any("End of file" in str(warning.message) for warning in caught) or _cut_short(
        dataset, size, source
    ):
        raise _truncated(path, size)
    sop_class = _sop_class(dataset) if "PixelData" not in dataset else ""
    if "Image Storage" in sop_class:
        # A cut at an element boundary leaves nothing else to see.
        raise ImageDecodeError(
            f"{path.name}: no pixel data in an image DICOM ({sop_class}): "
            f"truncated file ({size:,} bytes)? re-download it"
        )
    return dataset


def _truncated(path: Path, size: int) -> ImageDecodeError:
    return ImageDecodeError(f"{path.name}: truncated file ({size:,} bytes): re-download it")


def _cut_short(dataset: FileDataset, size: int, source: io.BytesIO | Path) -> bool:
    """The file ends early for certain: the meta header or the last element needs more bytes
    than there are, a piece of an element header is left over (not zero padding: a trailing
    NUL or a few are a common, harmless quirk), or nothing follows the meta header."""
    from pydicom.errors import BytesLengthException

    try:
        meta_length = int(dataset.file_meta.get("FileMetaInformationGroupLength", 0))
    except (BytesLengthException, TypeError, ValueError):  # its value cut off too
        return True
    if meta_length and 132 + 12 + meta_length > size:
        return True
    tags = list(dataset.keys())
    if not tags:
        return True
    last = dataset.get_item(tags[-1])
    value, start = getattr(last, "value", None), getattr(last, "value_tell", None)
    declared = getattr(last, "length", 0xFFFFFFFF)
    if not isinstance(value, bytes) or start is None or declared == 0xFFFFFFFF:
        return False  # a sequence or a converted value: nothing to measure
    if len(value) < declared:
        return True
    end = start + declared
    return 0 < size - end < 8 and any(_bytes_at(source, end, size - end))


def _bytes_at(source: io.BytesIO | Path, offset: int, count: int) -> bytes:
    if isinstance(source, io.BytesIO):
        return bytes(source.getbuffer()[offset : offset + count])
    with open(source, "rb") as handle:
        handle.seek(offset)
        return handle.read(count)


def _sop_class(dataset: FileDataset) -> str:
    """The SOP class's name (``Digital X-Ray Image Storage - For Presentation``), or ''."""
    from pydicom.uid import UID

    uid = dataset.file_meta.get("MediaStorageSOPClassUID") or dataset.get("SOPClassUID")
    return UID(str(uid)).name if uid else ""


class _PydicomLogFilter(logging.Filter):
    """Drops the ``pydicom`` logger's records while this thread is inside
    ``_quiet_pydicom_log`` (other threads keep theirs)."""

    def __init__(self) -> None:
        super().__init__()
        self.local = threading.local()

    def filter(self, record: logging.LogRecord) -> bool:
        return not getattr(self.local, "quiet", False)


_PYDICOM_LOG_FILTER = _PydicomLogFilter()


@contextmanager
def _quiet_pydicom_log() -> Iterator[None]:
    logger = logging.getLogger("pydicom")
    if _PYDICOM_LOG_FILTER not in logger.filters:
        logger.addFilter(_PYDICOM_LOG_FILTER)
    _PYDICOM_LOG_FILTER.local.quiet = True
    try:
        yield
    finally:
        _PYDICOM_LOG_FILTER.local.quiet = False


def check_header(dataset: FileDataset, path: Path, max_pixels: int) -> None:
    """Refuse, before decoding, anything that is not one grayscale frame of sane size."""
    get = dataset.get  # type: ignore[attr-defined]
    if "PixelData" not in dataset:  # type: ignore[operator]
        raise ImageDecodeError(f"{path.name}: no pixel data (not an image DICOM)")
    rows, columns = get("Rows"), get("Columns")
    if not rows or not columns:
        raise ImageDecodeError(f"{path.name}: Rows/Columns missing from the header")
    if int(rows) * int(columns) > max_pixels:
        raise DecompressionBombError(
            f"{path.name}: {columns}x{rows} = {int(rows) * int(columns):,} pixels exceeds "
            f"the limit of {max_pixels:,}"
        )
    try:
        frames = int(get("NumberOfFrames") or 1)
    except (TypeError, ValueError):
        frames_text = get("NumberOfFrames")
        raise ImageDecodeError(
            f"{path.name}: NumberOfFrames {frames_text!r} is not a number"
        ) from None
    if frames > 1:
        raise ImageDecodeError(
            f"{path.name}: multi-frame DICOM ({frames} frames); expected one radiograph"
        )
    photometric = str(get("PhotometricInterpretation", "")).strip()
    samples = int(get("SamplesPerPixel") or 1)
    if samples != 1 or photometric not in ("MONOCHROME1", "MONOCHROME2"):
        raise ImageDecodeError(
            f"{path.name}: colour DICOM (PhotometricInterpretation {photometric or 'missing'}, "
            f"SamplesPerPixel {samples}); expected MONOCHROME1 or MONOCHROME2"
        )
    allocated = int(get("BitsAllocated") or 0)
    if allocated not in (8, 16):
        raise ImageDecodeError(f"{path.name}: BitsAllocated {allocated}; expected 8 or 16")


def _check_native_length(dataset: object, path: Path) -> None:
    """Uncompressed pixel data must hold Rows x Columns samples: shorter is truncated,
    longer by a row or more means the header misstates the size (a byte or two of padding
    is normal)."""
    rows, columns = int(dataset.Rows), int(dataset.Columns)  # type: ignore[attr-defined]
    sample_bytes = int(dataset.BitsAllocated) // 8  # type: ignore[attr-defined]
    expected = rows * columns * sample_bytes
    actual = len(dataset.PixelData)  # type: ignore[attr-defined]
    if actual < expected or actual - expected >= columns * sample_bytes:
        raise ImageDecodeError(
            f"{path.name}: pixel data is {actual:,} bytes; the header ({columns}x{rows}, "
            f"{sample_bytes * 8}-bit) says {expected:,}"
        )


def _window(dataset: object, shift: float) -> tuple[float, float] | None:
    """The first (centre, width) of the file, moved by ``-shift`` like the pixels."""
    centre = getattr(dataset, "WindowCenter", None)
    width = getattr(dataset, "WindowWidth", None)
    if centre is None or width is None:
        return None
    try:
        c = float(centre[0] if _is_multi(centre) else centre)
        w = float(width[0] if _is_multi(width) else width)
    except (TypeError, ValueError, IndexError):
        return None
    return (c - shift, w) if w > 0 else None


def _lut_bits(dataset: object) -> int:
    """The output depth a VOI LUT declares (third value of its LUTDescriptor), or 8."""
    try:
        declared = int(dataset.VOILUTSequence[0].LUTDescriptor[2])  # type: ignore[attr-defined]
    except (AttributeError, IndexError, TypeError, ValueError):
        return 8
    return declared if 8 <= declared <= 16 else 8


def _is_multi(value: object) -> bool:
    return not isinstance(value, str | bytes) and hasattr(value, "__getitem__")


def _apply_voi_table(values: np.ndarray, dataset: object, path: Path) -> np.ndarray:
    """The first VOI LUT of the file applied to ``values`` (pydicom's ``apply_voi`` indexes
    an 8-bit LUT with a uint8 array, so inputs >= 256 would wrap around)."""
    item = dataset.VOILUTSequence[0]  # type: ignore[attr-defined]
    try:
        entries, first, depth = (int(v) for v in item.LUTDescriptor)
    except (AttributeError, TypeError, ValueError):
        raise ImageDecodeError(f"{path.name}: VOI LUT without a valid LUTDescriptor") from None
    if not (depth == 8 or 10 <= depth <= 16):
        raise ImageDecodeError(
            f"{path.name}: VOI LUT of {depth} bits per entry; expected 8 or 10..16"
        )
    entries = entries or 65536
    element = item["LUTData"]
    if element.VR == "OW":
        little = dataset.original_encoding[1] is not False  # type: ignore[attr-defined]
        table = np.frombuffer(element.value, "<u2" if little else ">u2")[:entries]
    else:
        table = np.asarray(element.value, dtype=np.uint16).reshape(-1)[:entries]
    if table.size < entries:
        raise ImageDecodeError(f"{path.name}: VOI LUT holds {table.size} of {entries} entries")
    # In float: np.floor keeps uint16 data uint16, and ``- first`` would wrap around below it.
    index = np.clip(np.floor(values.astype(np.float64)) - first, 0, entries - 1).astype(np.int64)
    return table[index].astype(np.float64)
