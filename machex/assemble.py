"""One record in, one finished sample out: the work a build worker does per image.

``build_sample`` runs in worker processes (through ``build_in_worker``): it reads and
processes the pixels, maps the boxes and assembles the sample's JSON and manifest rows. It
never raises for a bad image: it returns a ``Failure`` so the build records it and carries
on.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

from machex.imaging import (
    ImageDecodeError,
    PixelOptions,
    ProcessedImage,
    map_box,
    process_image,
)
from machex.imaging.memory import keep_freed_memory
from machex.records import FINDINGS, Failure, ImageRecord, ReportChoice

DEFAULT_REPORT_CHOICE = ReportChoice()


@dataclass(frozen=True)
class BuiltSample:
    """A sample ready for its shard, with its rows for every manifest table except images
    (whose shard position is known only when the writer adds it)."""

    key: str
    image_member: str
    image_bytes: bytes
    json_bytes: bytes
    image_row: dict[str, object]
    label_row: dict[str, object]
    box_rows: list[dict[str, object]] = field(default_factory=list)
    reader_label_rows: list[dict[str, object]] = field(default_factory=list)


def build_in_worker(
    record: ImageRecord,
    options: PixelOptions,
    root: Path,
    report_choice: ReportChoice = DEFAULT_REPORT_CHOICE,
) -> BuiltSample | Failure:
    """``build_sample`` in a process that builds images: it keeps freed image buffers for
    the next image (``keep_freed_memory``, set once per process). Defined here, beside
    ``build_sample``, so that a worker unpickling it imports no more than the pipeline."""
    keep_freed_memory()
    return build_sample(record, options, root, report_choice)


def build_sample(
    record: ImageRecord,
    options: PixelOptions,
    root: Path,
    report_choice: ReportChoice = DEFAULT_REPORT_CHOICE,
) -> BuiltSample | Failure:
    """Process one record; a bad or missing file becomes a ``Failure``.

    ``root`` is the dataset root, to name where a missing file was expected."""
    if record.path is None:
        expected = str(Path(root) / record.source_key)
        return _failure(record, "FileNotFoundError", f"{expected} is not on disk", expected)
    try:
        processed = process_image(Path(record.path), options, window=record.window)
    except ImageDecodeError as error:
        return _failure(record, type(error).__name__, str(error))
    except Exception as error:  # noqa: BLE001 - one odd file must never end a long build
        return _failure(record, type(error).__name__, f"unexpected: {error}")
    return _assemble(record, processed, options, report_choice)


def _failure(
    record: ImageRecord, error_type: str, message: str, path: str | None = None
) -> Failure:
    return Failure(
        key=record.key,
        source=record.source,
        source_key=record.source_key,
        path=path or record.path,
        error_type=error_type,
        message=message,
    )


def _box_rows(record: ImageRecord, processed: ProcessedImage) -> list[dict[str, object]]:
    rows = []
    for box in record.boxes:
        # Rescale from the frame the source used to the decoded image, then into the output.
        frame_w, frame_h = box.frame or (processed.orig_width, processed.orig_height)
        sx, sy = processed.orig_width / frame_w, processed.orig_height / frame_h
        mapped = map_box(
            box.x * sx, box.y * sy, box.width * sx, box.height * sy, processed.crop_box
        )
        if mapped is None:
            continue  # entirely outside the centre crop
        rows.append(
            {
                "key": record.key,
                "label": box.label,
                "finding": box.finding,
                "x": mapped.x,
                "y": mapped.y,
                "width": mapped.width,
                "height": mapped.height,
                "clipped": mapped.clipped,
                "orig_x": box.x,
                "orig_y": box.y,
                "orig_width": box.width,
                "orig_height": box.height,
                "frame_width": frame_w,
                "frame_height": frame_h,
                "reader": box.reader,
            }
        )
    return rows


def _assemble(
    record: ImageRecord,
    processed: ProcessedImage,
    options: PixelOptions,
    report_choice: ReportChoice,
) -> BuiltSample:
    box = processed.crop_box
    encoding = options.encoding
    extras = record.extras | ({"dicom": processed.header} if processed.header else {})
    box_rows = _box_rows(record, processed)
    reader_rows = [
        {"key": record.key, "reader": r.reader, "label": r.label, "finding": r.finding}
        for r in record.reader_labels
    ]
    member = f"{record.key}.{encoding.extension}"
    common: dict[str, object] = {
        "key": record.key,
        "source_key": record.source_key,
        "patient_id": record.patient_id,
        "study_id": record.study_id,
        "view": record.view,
        "split": record.split,
        # A DICOM header's allow-listed sex/age stand in where the metadata has none.
        "sex": record.sex or _header_text(processed.header, "sex"),
        "age": record.age if record.age is not None else processed.header.get("age"),
        "orig_width": processed.orig_width,
        "orig_height": processed.orig_height,
        "bits": processed.bits,
        "encoding": encoding.value,
    }
    image_row = common | {
        "member": member,
        "size": len(processed.data),
        "sha256": hashlib.sha256(processed.data).hexdigest(),
        "crop_x0": box.x0,
        "crop_y0": box.y0,
        "crop_x1": box.x1,
        "crop_y1": box.y1,
        "extras": json.dumps(extras, sort_keys=True),
        "boxes_outside": len(record.boxes) - len(box_rows),
    }
    labels = {f: record.labels.get(f) for f in FINDINGS}
    native = list(record.native_labels)
    metadata = common | {
        "source": record.source,
        "labels": labels,
        "native_labels": native,
        # The conditioning text (``--report-text``), and the whole report with its sections.
        "report": report_choice.text(record.report),
        "report_sections": asdict(record.report) if record.report else None,
        "boxes": [{k: v for k, v in row.items() if k != "key"} for row in box_rows],
        "boxes_outside": len(record.boxes) - len(box_rows),
        "reader_labels": [{k: v for k, v in row.items() if k != "key"} for row in reader_rows],
        "crop_box": list(box.as_tuple()),
        "intensity": processed.intensity,
        "compat": options.compat,
        "extras": extras,
    }
    return BuiltSample(
        key=record.key,
        image_member=member,
        image_bytes=processed.data,
        json_bytes=json.dumps(metadata, sort_keys=True, ensure_ascii=False).encode(),
        image_row=image_row,
        label_row={"key": record.key, **labels, "native_labels": native},
        box_rows=box_rows,
        reader_label_rows=reader_rows,
    )


def _header_text(header: dict[str, str | int | float], name: str) -> str | None:
    value = header.get(name)
    return str(value) if value not in (None, "") else None


def report_row(record: ImageRecord) -> dict[str, object]:
    """The ``reports`` row of the record's study (the record must have a report)."""
    assert record.report is not None
    return asdict(record.report)


def failure_row(failure: Failure) -> dict[str, object]:
    return {
        "key": failure.key,
        "source_key": failure.source_key,
        "path": failure.path,
        "error_type": failure.error_type,
        "message": failure.message,
    }


__all__ = [
    "BuiltSample",
    "PixelOptions",
    "build_in_worker",
    "build_sample",
    "failure_row",
    "report_row",
]
