"""``comoto predict --format dicom-sr``: one DICOM Structured Report per input, for PACS and viewers.

Each input image or DBT volume gets a Comprehensive 3D SR holding a TID 1500 Measurement Report (built with
highdicom). Every detection is one planar ROI group (TID 1410):

- the box as an image region, a closed SCOORD POLYLINE of 5 points (top-left, top-right, bottom-right,
  bottom-left, top-left again) in ``(column, row)`` pixel coordinates of the *stored* image: pixel ``i`` covers
  ``[i, i + 1)``, which is the DICOM SCOORD convention (0.0 is the outer edge of the first pixel). The official
  reader turns some DBT volumes by 180 degrees (docs/design.md section 1); predict's rows are in that official
  frame, so here the turn is undone for those volumes (:func:`stored_boxes`). Mammograms are never turned.
- for a DBT volume the referenced frame number: slice ``Z`` of the row is frame ``Z + 1`` (the turn is in-plane,
  the slice order is the file's);
- the detector's score (0 to 1) as the measurement "Certainty of Finding" (DCM 111012), unit "no units";
- the algorithm identification: name "CoMoTo CLI", version ``comoto_cli.__version__``, and as its parameter the
  SHA-256 of the checkpoint file; the finding type "Lesion", and the finding site "Breast" with the view's
  laterality when it is known.

Groups come in the rows' order (best first), tracking identifiers "detection 1", "detection 2", ... An input
without detections still gets its report, with an empty measurement list: it was read and nothing was found.
Patient and study come from the source image (the SR is part of that study); the SRs of one study written by one
run share one new series. Files are named after their inputs as overlays are (``<path below the common
folder>.sr.dcm``); :func:`comoto_cli.inference.formats.write_folder` makes the set appear all at once.
"""

from __future__ import annotations

import warnings
from pathlib import Path

import highdicom as hd
import numpy as np
import pydicom
from pydicom.sr.codedict import codes
from pydicom.uid import generate_uid

from comoto_cli.errors import InputDataError
from comoto_cli.inference.formats import PredictRun
from comoto_cli.inference.predict import InputPrediction, overlay_names
from comoto_cli.transforms.geometry import hflip_boxes, vflip_boxes, xywh_to_xyxy

SR_SUFFIX = ".sr.dcm"
SERIES_NUMBER = 9901  # the SR series within the source study; a number unlikely to be an acquisition's
SERIES_DESCRIPTION = "CoMoTo CLI lesion detections"
# One UID for the software as an observer device, the same in every run and on every machine.
DEVICE_UID = generate_uid(entropy_srcs=["CoMoTo CLI", "device observer"])
SCORE_CONCEPT = codes.DCM.CertaintyOfFinding
# Patient and study attributes highdicom copies from the source; type 2 in the image IODs (present, maybe empty),
# but files in the wild omit some of them.
_COPIED = ("PatientID", "PatientName", "PatientBirthDate", "PatientSex", "AccessionNumber", "StudyID", "StudyDate",
           "StudyTime", "ReferringPhysicianName")


def stored_boxes(rows: dict[str, np.ndarray], image_rows: int, image_cols: int, flipped: bool) -> np.ndarray:
    """Official-frame DBTex rows (X, Y, Width, Height) -> (N, 4) xyxy boxes in the stored pixel frame, inside the
    image. ``flipped``: the official reader turned this image by 180 degrees, which is undone (a turn by 180
    degrees is its own inverse: both in-plane axes reversed)."""
    xywh = np.stack([np.asarray(rows[name], dtype=np.float64) for name in ("X", "Y", "Width", "Height")], axis=1)
    boxes = xywh_to_xyxy(xywh)
    if flipped:
        boxes = vflip_boxes(hflip_boxes(boxes, image_cols), image_rows)
    return np.clip(boxes, 0.0, np.array([image_cols, image_rows, image_cols, image_rows], dtype=np.float64))


def rectangle(box_xyxy) -> np.ndarray:
    """A closed polyline of 5 ``(column, row)`` points around an xyxy box: SCOORD graphic data."""
    x0, y0, x1, y1 = (float(v) for v in box_xyxy)
    return np.array([[x0, y0], [x1, y0], [x1, y1], [x0, y1], [x0, y0]], dtype=np.float32)


def referenced_frames(z: int, depth: int, num_frames: int) -> list[int]:
    """1-based frame numbers of a DBTex row: slices ``Z`` to ``Z + Depth - 1`` (just ``Z`` when Depth is 0)."""
    first = int(z)
    return [index + 1 for index in range(first, first + max(int(depth), 1)) if 0 <= index < num_frames]


def read_source(path: Path) -> pydicom.Dataset:
    """The input's header (no pixels), with the patient and study attributes the SR copies present."""
    try:
        source = pydicom.dcmread(path, stop_before_pixels=True)
    except Exception as exc:  # noqa: BLE001 - pydicom raises several unrelated types for a bad file
        raise InputDataError(f"cannot read DICOM header: {type(exc).__name__}: {exc}", path=path) from None
    for keyword in ("SOPClassUID", "SOPInstanceUID", "StudyInstanceUID"):
        if not str(source.get(keyword, "") or "").strip():
            raise InputDataError(f"cannot reference this image in a DICOM SR: it has no {keyword}", path=path)
    for keyword in _COPIED:
        if keyword not in source:
            setattr(source, keyword, None)
    return source


