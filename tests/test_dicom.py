"""DICOM decoding: the real files, MONOCHROME1, pydicom's own test files, files written by
``machex.sample.dicom``, refusals, windowing, ``--compat machex-v1`` and the header
allow-list down to the bytes of a built shard."""

from __future__ import annotations

import gzip
import io
import json
import sys
import warnings
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pydicom
import pytest
from PIL import Image

import machex.imaging.dicom as dicom_module
from machex.assemble import BuiltSample, build_sample
from machex.build import ShardSpec, _write_shard
from machex.imaging import (
    DecompressionBombError,
    Encoding,
    ImageDecodeError,
    Intensity,
    PixelOptions,
    decode_image,
    process_image,
)
from machex.imaging.dicom import HEADER_ALLOW_LIST, is_dicom, parse_age, read_dicom
from machex.manifests import TABLES
from machex.records import Failure, ImageRecord
from machex.sample import synthetic_radiograph
from machex.sample.dicom import write_dicom

sys.path.insert(0, str(Path(__file__).parents[1] / "benchmarks"))
from machex_v1_baseline import machex_v1  # noqa: E402

PYDICOM_FILES = Path(pydicom.__file__).parent / "data" / "test_files"
REAL_M2 = "1.2.276.0.7230010.3.1.4.8323329.6904.1517875201.850819.dcm"
REAL_M1 = "Fake_MONOHR1.dcm"  # REAL_M2's pixel data, only the tag says MONOCHROME1
PNG = PixelOptions(encoding=Encoding.png)
PNG_WINDOW = PixelOptions(encoding=Encoding.png, intensity=Intensity.window)
COMPAT = PixelOptions(compat="machex-v1")
LIMIT = 10**8


def _decode(data: bytes) -> np.ndarray:
    with Image.open(io.BytesIO(data)) as image:
        return np.asarray(image)


def _values(path: Path, **kwargs: object) -> np.ndarray:
    """The decoder's calibrated values as float64 (whole numbers for these files)."""
    return np.asarray(decode_image(path, **kwargs).image, dtype=np.float64)


def _wheel(name: str) -> Path:
    path = PYDICOM_FILES / name
    if not path.is_file():
        pytest.skip(f"pydicom's wheel has no {name} here")
    return path


def _ramp(bits: int = 12, size: int = 1024) -> np.ndarray:
    """Every value 0 .. 2**bits - 1, repeated row by row (min 0, max 2**bits - 1)."""
    return (np.arange(size * size) % 2**bits).astype(np.uint16).reshape(size, size)


def _radiograph12(seed: int = 0, width: int = 640, height: int = 512) -> np.ndarray:
    return synthetic_radiograph(np.random.default_rng(seed), width, height, bits=12)


# --------------------------------------------------------------------------- real files


def test_real_dicom_decodes_as_an_8bit_radiograph(real_images: Path) -> None:
    decoded = decode_image(real_images / REAL_M2)
    assert decoded.image.mode == "L" and decoded.bits == 8
    assert (decoded.width, decoded.height) == (1024, 1024)
    pixels = decoded.pixels
    assert pixels.shape == (1024, 1024) and pixels.std() > 20  # a picture, not a flat field
    assert set(decoded.header) <= set(HEADER_ALLOW_LIST.values())
    assert decoded.header["photometric_interpretation"] == "MONOCHROME2"
    # 1024x1024 8-bit raw -> PNG is the identity.
    out = process_image(real_images / REAL_M2, PNG)
    assert np.array_equal(_decode(out.data), pixels) and out.bits == 8


def test_real_fake_monochrome1_is_the_inverted_picture(real_images: Path) -> None:
    """Same pixel data, only the tag differs: the correct reading is 255 - x."""
    m2 = decode_image(real_images / REAL_M2).pixels
    m1 = decode_image(real_images / REAL_M1).pixels
    assert np.array_equal(m1, 255 - m2)
    out1 = _decode(process_image(real_images / REAL_M1, PNG).data)
    out2 = _decode(process_image(real_images / REAL_M2, PNG).data)
    assert np.array_equal(out1, 255 - out2)


def test_real_file_and_its_true_monochrome1_twin_give_one_picture(
    real_images: Path, tmp_path: Path
) -> None:
    original = decode_image(real_images / REAL_M2).pixels  # uint8, b = 8
    copy = write_dicom(tmp_path / "copy.dcm", original)
    twin = write_dicom(tmp_path / "twin.dcm", 255 - original, photometric="MONOCHROME1")
    reference = _decode(process_image(real_images / REAL_M2, PNG).data)
    for path in (copy, twin):
        assert np.array_equal(decode_image(path).pixels, original), path.name
        assert np.array_equal(_decode(process_image(path, PNG).data), reference), path.name


