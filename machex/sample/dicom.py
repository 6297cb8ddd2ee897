"""A small, deterministic DICOM writer for tests and miniature datasets.

``write_dicom`` turns one 2-D uint8/uint16 array into a single-frame grayscale Digital
X-Ray (or CR) file: no dates or times, UIDs derived from the file name, and (for ``.gz``
names) gzip with ``mtime=0``, so the same arguments always give the same bytes. Header
fields can be set to lie on purpose (``bits_stored``), which is what decoder tests need.
The pixels are synthetic; nothing here comes from a real patient.
"""

from __future__ import annotations

import gzip
import io
from pathlib import Path

import numpy as np

#: transfer_syntax name -> UID name in ``pydicom.uid``.
TRANSFER_SYNTAXES = {
    "explicit_le": "ExplicitVRLittleEndian",
    "rle": "RLELossless",  # pydicom's own encoder
    "jpeg2000": "JPEG2000Lossless",  # needs pylibjpeg-openjpeg
}

#: Modality -> SOP Class UID (Digital X-Ray for presentation; Computed Radiography).
SOP_CLASSES = {"DX": "1.2.840.10008.5.1.4.1.1.1.1", "CR": "1.2.840.10008.5.1.4.1.1.1"}


def write_dicom(
    path: Path,
    pixels: np.ndarray,
    *,
    photometric: str = "MONOCHROME2",
    bits_stored: int | None = None,
    rescale: tuple[float, float] | None = None,
    window: tuple[float, float] | None = None,
    voi_lut: np.ndarray | None = None,
    view_position: str | None = "PA",
    sex: str | None = None,
    age: str | None = None,
    transfer_syntax: str = "explicit_le",
    modality: str = "DX",
    extra: dict[str, object] | None = None,
) -> Path:
    """Write ``pixels`` (2-D uint8 or uint16) as one DICOM file at ``path``; return ``path``.

    - ``photometric``: the PhotometricInterpretation tag, written as given; the stored
      values are not changed (to write a MONOCHROME1 twin, pass ``2**b - 1 - x``).
    - ``bits_stored``: what the header claims (default: the bits of the data's maximum,
      8 for uint8). A smaller value is written as is: a misstated header on purpose.
    - ``rescale``: (slope, intercept) -> RescaleSlope / RescaleIntercept.
    - ``window``: (centre, width) -> WindowCenter / WindowWidth.
    - ``voi_lut``: a 1-D uint16 table -> one VOILUTSequence item (first mapped value 0,
      output depth = the bits of the table's maximum, at least 8).
    - ``view_position``, ``sex`` ("M"/"F"/"O"), ``age`` ("045Y"): the tags of those names.
    - ``transfer_syntax``: ``explicit_le``, ``rle`` or ``jpeg2000`` (lossless).
    - ``modality``: ``DX`` or ``CR`` (sets Modality and the SOP Class).
    - ``extra``: any other DICOM keyword -> value, e.g. ``{"PatientName": "X"}``.

    A ``.gz`` suffix writes the file gzip-compressed (``mtime=0``, no name in the header).
    """
    from pydicom import uid
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.valuerep import DSfloat

    path = Path(path)
    pixels = np.ascontiguousarray(pixels)
    if pixels.ndim != 2 or pixels.dtype not in (np.uint8, np.uint16):
        raise ValueError(
            f"pixels must be a 2-D uint8 or uint16 array, got {pixels.dtype} {pixels.shape}"
        )
    if transfer_syntax not in TRANSFER_SYNTAXES:
        raise ValueError(f"transfer_syntax must be one of {sorted(TRANSFER_SYNTAXES)}")
    if modality not in SOP_CLASSES:
        raise ValueError(f"modality must be one of {sorted(SOP_CLASSES)}")
    allocated = pixels.itemsize * 8
    peak = int(pixels.max()) if pixels.size else 0
    true_bits = 8 if allocated == 8 else max(1, peak.bit_length())
    name = path.name

    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = SOP_CLASSES[modality]
    meta.MediaStorageSOPInstanceUID = uid.generate_uid(entropy_srcs=[name])
    meta.TransferSyntaxUID = uid.ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID = meta.MediaStorageSOPClassUID
    ds.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
    ds.StudyInstanceUID = uid.generate_uid(entropy_srcs=[name, "study"])
    ds.SeriesInstanceUID = uid.generate_uid(entropy_srcs=[name, "series"])
    ds.Modality = modality
    if view_position is not None:
        ds.ViewPosition = view_position
    if sex is not None:
        ds.PatientSex = sex
    if age is not None:
        ds.PatientAge = age
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = photometric
    ds.Rows, ds.Columns = pixels.shape
    ds.BitsAllocated = allocated
    ds.BitsStored = true_bits
    ds.HighBit = true_bits - 1
    ds.PixelRepresentation = 0
    if rescale is not None:
        ds.RescaleSlope = DSfloat(rescale[0], auto_format=True)
        ds.RescaleIntercept = DSfloat(rescale[1], auto_format=True)
        ds.RescaleType = "US"
    if window is not None:
        ds.WindowCenter = DSfloat(window[0], auto_format=True)
        ds.WindowWidth = DSfloat(window[1], auto_format=True)
    if voi_lut is not None:
        ds.VOILUTSequence = [_voi_lut_item(np.asarray(voi_lut))]
    for keyword, value in (extra or {}).items():
        setattr(ds, keyword, value)

    ds.PixelData = pixels.astype(pixels.dtype.newbyteorder("<"), copy=False).tobytes()
    if transfer_syntax != "explicit_le":
        syntax = getattr(uid, TRANSFER_SYNTAXES[transfer_syntax])
        ds.compress(syntax, generate_instance_uid=False)
    if bits_stored is not None:  # the claim, set after encoding with the truth
        ds.BitsStored = bits_stored
        ds.HighBit = bits_stored - 1

    buffer = io.BytesIO()
    ds.save_as(buffer, enforce_file_format=True)
    data = buffer.getvalue()
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.name.lower().endswith(".gz"):
        packed = io.BytesIO()
        with gzip.GzipFile(filename="", mode="wb", fileobj=packed, mtime=0) as handle:
            handle.write(data)
        data = packed.getvalue()
    path.write_bytes(data)
    return path


def _voi_lut_item(table: np.ndarray) -> object:
    """One VOILUTSequence item holding ``table`` (uint16, first mapped value 0)."""
    from pydicom.dataelem import DataElement
    from pydicom.dataset import Dataset

    if table.ndim != 1 or not 0 < table.size <= 65536:
        raise ValueError("voi_lut must be a 1-D table of 1..65536 entries")
    table = table.astype("<u2")
    # PS3.3 C.11.2.1.2.1 allows 8 or 10..16 bits per entry.
    depth = 8 if int(table.max()) < 256 else max(10, int(table.max()).bit_length())
    item = Dataset()
    # Entries 65536 are written as 0 (PS3.3 C.11.2.1.1); first mapped value 0; output bits.
    item.add(DataElement(0x00283002, "US", [table.size % 65536, 0, depth]))
    item.add(DataElement(0x00283006, "OW", table.tobytes()))
    item.LUTExplanation = "SYNTHETIC"
    return item


__all__ = ["SOP_CLASSES", "TRANSFER_SYNTAXES", "write_dicom"]