def algorithm(run: PredictRun) -> hd.sr.AlgorithmIdentification:
    parameters = [f"checkpoint sha256 {run.checkpoint_sha256}"] if run.checkpoint_sha256 else None
    return hd.sr.AlgorithmIdentification(name=run.software, version=run.version, parameters=parameters)


def _laterality_site(view: str) -> list[hd.sr.FindingSite] | None:
    side = {"l": codes.SCT.Left, "r": codes.SCT.Right}.get(view[:1].lower())
    if side is None:
        return None
    return [hd.sr.FindingSite(anatomic_location=codes.SCT.Breast, laterality=side)]


def build_report(prediction: InputPrediction, source: pydicom.Dataset, run: PredictRun, *, series_uid: str,
                 instance_number: int) -> hd.sr.Comprehensive3DSR:
    """The SR of one input: ``source`` is its header (:func:`read_source`)."""
    path = prediction.path
    image_rows, image_cols = (int(v) for v in prediction.image_shape[-2:])
    if (int(source.get("Rows", 0) or 0), int(source.get("Columns", 0) or 0)) != (image_rows, image_cols):
        raise InputDataError(f"the header says {source.get('Rows')} x {source.get('Columns')} pixels but "
                             f"{image_rows} x {image_cols} were predicted on", path=path)
    num_frames = int(prediction.image_shape[0]) if prediction.kind == "dbt" else 1
    rows = prediction.rows
    boxes = stored_boxes(rows, image_rows, image_cols, prediction.flipped)
    algorithm_id = algorithm(run)
    sites = _laterality_site(prediction.keys.get("View", ""))
    groups = []
    for index, box in enumerate(boxes):
        frames = referenced_frames(rows["Z"][index], rows["Depth"][index], num_frames) if prediction.kind == "dbt" \
            else None
        if frames == []:
            raise InputDataError(f"detection {index + 1} is on slice {int(rows['Z'][index])}, outside the "
                                 f"{num_frames} frames", path=path)
        region = hd.sr.ImageRegion(
            graphic_type=hd.sr.GraphicTypeValues.POLYLINE, graphic_data=rectangle(box),
            source_image=hd.sr.SourceImageForRegion(
                referenced_sop_class_uid=source.SOPClassUID, referenced_sop_instance_uid=source.SOPInstanceUID,
                referenced_frame_numbers=frames))
        score = hd.sr.Measurement(name=SCORE_CONCEPT, value=float(rows["Score"][index]), unit=codes.UCUM.NoUnits,
                                  algorithm_id=algorithm_id)
        groups.append(hd.sr.PlanarROIMeasurementsAndQualitativeEvaluations(
            tracking_identifier=hd.sr.TrackingIdentifier(uid=generate_uid(), identifier=f"detection {index + 1}"),
            referenced_region=region, finding_type=codes.SCT.Lesion, algorithm_id=algorithm_id,
            finding_sites=sites, measurements=[score]))
    observer = hd.sr.ObserverContext(
        observer_type=codes.DCM.Device,
        observer_identifying_attributes=hd.sr.DeviceObserverIdentifyingAttributes(
            uid=DEVICE_UID, name=run.software, model_name=run.software))
    report = hd.sr.MeasurementReport(
        observation_context=hd.sr.ObservationContext(observer_device_context=observer),
        procedure_reported=codes.SCT.Mammography, imaging_measurements=groups or None)
    return hd.sr.Comprehensive3DSR(
        evidence=[source], content=report, series_instance_uid=series_uid, series_number=SERIES_NUMBER,
        sop_instance_uid=generate_uid(), instance_number=instance_number, manufacturer=run.software,
        is_complete=True, series_description=SERIES_DESCRIPTION)


def sr_names(paths: list[Path]) -> list[str]:
    """Unique file names, one per input: the overlays' names (the path below the inputs' common folder) with
    :data:`SR_SUFFIX`."""
    return [name[: -len(".png")] + SR_SUFFIX for name in overlay_names(paths)]


def write_dicom_sr(folder: Path, predictions: list[InputPrediction], run: PredictRun) -> list[Path]:
    """The folder writer of ``--format dicom-sr``: one SR per input into ``folder`` (a staging folder: see
    :func:`comoto_cli.inference.formats.write_folder`). Returns the files written."""
    folder = Path(folder)
    series: dict[str, list] = {}  # study UID -> [series UID, instances so far]
    written = []
    for prediction, name in zip(predictions, sr_names([p.path for p in predictions])):
        source = read_source(prediction.path)
        entry = series.setdefault(str(source.StudyInstanceUID), [generate_uid(), 0])
        entry[1] += 1
        try:
            with warnings.catch_warnings():
                # The patient's name is copied as the source has it; highdicom's advice on its form is not the
                # user's business here.
                warnings.filterwarnings("ignore", message=".*unlikely to represent the intended person name")
                report = build_report(prediction, source, run, series_uid=entry[0], instance_number=entry[1])
        except (AttributeError, KeyError, TypeError, ValueError) as exc:  # highdicom's checks of the source header
            reason = " ".join(str(exc).split())
            raise InputDataError(f"cannot write a DICOM SR for this input: {type(exc).__name__}: {reason}",
                                 path=prediction.path) from None
        target = folder / name
        report.save_as(target, enforce_file_format=True)
        written.append(target)
    return written