@pytest.mark.parametrize("size", [400, 700, 1_000, 50_000, 127_000])
def test_real_dicom_cut_short_is_called_truncated_without_pydicom_noise(
    real_images: Path, tmp_path: Path, size: int, caplog: pytest.LogCaptureFixture
) -> None:
    """pydicom reads a cut-off file quietly (or logs an EOF warning and returns an empty
    dataset): the user must hear "truncated", not "not an image DICOM"."""
    path = tmp_path / REAL_M2
    path.write_bytes((real_images / REAL_M2).read_bytes()[:size])
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no warning may leave the decoder either
        with pytest.raises(ImageDecodeError) as caught:
            decode_image(path)
    assert str(caught.value) == f"{REAL_M2}: truncated file ({size:,} bytes): re-download it"
    assert not [r for r in caplog.records if r.name.startswith("pydicom")]


@pytest.mark.parametrize("padding", [b"\0", b"\0\0", b"\0" * 7])
def test_trailing_zero_padding_is_no_truncation(
    real_images: Path, tmp_path: Path, padding: bytes
) -> None:
    """A few NUL bytes after the last element are a harmless writer quirk (pydicom ignores
    them); other leftover bytes are a cut element header."""
    original = decode_image(real_images / REAL_M2).pixels
    path = write_dicom(tmp_path / "padded.dcm", original)  # native: a defined pixel length
    path.write_bytes(path.read_bytes() + padding)
    assert np.array_equal(decode_image(path).pixels, original)
    path.write_bytes(path.read_bytes()[: -len(padding)] + b"\x01" * len(padding))
    with pytest.raises(ImageDecodeError, match="truncated file"):
        decode_image(path)


def test_real_dicom_cut_between_elements_is_suspected_truncated(
    real_images: Path, tmp_path: Path
) -> None:
    """Cut exactly at an element boundary the header reads as complete; an image SOP class
    without pixel data is still most likely a cut-off download."""
    path = tmp_path / REAL_M2
    path.write_bytes((real_images / REAL_M2).read_bytes()[:500])
    with pytest.raises(ImageDecodeError) as caught:
        decode_image(path)
    assert str(caught.value) == (
        f"{REAL_M2}: no pixel data in an image DICOM (Secondary Capture Image Storage): "
        "truncated file (500 bytes)? re-download it"
    )


# --------------------------------------------------------------------------- MONOCHROME1


@pytest.mark.parametrize("transfer_syntax", ["explicit_le", "rle", "jpeg2000"])
def test_12bit_monochrome1_twin_gives_one_picture(tmp_path: Path, transfer_syntax: str) -> None:
    x = _radiograph12()
    assert 2048 <= int(x.max()) <= 4095 and int(x.min()) < 2048  # b = 12 both ways
    m2 = write_dicom(tmp_path / "m2.dcm", x, transfer_syntax=transfer_syntax)
    m1 = write_dicom(
        tmp_path / "m1.dcm",
        (4095 - x).astype(np.uint16),
        photometric="MONOCHROME1",
        transfer_syntax=transfer_syntax,
    )
    a, b = decode_image(m2), decode_image(m1)
    assert a.bits == b.bits == 12
    assert np.array_equal(a.pixels, x) and np.array_equal(b.pixels, x)
    for options in (PNG, PixelOptions(encoding=Encoding.png16, image_size=512)):
        assert process_image(m1, options).data == process_image(m2, options).data


