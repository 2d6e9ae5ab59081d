"""BCS-DBT-size test volumes for ``make bench-full``: 64 frames of 2457 x 1996, uint16 with 12 bits stored, in the
BCS-DBT folder and CSV layout, JPEG 2000 lossless (as the release mostly is) or uncompressed.

The content is a plain phantom (a breast-shaped region with smooth texture, quantum-like noise and a few
bright blobs on the lesion slices), not the ``comoto synth`` phantom: rendering that at this size would take
longer than the benchmark itself. Noise matters for the measurement: a JPEG 2000 decoder's time grows with
the bit planes it must decode, so the noise level is that of a real reconstructed DBT slice (tens of levels).
Frames are encoded in parallel processes; the files are written once into the data folder and reused by later
runs (a stamp file records what was asked for).
"""

from __future__ import annotations

import csv
import json
import os
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

ROWS, COLS, FRAMES = 2457, 1996, 64
WINDOW = (2047.0, 4095.0)  # centre, width in stored values: the whole 12-bit range


@dataclass(frozen=True)
class VolumeSpec:
    patient: int
    view: str
    compressed: bool
    lesion_slice: int | None  # None: a normal volume
    frames: int = FRAMES


def _frame(seed: int, index: int, lesion: tuple[int, int, int] | None, view: str) -> np.ndarray:
    rng = np.random.default_rng([seed, index])
    yy = np.arange(ROWS, dtype=np.float32)[:, None]
    xx = np.arange(COLS, dtype=np.float32)[None, :]
    # Breast on the chest-wall side given by the view's laterality (the official flip rule reads that edge).
    depth = xx if view.startswith("l") else (COLS - 1 - xx)
    inside = ((yy - ROWS / 2) / (ROWS * 0.47)) ** 2 + (depth / (COLS * 0.85)) ** 2 < 1.0
    texture = 1500 + 350 * np.sin(xx / (70 + index)) * np.cos(yy / 110) + 200 * np.sin((xx + yy) / 37)
    image = np.where(inside, texture + rng.normal(0, 30, (ROWS, COLS)), 60 + rng.normal(0, 4, (ROWS, COLS)))
    if lesion is not None and abs(index - lesion[0]) <= 3:
        _, cy, cx = lesion
        blob = np.exp(-(((yy - cy) ** 2 + (xx - cx) ** 2) / (2 * 40.0**2)))
        image = image + 900 * blob * (1 - abs(index - lesion[0]) / 4)
    return np.clip(image, 0, 4095).astype(np.uint16)


def _encode(args: tuple[int, int, tuple[int, int, int] | None, str]) -> bytes:
    from openjpeg.utils import encode_array

    seed, index, lesion, view = args
    return encode_array(_frame(seed, index, lesion, view), bits_stored=12, photometric_interpretation=2,
                        use_mct=False)


def _write_volume(path: Path, spec: VolumeSpec, seed: int, pool: ProcessPoolExecutor) -> None:
    from pydicom.encaps import encapsulate
    from pydicom.uid import JPEG2000Lossless

    from comoto_cli.synth.writer import write_dbt_dicom

    lesion = None if spec.lesion_slice is None else (spec.lesion_slice, ROWS // 2, COLS // 3)
    volume_seed = seed * 1000 + spec.patient * 10 + ("lcc", "lmlo", "rcc", "rmlo").index(spec.view)
    pid = f"DBT-P{spec.patient:05d}"
    if spec.compressed:
        frames = list(pool.map(_encode, [(volume_seed, i, lesion, spec.view) for i in range(spec.frames)]))
        stored = np.zeros((1, ROWS, COLS), np.uint16)  # header values only; the pixel data is replaced below
    else:
        stored = np.stack(list(pool.map(_frame, *zip(*[(volume_seed, i, lesion, spec.view)
                                                        for i in range(spec.frames)]))))
    temporary = path.with_name(path.name + ".tmp")
    write_dbt_dicom(temporary, stored, seed=seed, patient_id=pid, study_instance_uid=f"1.2.826.0.1.{spec.patient}",
                    series_instance_uid=f"1.2.826.0.2.{spec.patient}.{len(spec.view)}", series_number=1,
                    view=spec.view, window=WINDOW, compress=False)
    if spec.compressed:
        import pydicom

        ds = pydicom.dcmread(temporary)
        ds.NumberOfFrames = spec.frames
        ds.PixelData = encapsulate(frames, has_bot=True)
        ds["PixelData"].VR = "OB"
        ds.file_meta.TransferSyntaxUID = JPEG2000Lossless
        ds.save_as(temporary, enforce_file_format=True)
    os.replace(temporary, path)


def write_fullsize_dataset(root: Path, specs: list[VolumeSpec], seed: int = 0, workers: int | None = None) -> Path:
    """Write (or reuse) the volumes of ``specs`` under ``root`` in the BCS-DBT layout; returns ``root``."""
    root = Path(root)
    stamp = root / "stamp.json"
    wanted = {"seed": seed, "rows": ROWS, "cols": COLS, "frames": FRAMES, "volumes": [asdict(s) for s in specs]}
    if stamp.is_file() and json.loads(stamp.read_text()) == wanted:
        return root
    root.mkdir(parents=True, exist_ok=True)
    paths, labels, boxes = [], [], []
    with ProcessPoolExecutor(max_workers=workers or os.cpu_count()) as pool:
        for spec in specs:
            pid = f"DBT-P{spec.patient:05d}"
            study = f"DBT-S{spec.patient:05d}"
            relative = f"Breast-Cancer-Screening-DBT/{pid}/01-01-2000-{study}/1.000000-{spec.view}-{spec.patient}/1-1.dcm"
            _write_volume(root / relative, spec, seed, pool)
            paths.append([pid, study, spec.view, relative, relative])
            labels.append([pid, study, spec.view, int(spec.lesion_slice is None), 0, 0,
                           int(spec.lesion_slice is not None)])
            if spec.lesion_slice is not None:
                boxes.append([pid, study, spec.view, spec.patient, spec.lesion_slice, COLS // 3 - 60, ROWS // 2 - 60,
                              120, 120, "cancer", 0, spec.frames])
    tables = {
        "BCS-DBT-file-paths-train-v2.csv": (["PatientID", "StudyUID", "View", "descriptive_path", "classic_path"], paths),
        "BCS-DBT-labels-train-v2.csv": (["PatientID", "StudyUID", "View", "Normal", "Actionable", "Benign", "Cancer"],
                                        labels),
        "BCS-DBT-boxes-train-v2.csv": (["PatientID", "StudyUID", "View", "Subject", "Slice", "X", "Y", "Width",
                                        "Height", "Class", "AD", "VolumeSlices"], boxes),
    }
    for name, (header, rows) in tables.items():
        with open(root / name, "w", newline="") as handle:
            writer = csv.writer(handle)
            writer.writerow(header)
            writer.writerows(rows)
    stamp.write_text(json.dumps(wanted))
    return root


if __name__ == "__main__":
    import sys
    import time

    started = time.perf_counter()
    write_fullsize_dataset(Path(sys.argv[1]), [VolumeSpec(1, "lcc", True, 30), VolumeSpec(2, "rmlo", True, None),
                                               VolumeSpec(3, "lcc", False, None)])
    print(f"{time.perf_counter() - started:.1f} s")
