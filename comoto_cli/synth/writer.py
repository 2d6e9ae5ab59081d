"""DICOM writing for ``comoto synth``: BCS-DBT-like multi-frame tomosynthesis objects, VinDr-like mammograms.

Every value that would normally come from the clock or a random generator (UIDs, dates) is derived from the
seed, so the same seed writes byte-identical files.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.sequence import Sequence
from pydicom.uid import ExplicitVRLittleEndian, JPEG2000Lossless, generate_uid

BREAST_TOMOSYNTHESIS_STORAGE = "1.2.840.10008.5.1.4.1.1.13.1.3"
DIGITAL_MAMMOGRAPHY_PRESENTATION_STORAGE = "1.2.840.10008.5.1.4.1.1.1.2"


def synth_uid(seed: int, *parts: object) -> str:
    """A valid DICOM UID that depends only on the seed and ``parts`` (pydicom's hash-based generator)."""
    return generate_uid(entropy_srcs=["comoto-synth", str(seed), *map(str, parts)])


def _dataset(sop_class: str, sop_instance: str) -> Dataset:
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.MediaStorageSOPClassUID = sop_class
    ds.file_meta.MediaStorageSOPInstanceUID = sop_instance
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.SOPClassUID = sop_class
    ds.SOPInstanceUID = sop_instance
    ds.SpecificCharacterSet = "ISO_IR 100"
    ds.Modality = "MG"
    ds.Manufacturer = "COMOTO SYNTH (phantom)"
    ds.BodyPartExamined = "BREAST"
    ds.StudyDate = ds.SeriesDate = ds.ContentDate = "20000101"
    ds.StudyTime = ds.SeriesTime = ds.ContentTime = "000000"
    ds.PatientBirthDate = ""
    ds.PatientSex = "F"
    ds.AccessionNumber = ""
    ds.ReferringPhysicianName = ""
    return ds


def _set_pixels(ds: Dataset, pixels: np.ndarray, bits_stored: int, photometric: str) -> None:
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = photometric
    ds.Rows, ds.Columns = int(pixels.shape[-2]), int(pixels.shape[-1])
    ds.BitsAllocated = 16
    ds.BitsStored = bits_stored
    ds.HighBit = bits_stored - 1
    ds.PixelRepresentation = 0
    ds.PixelData = np.ascontiguousarray(pixels, dtype="<u2").tobytes()


def _save(ds: Dataset, path: Path, compress: bool) -> None:
    if compress:
        # generate_instance_uid=False: a fresh random UID would break byte-identical output
        ds.compress(JPEG2000Lossless, generate_instance_uid=False)
    path.parent.mkdir(parents=True, exist_ok=True)
    ds.save_as(os.fspath(path), enforce_file_format=True)


def write_dbt_dicom(
    path: Path,
    stored: np.ndarray,
    *,
    seed: int,
    patient_id: str,
    study_instance_uid: str,
    series_instance_uid: str,
    series_number: int,
    view: str,
    window: tuple[float, float],
    compress: bool,
) -> None:
    """One BCS-DBT-like volume: Breast Tomosynthesis Image Storage, multi-frame, 12-bit in 16, MONOCHROME2,
    with the VOI window where the official reader looks for it (SharedFunctionalGroupsSequence[0] ->
    FrameVOILUTSequence[0])."""
    sop_instance = synth_uid(seed, "dbt-sop", patient_id, view)
    ds = _dataset(BREAST_TOMOSYNTHESIS_STORAGE, sop_instance)
    ds.PatientID = patient_id
    ds.PatientName = patient_id
    ds.StudyInstanceUID = study_instance_uid
    ds.SeriesInstanceUID = series_instance_uid
    ds.StudyID = patient_id[-5:]
    ds.SeriesNumber = series_number
    ds.InstanceNumber = 1
    ds.ImageType = ["DERIVED", "PRIMARY", "TOMOSYNTHESIS", "NONE"]
    ds.ImageLaterality = view[0].upper()
    ds.SeriesDescription = f"{view[0].upper()} {view[1:].upper()} Tomosynthesis Reconstruction"
    ds.PresentationIntentType = "FOR PRESENTATION"
    ds.NumberOfFrames = int(stored.shape[0])
    ds.FrameOfReferenceUID = synth_uid(seed, "dbt-frame", patient_id, view)
    voi = Dataset()
    voi.WindowCenter = f"{window[0]:g}"
    voi.WindowWidth = f"{window[1]:g}"
    measures = Dataset()
    measures.PixelSpacing = ["0.085", "0.085"]
    measures.SliceThickness = "1"
    shared = Dataset()
    shared.FrameVOILUTSequence = Sequence([voi])
    shared.PixelMeasuresSequence = Sequence([measures])
    ds.SharedFunctionalGroupsSequence = Sequence([shared])
    _set_pixels(ds, stored, 12, "MONOCHROME2")
    _save(ds, path, compress)


def write_mammo_dicom(
    path: Path,
    stored: np.ndarray,
    *,
    seed: int,
    patient_id: str,
    study_instance_uid: str,
    series_instance_uid: str,
    sop_key: str,
    laterality: str,
    view_position: str,
    bits_stored: int,
    photometric: str,
    window: tuple[float, float] | None,
    voi_lut: np.ndarray | None,
    compress: bool,
) -> None:
    """One VinDr-like mammogram: Digital Mammography X-Ray Image Storage - For Presentation, single frame,
    with either Window Center/Width tags or a VOI LUT Sequence (both in stored-value units)."""
    ds = _dataset(DIGITAL_MAMMOGRAPHY_PRESENTATION_STORAGE, synth_uid(seed, "mammo-sop", sop_key))
    ds.PatientID = patient_id
    ds.PatientName = ""
    ds.StudyInstanceUID = study_instance_uid
    ds.SeriesInstanceUID = series_instance_uid
    ds.StudyID = ""
    ds.SeriesNumber = 1
    ds.InstanceNumber = 1
    ds.ImageType = ["ORIGINAL", "PRIMARY", "", ""]
    ds.ImageLaterality = laterality
    ds.Laterality = laterality
    ds.ViewPosition = view_position
    ds.PresentationIntentType = "FOR PRESENTATION"
    ds.ImagerPixelSpacing = ["0.085", "0.085"]
    ds.PixelSpacing = ["0.085", "0.085"]
    ds.RescaleIntercept = "0"
    ds.RescaleSlope = "1"
    ds.RescaleType = "US"
    if window is not None:
        ds.WindowCenter = f"{window[0]:g}"
        ds.WindowWidth = f"{window[1]:g}"
        ds.VOILUTFunction = "LINEAR"
    if voi_lut is not None:
        item = Dataset()
        item.add_new(0x00283002, "US", [len(voi_lut) % 65536, 0, 16])  # LUTDescriptor
        item.LUTExplanation = "COMOTO SYNTH SIGMOID"
        item.add_new(0x00283006, "OW", np.asarray(voi_lut, dtype="<u2").tobytes())  # LUTData
        ds.VOILUTSequence = Sequence([item])
    _set_pixels(ds, stored, bits_stored, photometric)
    _save(ds, path, compress)