@pytest.mark.xfail(
    strict=True,
    reason="limitation of the rule as specified: b comes from the stored maximum, so a "
    "MONOCHROME1 twin of an image whose values are all >= 2**(b-1) has a smaller b and is "
    "inverted within the wrong range (BitsStored, the only other source of b, is not trusted)",
)
def test_monochrome1_twin_of_an_image_without_dark_pixels(tmp_path: Path) -> None:
    x = (_radiograph12() // 2 + 2048).astype(np.uint16)  # 2048 .. 4095
    m2 = write_dicom(tmp_path / "m2.dcm", x)
    m1 = write_dicom(tmp_path / "m1.dcm", (4095 - x).astype(np.uint16), photometric="MONOCHROME1")
    assert process_image(m1, PNG).data == process_image(m2, PNG).data


# --------------------------------------------------------------------------- pydicom's files


def test_one_picture_in_many_encodings_decodes_identically() -> None:
    names = [
        "MR_small.dcm",  # native explicit little endian, signed 16-bit
        "MR_small_implicit.dcm",
        "MR_small_bigendian.dcm",
        "MR_small_RLE.dcm",
        "MR_small_jp2klossless.dcm",
        "MR_small_jpeg_ls_lossless.dcm",
    ]
    reference = decode_image(_wheel(names[0]))
    assert reference.bits == 12 and reference.image.mode == "F"
    expected = np.asarray(reference.image)
    raw = pydicom.dcmread(_wheel(names[0])).pixel_array
    assert np.array_equal(expected, raw.astype(np.float32))  # no LUT, no shift: all > 0
    for name in names[1:]:
        decoded = decode_image(_wheel(name))
        assert decoded.bits == reference.bits, name
        assert np.array_equal(np.asarray(decoded.image), expected), name


def test_jpeg_extended_12bit_decodes() -> None:
    path = _wheel("JPGExtended.dcm")
    decoded = decode_image(path)
    assert (decoded.width, decoded.height) == (256, 1024)
    dataset = pydicom.dcmread(path)
    assert np.array_equal(decoded.pixels, dataset.pixel_array)
    assert decoded.bits == max(8, int(dataset.pixel_array.max()).bit_length())


def test_jpeg2000_with_modality_lut_decodes() -> None:
    from pydicom.pixels import apply_modality_lut

    path = _wheel("693_J2KI.dcm")  # JPEG 2000 (lossy), rescale intercept -1024
    dataset = pydicom.dcmread(path)
    values = apply_modality_lut(dataset.pixel_array, dataset).astype(np.float64)
    assert values.min() < 0
    assert np.array_equal(_values(path), values - values.min())  # negative minimum -> 0


@pytest.mark.parametrize(
    ("name", "reason"),
    [
        ("SC_rgb_jpeg_gdcm.dcm", "colour DICOM"),  # JPEG lossless process 14, but RGB
        ("SC_rgb_rle.dcm", "colour DICOM"),
        ("SC_rgb_small_odd.dcm", "colour DICOM"),
        ("examples_palette.dcm", "colour DICOM"),
        ("rtdose.dcm", "multi-frame DICOM"),
        ("examples_ybr_color.dcm", "multi-frame DICOM"),
        ("MR_truncated.dcm", "truncated file"),  # pixel data 8,130 of its 8,192 bytes
        ("liver_1frame.dcm", "BitsAllocated 1; expected 8 or 16"),
        ("rtdose_1frame.dcm", "BitsAllocated 32; expected 8 or 16"),
        ("rtplan.dcm", "no pixel data"),
    ],
)
def test_refusals_name_the_file_and_the_reason(name: str, reason: str, tmp_path: Path) -> None:
    path = _wheel(name)
    with pytest.raises(ImageDecodeError, match=reason) as caught:
        process_image(path, PNG)
    assert name in str(caught.value)
    # In a build the refusal is a failure record, not a crash.
    result = build_sample(_record(path), PixelOptions(), tmp_path)
    assert isinstance(result, Failure) and result.error_type == "ImageDecodeError"
    assert name in result.message and reason in result.message


def test_multi_frame_file_written_here_is_refused(tmp_path: Path) -> None:
    path = write_dicom(tmp_path / "two.dcm", np.zeros((2 * 32, 32), np.uint16))
    dataset = pydicom.dcmread(path)
    dataset.Rows, dataset.NumberOfFrames = 32, 2
    dataset.save_as(path)
    with pytest.raises(ImageDecodeError, match=r"two\.dcm: multi-frame DICOM \(2 frames\)"):
        decode_image(path)


def test_pixel_data_longer_than_the_header_says_is_refused(tmp_path: Path) -> None:
    path = write_dicom(tmp_path / "long.dcm", np.zeros((64, 32), np.uint16), extra={"Rows": 32})
    with pytest.raises(ImageDecodeError, match=r"long\.dcm: pixel data is 4,096 bytes"):
        decode_image(path)


def test_not_a_dicom_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "text.dcm"
    path.write_text("not a DICOM file\n" * 20)
    with pytest.raises(ImageDecodeError, match=r"text\.dcm"):
        decode_image(path)
    with pytest.raises(ImageDecodeError, match="not found"):
        decode_image(tmp_path / "missing.dcm")


# --------------------------------------------------------------------------- own files


@pytest.mark.parametrize(
    "transfer_syntax",
    [
        "explicit_le",
        "rle",
        "jpeg2000",
    ],
)
def test_misstated_bits_stored_keeps_the_full_range(tmp_path: Path, transfer_syntax: str) -> None:
    ramp = _ramp(12)
    path = write_dicom(tmp_path / "lie.dcm", ramp, bits_stored=8, transfer_syntax=transfer_syntax)
    assert pydicom.dcmread(path).BitsStored == 8
    decoded = decode_image(path)
    assert decoded.bits == 12 and np.array_equal(decoded.pixels, ramp)
    assert decoded.header["bits_stored"] == 8  # reported as the file states it
    out = _decode(process_image(path, PNG).data)  # raw: [0, 4095] -> [0, 255]
    assert out.min() == 0 and out.max() == 255
    expected = np.rint(ramp * (255 / 4095))
    assert np.abs(out.astype(float) - expected).max() <= 1


def test_modality_lut_moves_a_negative_minimum_to_zero(tmp_path: Path) -> None:
    stored = _radiograph12(1)
    path = write_dicom(tmp_path / "ct.dcm", stored, rescale=(2.0, -1024.0))
    modality = 2.0 * stored - 1024.0
    assert modality.min() < 0
    decoded = decode_image(path)
    assert np.array_equal(np.asarray(decoded.image, np.float64), modality - modality.min())
    assert decoded.bits == max(8, int(modality.max() - modality.min()).bit_length())


def test_window_centre_width_matches_a_clip_and_scale_reference(tmp_path: Path) -> None:
    ramp = _ramp(12)
    path = write_dicom(tmp_path / "w.dcm", ramp, window=(2048.0, 1024.0))
    out = process_image(path, PNG_WINDOW)
    assert out.intensity == "window"
    expected = np.clip((ramp - 1536.0) * 255 / 1024, 0, 255)
    assert np.abs(_decode(out.data).astype(float) - expected).max() <= 1
    # raw ignores the window; a window from the metadata loses to the file's own.
    assert process_image(path, PNG).intensity == "raw"
    other = process_image(path, PNG_WINDOW, window=(100.0, 50.0))
    assert other.data == out.data


def test_window_is_in_modality_units_and_survives_monochrome1(tmp_path: Path) -> None:
    """A CT-style window (HU) on rescaled data, and the same on the MONOCHROME1 twin."""
    ramp = _ramp(12)
    m2 = write_dicom(tmp_path / "hu.dcm", ramp, rescale=(1.0, -1024.0), window=(40.0, 400.0))
    hu = ramp - 1024.0
    expected = np.clip((hu - (40.0 - 200.0)) * 255 / 400, 0, 255)
    out = _decode(process_image(m2, PNG_WINDOW).data).astype(float)
    assert np.abs(out - expected).max() <= 1
    twin = write_dicom(
        tmp_path / "twin.dcm",
        (4095 - ramp).astype(np.uint16),
        photometric="MONOCHROME1",
        window=(4095.0 - 2048.0, 1024.0),
    )
    straight = write_dicom(tmp_path / "straight.dcm", ramp, window=(2048.0, 1024.0))
    assert process_image(twin, PNG_WINDOW).data == process_image(straight, PNG_WINDOW).data


def test_window_mode_without_a_window_falls_back_to_raw(tmp_path: Path) -> None:
    path = write_dicom(tmp_path / "plain.dcm", _ramp(12))
    windowed = process_image(path, PNG_WINDOW)
    assert windowed.intensity == "raw"
    assert windowed.data == process_image(path, PNG).data


def test_voi_lut_sequence_is_applied_in_window_mode(tmp_path: Path) -> None:
    ramp = _ramp(12)
    table = np.rint(4095 * np.sqrt(np.arange(4096) / 4095)).astype(np.uint16)  # 12-bit out
    path = write_dicom(tmp_path / "voi.dcm", ramp, voi_lut=table, window=(10.0, 5.0))
    out = process_image(path, PNG_WINDOW)
    assert out.intensity == "window" and out.bits == 12
    expected = table[ramp] * (255 / 4095)  # the LUT wins over the window
    assert np.abs(_decode(out.data).astype(float) - expected).max() <= 1
    raw = _decode(process_image(path, PNG).data).astype(float)  # raw ignores the LUT
    assert np.abs(raw - ramp * (255 / 4095)).max() <= 1


def test_voi_lut_with_8bit_output_on_12bit_input(tmp_path: Path) -> None:
    ramp = _ramp(12)
    table = np.rint(255 * np.sqrt(np.arange(4096) / 4095)).astype(np.uint16)  # 8-bit out
    path = write_dicom(tmp_path / "voi8.dcm", ramp, voi_lut=table)
    assert pydicom.dcmread(path).VOILUTSequence[0].LUTDescriptor[2] == 8
    out = _decode(process_image(path, PNG_WINDOW).data)
    assert np.array_equal(out, table[ramp].astype(np.uint8))


def test_voi_lut_whose_first_mapped_value_is_above_zero(tmp_path: Path) -> None:
    """Pixels below the table's first mapped value take its first entry (PS3.3 C.11.2.1.1);
    uint16 data minus that value wrapped around and came out white."""
    ramp = _ramp(12)
    table = np.rint(4095 * np.sqrt(np.arange(4096) / 4095)).astype(np.uint16)
    path = write_dicom(tmp_path / "voi500.dcm", ramp, voi_lut=table)
    dataset = pydicom.dcmread(path)
    dataset.VOILUTSequence[0].LUTDescriptor = [4096, 500, 12]
    dataset.save_as(path)
    out = _decode(process_image(path, PNG_WINDOW).data).astype(float)
    expected = table[np.clip(ramp.astype(np.int64) - 500, 0, 4095)] * (255 / 4095)
    assert (ramp < 500).any() and np.abs(out - expected).max() <= 1


def test_an_empty_voi_lut_sequence_falls_back_to_the_window(tmp_path: Path) -> None:
    ramp = _ramp(12)
    path = write_dicom(tmp_path / "empty.dcm", ramp, window=(2048.0, 1024.0))
    reference = process_image(path, PNG_WINDOW)
    dataset = pydicom.dcmread(path)
    dataset.VOILUTSequence = pydicom.Sequence([])
    dataset.save_as(path)
    assert process_image(path, PNG_WINDOW).data == reference.data


def test_unsupported_voi_lut_is_an_image_decode_error(tmp_path: Path) -> None:
    path = write_dicom(tmp_path / "voi9.dcm", _ramp(9, 64), voi_lut=np.arange(512, dtype=np.uint16))
    dataset = pydicom.dcmread(path)
    dataset.VOILUTSequence[0].LUTDescriptor = [512, 0, 9]
    dataset.save_as(path)
    with pytest.raises(ImageDecodeError, match=r"voi9\.dcm"):
        process_image(path, PNG_WINDOW)


@pytest.mark.parametrize("name", ["a.dcm.gz", "a.dicom", "A.DICOM.GZ", "a.DCM"])
def test_other_dicom_names(tmp_path: Path, name: str) -> None:
    x = _radiograph12(2, 96, 80)
    reference = write_dicom(tmp_path / "ref" / "a.dcm", x, sex="F")
    path = write_dicom(tmp_path / name, x, sex="F")
    assert is_dicom(path)
    if name.lower().endswith(".gz"):
        assert path.read_bytes()[:2] == b"\x1f\x8b"
        assert gzip.decompress(path.read_bytes()) != reference.read_bytes()  # UIDs by name
    assert np.array_equal(decode_image(path).pixels, x)
    assert process_image(path, PNG).data == process_image(reference, PNG).data


def test_writer_is_deterministic(tmp_path: Path) -> None:
    x = _radiograph12(3, 64, 48)
    for name in ("d.dcm", "d.dcm.gz"):
        for syntax in ("explicit_le", "rle", "jpeg2000"):
            first = write_dicom(tmp_path / "1" / name, x, transfer_syntax=syntax).read_bytes()
            second = write_dicom(tmp_path / "2" / name, x, transfer_syntax=syntax).read_bytes()
            assert first == second, (name, syntax)
    dataset = pydicom.dcmread(tmp_path / "1" / "d.dcm")
    assert not any(keyword.endswith(("Date", "Time")) for keyword in dataset.dir())
    assert dataset.SOPClassUID == "1.2.840.10008.5.1.4.1.1.1.1"  # Digital X-Ray


def test_decompression_bomb_is_refused_from_the_header(tmp_path: Path) -> None:
    path = write_dicom(
        tmp_path / "bomb.dcm", np.zeros((4, 4), np.uint8), extra={"Rows": 60000, "Columns": 60000}
    )
    assert path.stat().st_size < 2000
    options = PixelOptions(max_pixels=1_000_000)
    # The header check comes first: otherwise this would be "pixel data is 16 bytes".
    refused = r"^bomb\.dcm: 60000x60000 = .* exceeds the limit of 1,000,000"
    with pytest.raises(DecompressionBombError, match=refused):
        process_image(path, options)
    with pytest.raises(DecompressionBombError):
        process_image(path, PixelOptions(max_pixels=1_000_000, compat="machex-v1"))
    with pytest.raises(DecompressionBombError):
        read_dicom(path, max_pixels=1_000_000)


def test_compat_matches_the_original_dicom_branch_byte_for_byte(tmp_path: Path) -> None:
    """The original read only VinDr-CXR's 16-bit DICOMs: no modality LUT, no inversion,
    BitsStored ignored, min..max stretch."""
    x = _radiograph12(4, 1100, 900)
    paths = [
        write_dicom(tmp_path / "plain.dcm", x),
        write_dicom(tmp_path / "lie.dicom", x, bits_stored=10),
        write_dicom(
            tmp_path / "m1.dcm",
            (4095 - x).astype(np.uint16),
            photometric="MONOCHROME1",
            rescale=(2.0, -1024.0),
            window=(100.0, 10.0),
        ),
        write_dicom(tmp_path / "portrait.dcm", _radiograph12(5, 700, 1300)),
    ]
    for path in paths:
        ours = process_image(path, COMPAT)
        assert ours.data == machex_v1(path), path.name
        assert ours.intensity == "machex-v1" and ours.bits == 12


# --------------------------------------------------------------------------- the header


def test_header_holds_only_the_allow_list(tmp_path: Path) -> None:
    path = write_dicom(
        tmp_path / "h.dcm", _radiograph12(6, 64, 64), sex="F", age="045Y", extra=_PROBE_TAGS
    )
    for options in (PNG, PNG_WINDOW):
        header = process_image(path, options).header
        assert set(header) <= set(HEADER_ALLOW_LIST.values())
        assert header["sex"] == "F" and header["age"] == 45.0
        assert header["view_position"] == "PA" and header["rows"] == 64
        assert "LEAKPROBE" not in json.dumps(header).upper()


def test_parse_age() -> None:
    assert parse_age("045Y") == 45.0
    assert parse_age("006M") == 0.5
    assert parse_age(" 010D ") == round(10 / 365.25, 3)
    assert parse_age("003W") == round(21 / 365.25, 3)
    assert parse_age("62") == 62.0  # unit-less, as the real SIIM file writes it: years
    for malformed in ("", "Y", "4.5Y", "-04Y", "045X"):
        assert parse_age(malformed) is None, malformed


_PROBE_TAGS: dict[str, object] = {
    "SpecificCharacterSet": "ISO_IR 100",  # latin-1, for the non-ASCII probe
    "PatientName": "LEAKPROBE^NAME^MÜLLERÖ",
    "PatientID": "LEAKPROBE-ID",
    "OtherPatientIDs": "LEAKPROBE-OTHER",
    "PatientBirthDate": "19230405",
    "PatientAddress": "LEAKPROBE STREET 1",
    "InstitutionName": "LEAKPROBE HOSPITAL",
    "InstitutionAddress": "LEAKPROBE ROAD",
    "ReferringPhysicianName": "LEAKPROBE^REFERRER",
    "PerformingPhysicianName": "LEAKPROBE^PERFORMER",
    "OperatorsName": "LEAKPROBE^OPERATOR",
    "StationName": "LEAKPROBESTATION",
    "Manufacturer": "LEAKPROBE MAKER",
    "ManufacturerModelName": "LEAKPROBE MODEL",
    "DeviceSerialNumber": "LEAKPROBE-SN",
    "AccessionNumber": "LEAKPROBEACC",
    "StudyID": "LEAKPROBE",
    "StudyDescription": "LEAKPROBE STUDY",
    "SeriesDescription": "LEAKPROBE SERIES",
    "ImageComments": "LEAKPROBE COMMENT",
}


def _record(path: Path, **fields: object) -> ImageRecord:
    values: dict[str, object] = {
        "key": f"probe-{path.stem.split('.')[0]}",
        "source": "probe",
        "source_key": path.name,
        "path": str(path),
        "patient_id": "p1",
        "study_id": "s1",
        "view": "PA",
        "split": "train",
    }
    return ImageRecord(**(values | fields))  # type: ignore[arg-type]


def _probes(uids: list[str]) -> list[bytes]:
    """Every form a leaked header value could take in an output byte stream."""
    texts = ["leakprobe", "müllerö", "19230405", *uids]
    forms = []
    for text in texts:
        for encoding in ("utf-8", "latin-1", "utf-16-le", "utf-16-be"):
            forms.append(text.lower().encode(encoding))
    return forms


def test_no_header_value_reaches_any_output_byte(tmp_path: Path) -> None:
    """Build the samples, write them through the real shard and manifest writers, and grep
    every output byte (and every decoded manifest cell) for the probe strings."""
    source = tmp_path / "src"
    x = _radiograph12(7, 300, 260)
    files = [
        write_dicom(source / "a.dcm", x, sex="F", age="045Y", extra=_PROBE_TAGS),
        write_dicom(
            source / "b.dcm.gz",
            (4095 - x).astype(np.uint16),
            photometric="MONOCHROME1",
            sex="M",
            age="006M",
            rescale=(1.0, -1024.0),
            window=(500.0, 1000.0),
            transfer_syntax="rle",
            extra=_PROBE_TAGS,
        ),
        write_dicom(source / "c.dicom", x, transfer_syntax="jpeg2000", extra=_PROBE_TAGS),
    ]
    uids = []
    for path in files:
        data = path.read_bytes()
        dataset = pydicom.dcmread(
            io.BytesIO(gzip.decompress(data) if data[:2] == b"\x1f\x8b" else data)
        )
        assert str(dataset.PatientName).startswith("LEAKPROBE")  # the probe is in the file
        uids += [dataset.SOPInstanceUID, dataset.StudyInstanceUID, dataset.SeriesInstanceUID]
    broken = write_dicom(source / "d.dcm", x, extra=_PROBE_TAGS | {"Rows": 100})
    records = [
        _record(files[0]),
        _record(files[1], sex="F", age=70.0),  # the metadata wins over the header
        _record(files[2]),
        _record(broken),
    ]
    out = tmp_path / "out"
    for options in (PixelOptions(), PNG_WINDOW, COMPAT):
        samples = [build_sample(record, options, source) for record in records]
        built = [s for s in samples if isinstance(s, BuiltSample)]
        assert len(built) == 3 and isinstance(samples[3], Failure)
        rows = {sample.key: sample.image_row for sample in built}
        if options.compat is None:
            assert rows["probe-a"]["sex"] == "F" and rows["probe-a"]["age"] == 45.0
            assert rows["probe-b"]["sex"] == "F" and rows["probe-b"]["age"] == 70.0
            assert rows["probe-c"]["sex"] is None and rows["probe-c"]["age"] is None
            extras = json.loads(str(rows["probe-a"]["extras"]))
            assert set(extras["dicom"]) <= set(HEADER_ALLOW_LIST.values())
        stem = f"probe-train-{options.intensity.value}-{options.compat or 'new'}"
        _write_shard(out, "probe", ShardSpec(stem, "train", tuple(records)), samples)

    written = sorted(p for p in out.rglob("*") if p.is_file())
    assert any(p.suffix == ".tar" for p in written)
    assert {p.parent.parent.name for p in written if p.suffix == ".parquet"} == set(TABLES)
    probes = _probes(uids)
    for path in written:
        data = path.read_bytes().lower()
        for probe in probes:
            assert probe not in data, (path.name, probe)
        if path.suffix == ".parquet":  # compressed pages: check the decoded cells too
            cells = json.dumps(pq.read_table(path).to_pylist(), default=str).lower()
            assert "leakprobe" not in cells and "müller" not in cells, path.name
            assert not any(uid in cells for uid in uids), path.name


def test_header_fill_in_on_the_image_row(tmp_path: Path) -> None:
    path = write_dicom(tmp_path / "f.dcm", _radiograph12(8, 64, 64), sex="M", age="030Y")
    filled = build_sample(_record(path), PixelOptions(), tmp_path)
    given = build_sample(_record(path, sex="F", age=61.5), PixelOptions(), tmp_path)
    assert isinstance(filled, BuiltSample) and isinstance(given, BuiltSample)
    assert (filled.image_row["sex"], filled.image_row["age"]) == ("M", 30.0)
    assert (given.image_row["sex"], given.image_row["age"]) == ("F", 61.5)
    metadata = json.loads(filled.json_bytes)
    assert metadata["sex"] == "M" and metadata["extras"]["dicom"]["age"] == 30.0


def test_allow_list_names_no_identifying_field() -> None:
    assert set(HEADER_ALLOW_LIST) == {
        "ViewPosition",
        "PatientSex",
        "PatientAge",
        "Rows",
        "Columns",
        "PhotometricInterpretation",
        "BitsAllocated",
        "BitsStored",
    }
    assert dicom_module.DICOM_SUFFIXES == (".dcm", ".dicom", ".dcm.gz", ".dicom.gz")


# --------------------------------------------------------------------------- precision


def _dataset_with(path: Path, pixels: np.ndarray, syntax: str, data: bytes, **tags) -> Path:
    """A minimal DX file whose pixel data is ``data`` as given, under ``syntax``."""
    from pydicom import uid
    from pydicom.dataset import Dataset, FileMetaDataset

    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.1.1"
    meta.MediaStorageSOPInstanceUID = uid.generate_uid(entropy_srcs=[path.name])
    meta.TransferSyntaxUID = syntax
    dataset = Dataset()
    dataset.file_meta = meta
    dataset.SOPClassUID, dataset.SOPInstanceUID = (
        meta.MediaStorageSOPClassUID,
        meta.MediaStorageSOPInstanceUID,
    )
    dataset.Modality, dataset.SamplesPerPixel = "DX", 1
    dataset.PhotometricInterpretation = "MONOCHROME2"
    dataset.Rows, dataset.Columns = pixels.shape
    dataset.BitsAllocated, dataset.BitsStored, dataset.HighBit = 16, 16, 15
    dataset.PixelRepresentation = 0
    for keyword, value in tags.items():
        setattr(dataset, keyword, value)
    dataset.PixelData = data
    if syntax not in (uid.ExplicitVRLittleEndian, uid.ImplicitVRLittleEndian):
        dataset["PixelData"].VR = "OB"
    dataset.save_as(path, enforce_file_format=True)
    return path


def test_jpeg_lossless_keeps_the_precision_its_stream_states(tmp_path: Path) -> None:
    """pydicom masks JPEG Lossless values to the header's BitsStored: a header that says 12
    bits over a 16-bit stream lost the top bits (max 4079 for 37863)."""
    imagecodecs = pytest.importorskip("imagecodecs")
    from pydicom import uid
    from pydicom.encaps import encapsulate

    from machex.imaging.dicom import sof_precision

    y, x = np.mgrid[0:64, 0:64]
    pixels = (x * 600 + y).astype(np.uint16)  # up to 37863: 16 bits
    stream = bytes(imagecodecs.ljpeg_encode(pixels, bitspersample=16))
    assert sof_precision(stream) == 16
    path = _dataset_with(
        tmp_path / "ljpeg.dcm",
        pixels,
        uid.JPEGLosslessSV1,
        encapsulate([stream]),
        BitsStored=12,
        HighBit=11,
    )
    decoded = decode_image(path)
    assert decoded.bits == 16 and np.array_equal(decoded.pixels, pixels)
    assert decoded.header["bits_stored"] == 12  # reported as the file states it


def test_sof_precision_reads_jpeg_streams_and_nothing_else() -> None:
    from machex.imaging.dicom import sof_precision

    buffer = io.BytesIO()
    Image.fromarray(np.zeros((8, 8), np.uint8)).save(buffer, "JPEG")
    assert sof_precision(buffer.getvalue()) == 8
    assert sof_precision(b"") is None and sof_precision(b"\xff\xd8\xff") is None
    assert sof_precision(b"\x00\x00\x00\x0cjP  ") is None  # a JPEG 2000 box


def test_signed_data_not_sign_extended_keeps_its_sign(tmp_path: Path) -> None:
    """Signed 12-bit values stored in 16 bits without sign extension: read at BitsStored
    (their sign bit is HighBit), the same picture as the sign-extended file; reading every
    allocated bit turned -2048..-1 into 2048..4095."""
    from pydicom import uid

    values = np.linspace(-2048, 2047, 64 * 64).round().astype(np.int16).reshape(64, 64)
    extended = values.astype("<i2").tobytes()
    bare = (values.astype(np.int32) & 0x0FFF).astype("<u2").tobytes()  # top 4 bits zero
    tags = {"BitsStored": 12, "HighBit": 11, "PixelRepresentation": 1}
    syntax = uid.ExplicitVRLittleEndian
    a = decode_image(_dataset_with(tmp_path / "ext.dcm", values, syntax, extended, **tags))
    b = decode_image(_dataset_with(tmp_path / "bare.dcm", values, syntax, bare, **tags))
    assert np.array_equal(a.pixels, b.pixels)
    assert np.array_equal(a.pixels, (values.astype(np.int32) + 2048).astype(a.pixels.dtype))


def test_a_file_without_a_transfer_syntax_is_read_as_pydicom_read_it(tmp_path: Path) -> None:
    ramp = _ramp(12, size=64)
    path = write_dicom(tmp_path / "ts.dcm", ramp)
    dataset = pydicom.dcmread(path)
    del dataset.file_meta.TransferSyntaxUID
    dataset.save_as(tmp_path / "nots.dcm", enforce_file_format=False)
    decoded = decode_image(tmp_path / "nots.dcm")
    assert decoded.bits == 12 and np.array_equal(decoded.pixels, ramp)
