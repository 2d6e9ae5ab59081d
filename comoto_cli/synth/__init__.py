"""``comoto synth``: a deterministic synthetic dataset in the real BCS-DBT and VinDr-Mammo layouts.

Layout written under OUT (docs/design.md sections 6 and 7)::

    OUT/dbt/Breast-Cancer-Screening-DBT/DBT-P00001/01-01-2000-DBT-S00001-.../<series>/1-1.dcm
    OUT/dbt/BCS-DBT-file-paths-train-v2.csv   PatientID, StudyUID, View, descriptive_path, classic_path
    OUT/dbt/BCS-DBT-labels-train-v2.csv       PatientID, StudyUID, View, Normal, Actionable, Benign, Cancer
    OUT/dbt/BCS-DBT-boxes-train-v2.csv        PatientID, StudyUID, View, Subject, Slice, X, Y, Width, Height,
                                              Class, AD, VolumeSlices (official reader frame)
    OUT/mammo/images/<study_id>/<image_id>.dicom
    OUT/mammo/finding_annotations.csv         VinDr-Mammo columns, boxes in the stored pixel frame
    OUT/mammo/breast-level_annotations.csv
    OUT/truth.json                            phantom ground truth for tests (NOT part of the real layouts)

As in the real BCS-DBT download, the files lie at ``descriptive_path``; ``classic_path`` (UID folders) names
the other download layout and does not exist. The CSV ``StudyUID`` is the TCIA study label (``DBT-S00001``),
as in the real CSVs, not the DICOM StudyInstanceUID. The output folder is built as a temporary sibling and
renamed into place, so a killed run leaves no half-written dataset.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import shutil
import tempfile
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from comoto_cli.config import SynthConfig
from comoto_cli.data.tables import BCS_DBT_BOXES_COLUMNS as BOXES_COLUMNS
from comoto_cli.data.tables import BCS_DBT_FILE_PATHS_COLUMNS as FILE_PATHS_COLUMNS
from comoto_cli.data.tables import BCS_DBT_LABELS_COLUMNS as LABELS_COLUMNS
from comoto_cli.data.tables import DBT_VIEWS
from comoto_cli.data.tables import VINDR_BREAST_COLUMNS as BREAST_COLUMNS
from comoto_cli.data.tables import VINDR_FINDING_COLUMNS as FINDING_COLUMNS
from comoto_cli.errors import ComotoError, UsageError
from comoto_cli.synth.phantom import DbtParams, MammoParams, dbt_volume, mammogram
from comoto_cli.synth.writer import synth_uid, write_dbt_dicom, write_mammo_dicom
from comoto_cli.utils.atomic import ensure_writable_dir
from comoto_cli.utils.csvio import write_csv_atomic

__all__ = ["DBT_VIEWS", "PRESETS", "Preset", "generate_dataset"]

DBT_COLLECTION = "Breast-Cancer-Screening-DBT"
FILE_PATHS_CSV = "BCS-DBT-file-paths-train-v2.csv"
LABELS_CSV = "BCS-DBT-labels-train-v2.csv"
BOXES_CSV = "BCS-DBT-boxes-train-v2.csv"


@dataclass(frozen=True)
class Preset:
    mammograms: int
    volumes: int
    dbt_shape: tuple[int, int]  # rows, cols
    slices: tuple[int, int]  # min, max (inclusive)
    mammo_shape: tuple[int, int]
    lowres: int


# Real DBT is ~2000 px wide with masses 50-300 px and the DBTex scorer has a 100 px floor, so demo
# volumes stay >= 600 px wide (the metric is not trivial); tiny is for tests only.
PRESETS: dict[str, Preset] = {
    "tiny": Preset(12, 8, (320, 256), (10, 12), (320, 256), 2),
    "demo": Preset(240, 64, (768, 608), (16, 20), (640, 512), 2),
    "bench": Preset(1000, 240, (1024, 800), (20, 28), (1024, 800), 4),
}


@dataclass(frozen=True)
class DomainGap:
    """How the two acquisitions differ (``synth.domain_gap``; the same for every method, never tuned per method).

    ``sweep_projections``: DBT out-of-plane model (0: isotropic blur; N: limited-angle shift-and-add of N projections
    over +- 7.5 degrees along the sweep, ``DbtParams``). The mammogram's pixel is ``mammo_pixel`` times DBT's and its
    field ``mammo_field_width`` times as wide with rows / cols = ``mammo_aspect`` (None: the preset's mammogram
    shape, one pixel size for both); the breast keeps its physical size, so it fills less of a taller field."""

    sweep_projections: int = 0
    mammo_pixel: float = 1.0
    mammo_field_width: float = 1.0
    mammo_aspect: float | None = None


DOMAIN_GAPS: dict[str, DomainGap] = {
    "basic": DomainGap(),
    # BCS-DBT: 2457 x 1996 at about 0.1 mm (246 x 200 mm), 15 projections over 15 degrees; a full-field mammogram
    # such as 4664 x 3064 at about 0.07 mm covers 326 x 214 mm: finer pixels, a field 7 % wider and 1.52 tall.
    "realistic": DomainGap(sweep_projections=15, mammo_pixel=0.7, mammo_field_width=1.07, mammo_aspect=1.52),
}


def mammo_geometry(gap: DomainGap, preset: Preset) -> tuple[int, int, int]:
    """(rows, cols, breast_rows) of a mammogram: the field, and the rows of it that a DBT field's height covers
    (where the breast is drawn; the rest is air)."""
    if gap.mammo_aspect is None:
        return preset.mammo_shape[0], preset.mammo_shape[1], preset.mammo_shape[0]
    cols = round(preset.dbt_shape[1] * gap.mammo_field_width / gap.mammo_pixel)
    rows = round(cols * gap.mammo_aspect)
    return rows, cols, min(rows, round(preset.dbt_shape[0] / gap.mammo_pixel))


# ---------------------------------------------------------------------------------------------- planning


def _rng(seed: int, *stream: int) -> np.random.Generator:
    return np.random.default_rng(np.random.SeedSequence([seed, *stream]))


def _exact_flags(rng: np.random.Generator, n: int, count: int) -> np.ndarray:
    """Exactly ``count`` of ``n`` flags set, at random positions (so small datasets still get every case)."""
    flags = np.zeros(n, dtype=bool)
    flags[rng.permutation(n)[: max(0, min(n, count))]] = True
    return flags


def _hexid(seed: int, *parts: object) -> str:
    return hashlib.md5(("comoto-synth:" + ":".join(map(str, (seed, *parts)))).encode()).hexdigest()


def _plan_dbt(seed: int, n_volumes: int, preset: Preset) -> list[dict[str, Any]]:
    rng = _rng(seed, 0, 1)
    n_patients = min(n_volumes, max(5, round(n_volumes / 2)))
    views_per_patient = np.ones(n_patients, dtype=int)
    for _ in range(n_volumes - n_patients):
        open_ = np.flatnonzero(views_per_patient < 4)
        views_per_patient[rng.choice(open_)] += 1
    labels = ["Normal"] * round(n_volumes / 3) + ["Actionable"] * round(0.06 * n_volumes)
    rest = n_volumes - len(labels)
    labels += ["Benign"] * round(0.4 * rest) + ["Cancer"] * (rest - round(0.4 * rest))
    labels = [labels[i] for i in rng.permutation(n_volumes)]
    rotated = _exact_flags(rng, n_volumes, max(1, round(n_volumes / 3)))
    compressed = _exact_flags(rng, n_volumes, max(1, round(n_volumes / 3)))
    tasks: list[dict[str, Any]] = []
    for p in range(n_patients):
        patient_id = f"DBT-P{p + 1:05d}"
        study = f"DBT-S{p + 1:05d}"
        views = sorted(rng.choice(DBT_VIEWS, size=views_per_patient[p], replace=False).tolist())
        study_folder = (
            f"01-01-2000-{study}-MAMMO screening digital bilateral-{int(rng.integers(10000, 99999))}"
        )
        for view in views:
            i = len(tasks)
            label = labels[i]
            if label in ("Benign", "Cancer"):
                n_lesions = 1 if rng.random() < 0.85 else 2
                p_spic = 0.6 if label == "Cancer" else 0.15
                kinds = ["spiculated" if rng.random() < p_spic else "mass" for _ in range(n_lesions)]
            else:
                kinds = []
            series_number = int(rng.integers(1000, 30000))
            series_folder = f"{series_number}.000000-NA-{int(rng.integers(10000, 99999))}"
            tasks.append(
                {
                    "index": i,
                    "seed": seed,
                    "patient_id": patient_id,
                    "study": study,
                    "view": view,
                    "label": label,
                    "kinds": kinds,
                    "calcs": int(rng.integers(0, 2)),
                    "slices": int(rng.integers(preset.slices[0], preset.slices[1] + 1)),
                    "rows": preset.dbt_shape[0],
                    "cols": preset.dbt_shape[1],
                    "lowres": preset.lowres,
                    "rotated": bool(rotated[i]),
                    "compressed": bool(compressed[i]),
                    "series_number": series_number,
                    "descriptive_path": f"{DBT_COLLECTION}/{patient_id}/{study_folder}/{series_folder}"
                    "/1-1.dcm",
                }
            )
    return tasks


def _plan_mammo(seed: int, n_images: int, preset: Preset) -> list[dict[str, Any]]:
    rng = _rng(seed, 0, 2)
    n_studies = math.ceil(n_images / 4)
    test_studies = _exact_flags(rng, n_studies, round(0.2 * n_studies) if n_studies >= 2 else 0)
    positive = _exact_flags(rng, n_images, round(0.45 * n_images))
    monochrome1 = _exact_flags(rng, n_images, n_images // 2)
    with_lut = _exact_flags(rng, n_images, max(1, round(0.4 * n_images)))
    compressed = _exact_flags(rng, n_images, max(1, round(0.3 * n_images)))
    tasks: list[dict[str, Any]] = []
    for s in range(n_studies):
        study_id = _hexid(seed, "study", s)
        density = int(rng.choice(4, p=[0.1, 0.4, 0.4, 0.1]))
        for laterality, view in [("L", "CC"), ("L", "MLO"), ("R", "CC"), ("R", "MLO")]:
            i = len(tasks)
            if i >= n_images:
                break
            kinds: list[str] = []
            if positive[i]:
                n = 1 if rng.random() < 0.8 else 2
                kinds = [
                    str(rng.choice(["mass", "spiculated", "calcification"], p=[0.45, 0.25, 0.3]))
                    for _ in range(n)
                ]
            tasks.append(
                {
                    "index": i,
                    "seed": seed,
                    "study_id": study_id,
                    "series_id": _hexid(seed, "series", i),
                    "image_id": _hexid(seed, "image", i),
                    "patient_id": f"VM{_hexid(seed, 'patient', s)[:10].upper()}",
                    "laterality": laterality,
                    "view": view,
                    "density": density,
                    "kinds": kinds,
                    "split": "test" if test_studies[s] else "training",
                    "rows": preset.mammo_shape[0],
                    "cols": preset.mammo_shape[1],
                    "lowres": preset.lowres,
                    "photometric": "MONOCHROME1" if monochrome1[i] else "MONOCHROME2",
                    "voi": "lut" if with_lut[i] else "window",
                    "compressed": bool(compressed[i]),
                    "bits": 14 if rng.random() < 0.3 else 12,
                    "normal_birads": str(rng.choice(["BI-RADS 1", "BI-RADS 2"])),
                }
            )
    return tasks


# ---------------------------------------------------------------------------------------------- workers


def _make_dbt(task: dict[str, Any], root: str) -> dict[str, Any]:
    """Render and write one DBT volume; returns what the CSVs and truth.json need (picklable)."""

    rng = _rng(task["seed"], 1, task["index"])
    volume, lesions, window = dbt_volume(
        rng,
        task["rows"],
        task["cols"],
        task["slices"],
        task["view"],
        task["kinds"],
        task["calcs"],
        DbtParams(lowres=task["lowres"], sweep_projections=task.get("sweep_projections", 0)),
    )
    stored = volume[:, ::-1, ::-1] if task["rotated"] else volume
    seed, pid = task["seed"], task["patient_id"]
    study_uid = synth_uid(seed, "dbt-study", pid)
    series_uid = synth_uid(seed, "dbt-series", pid, task["view"])
    write_dbt_dicom(
        Path(root) / "dbt" / task["descriptive_path"],
        stored,
        seed=seed,
        patient_id=pid,
        study_instance_uid=study_uid,
        series_instance_uid=series_uid,
        series_number=task["series_number"],
        view=task["view"],
        window=window,
        compress=task["compressed"],
    )
    return {
        "classic_path": f"{DBT_COLLECTION}/{pid}/{study_uid}/{series_uid}/1-1.dcm",
        "window": window,
        "lesions": [
            {
                "kind": les.kind,
                "x": round(les.x, 3),
                "y": round(les.y, 3),
                "slice": les.slice,
                "radius": round(les.radius, 3),
                "box": list(les.box),
                "amplitude": round(les.amplitude, 4),
            }
            for les in lesions
        ],
    }


def _in_taller_field(rng: np.random.Generator, image: np.ndarray, lesions: list, rows: int, view: str):
    """``image`` placed in a field ``rows`` tall, the rest air (an MLO's pectoral muscle stays at the top edge)."""
    top = 0 if view.upper() == "MLO" else int(rng.integers(0, rows - image.shape[0] + 1))
    field = np.clip(0.004 * rng.standard_normal((rows, image.shape[1]), dtype=np.float32), 0.0, 1.0)
    field[top:top + image.shape[0]] = image
    for lesion in lesions:
        x0, y0, x1, y1 = lesion.box
        lesion.y += top
        lesion.box = (x0, y0 + top, x1, y1 + top)
    return field, lesions


def _make_mammo(task: dict[str, Any], root: str) -> dict[str, Any]:

    rng = _rng(task["seed"], 2, task["index"])
    breast_rows = task.get("breast_rows", task["rows"])
    params = MammoParams(field_width=task.get("field_width", 1.0))
    image, lesions = mammogram(
        rng, breast_rows, task["cols"], task["laterality"], task["view"], task["density"], task["kinds"], params
    )
    if breast_rows < task["rows"]:
        image, lesions = _in_taller_field(rng, image, lesions, task["rows"], task["view"])
    top = 2 ** task["bits"] - 1
    values = np.rint(image * top * 0.97).astype(np.uint16)
    inside = values[image > 0.05]
    lo, hi = np.percentile(inside, [1.0, 99.5]) if inside.size else (0.0, float(top))
    centre, width = float(round((lo + hi) / 2)), float(max(2.0, round(hi - lo)))
    if task["photometric"] == "MONOCHROME1":  # stored inverted: low values are dense tissue
        values = (top - values).astype(np.uint16)
        centre = top - centre
    window, lut = None, None
    if task["voi"] == "lut":
        entries = np.arange(top + 1, dtype=np.float64)
        lut = np.rint(65535 / (1 + np.exp(-4 * (entries - centre) / width))).astype(np.uint16)
    else:
        window = (centre, width)
    seed = task["seed"]
    write_mammo_dicom(
        Path(root) / "mammo" / "images" / task["study_id"] / f"{task['image_id']}.dicom",
        values,
        seed=seed,
        patient_id=task["patient_id"],
        study_instance_uid=synth_uid(seed, "mammo-study", task["study_id"]),
        series_instance_uid=synth_uid(seed, "mammo-series", task["series_id"]),
        sop_key=task["image_id"],
        laterality=task["laterality"],
        view_position=task["view"],
        bits_stored=task["bits"],
        photometric=task["photometric"],
        window=window,
        voi_lut=lut,
        compress=task["compressed"],
    )
    return {
        "lesions": [
            {
                "kind": les.kind,
                "x": round(les.x, 3),
                "y": round(les.y, 3),
                "radius": round(les.radius, 3),
                "box": list(les.box),
                "amplitude": round(les.amplitude, 4),
            }
            for les in lesions
        ]
    }


def _run(job: tuple[str, dict[str, Any], str]) -> dict[str, Any]:
    kind, task, root = job
    return _make_dbt(task, root) if kind == "dbt" else _make_mammo(task, root)


# ---------------------------------------------------------------------------------------------- tables


_FINDING_BIRADS = {"mass": "BI-RADS 3", "spiculated": "BI-RADS 5", "calcification": "BI-RADS 4"}
_CATEGORY = {"mass": "['Mass']", "spiculated": "['Mass']", "calcification": "['Suspicious Calcification']"}
_DENSITY = ["DENSITY A", "DENSITY B", "DENSITY C", "DENSITY D"]


def _write_tables(
    root: Path,
    dbt: list[tuple[dict, dict]],
    mammo: list[tuple[dict, dict]],
    config: SynthConfig,
    preset: Preset,
) -> dict[str, Any]:
    paths, labels, boxes = [], [], []
    truth: dict[str, Any] = {
        "note": "Phantom ground truth written by `comoto synth` for tests; NOT part of the real BCS-DBT or "
        "VinDr-Mammo layouts. DBT lesion x, y, slice are in the official reader frame (continuous "
        "pixels, pixel i covers [i, i+1)); mammogram lesion x, y in the stored pixel frame.",
        "seed": config.seed,
        "size": config.size,
        "dbt": {},
        "mammo": {},
    }
    for task, result in dbt:
        key = (task["patient_id"], task["study"], task["view"])
        paths.append([*key, task["descriptive_path"], result["classic_path"]])
        labels.append(
            [*key, *(int(task["label"] == name) for name in ("Normal", "Actionable", "Benign", "Cancer"))]
        )
        lesion_class = "cancer" if task["label"] == "Cancer" else "benign"
        for lesion in result["lesions"]:
            x0, y0, x1, y1 = lesion["box"]
            boxes.append(
                [
                    *key,
                    int(key[0][-5:]),
                    lesion["slice"],
                    x0,
                    y0,
                    x1 - x0,
                    y1 - y0,
                    lesion_class,
                    0,
                    task["slices"],
                ]
            )
        truth["dbt"]["/".join(key)] = {
            "patient_id": key[0],
            "study_uid": key[1],
            "view": key[2],
            "label": task["label"],
            "rotated": task["rotated"],
            "compressed": task["compressed"],
            "slices": task["slices"],
            "rows": task["rows"],
            "columns": task["cols"],
            "window": list(result["window"]),
            "path": task["descriptive_path"],
            "lesions": [dict(lesion, **{"class": lesion_class}) for lesion in result["lesions"]],
        }
    findings, breasts = [], []
    n_findings = 0
    for task, result in mammo:
        kinds = [lesion["kind"] for lesion in result["lesions"]]
        birads = max([_FINDING_BIRADS[k] for k in kinds], default=task["normal_birads"])
        common = [
            task["study_id"],
            task["series_id"],
            task["image_id"],
            task["laterality"],
            task["view"],
            task["rows"],
            task["cols"],
            birads,
            _DENSITY[task["density"]],
        ]
        breasts.append([*common, task["split"]])
        for lesion in result["lesions"]:
            x0, y0, x1, y1 = lesion["box"]
            findings.append(
                [
                    *common,
                    _CATEGORY[lesion["kind"]],
                    _FINDING_BIRADS[lesion["kind"]],
                    f"{x0:.2f}",
                    f"{y0:.2f}",
                    f"{x1:.2f}",
                    f"{y1:.2f}",
                    task["split"],
                ]
            )
            n_findings += 1
        if not result["lesions"]:
            findings.append([*common, "['No Finding']", "", "", "", "", "", task["split"]])
        truth["mammo"][task["image_id"]] = {
            "study_id": task["study_id"],
            "laterality": task["laterality"],
            "view_position": task["view"],
            "photometric": task["photometric"],
            "voi": task["voi"],
            "compressed": task["compressed"],
            "bits_stored": task["bits"],
            "split": task["split"],
            "rows": task["rows"],
            "columns": task["cols"],
            "path": f"images/{task['study_id']}/{task['image_id']}.dicom",
            "lesions": result["lesions"],
        }
    write_csv_atomic(root / "dbt" / FILE_PATHS_CSV, FILE_PATHS_COLUMNS, paths)
    write_csv_atomic(root / "dbt" / LABELS_CSV, LABELS_COLUMNS, labels)
    write_csv_atomic(root / "dbt" / BOXES_CSV, BOXES_COLUMNS, boxes)
    write_csv_atomic(root / "mammo" / "finding_annotations.csv", FINDING_COLUMNS, findings)
    write_csv_atomic(root / "mammo" / "breast-level_annotations.csv", BREAST_COLUMNS, breasts)
    (root / "truth.json").write_text(json.dumps(truth, indent=1) + "\n", encoding="utf-8")
    return {
        "dbt_patients": len({t["patient_id"] for t, _ in dbt}),
        "dbt_volumes": len(dbt),
        "dbt_lesions": len(boxes),
        "dbt_normal_volumes": sum(t["label"] == "Normal" for t, _ in dbt),
        "dbt_rotated_volumes": sum(t["rotated"] for t, _ in dbt),
        "dbt_compressed_volumes": sum(t["compressed"] for t, _ in dbt),
        "dbt_shape": [preset.dbt_shape[0], preset.dbt_shape[1]],
        "mammo_studies": len({t["study_id"] for t, _ in mammo}),
        "mammograms": len(mammo),
        "mammo_findings": n_findings,
        "mammo_normal_images": sum(not r["lesions"] for _, r in mammo),
        "mammo_test_images": sum(t["split"] == "test" for t, _ in mammo),
        "mammo_shape": [mammo[0][0]["rows"], mammo[0][0]["cols"]] if mammo else list(preset.mammo_shape),
        "domain_gap": config.domain_gap,
    }


# ---------------------------------------------------------------------------------------------- entry point


def _check_destination(out: Path) -> None:
    if out.exists() and not out.is_dir():
        raise UsageError("output exists and is not a folder", path=out)
    if out.is_dir() and any(out.iterdir()):
        raise UsageError("output folder exists and is not empty; choose a new path or remove it", path=out)


def generate_dataset(
    out: Path, config: SynthConfig, progress: bool = True, workers: int | None = None
) -> dict:
    """Write the synthetic dataset to ``out`` (which must not exist or be empty) and return summary counts.

    Deterministic: the same ``config`` (seed, size, counts) writes byte-identical files whatever ``workers``
    is (default: one process per core, capped at 4; small datasets run in this process).
    """
    out = Path(out)
    _check_destination(out)
    preset = PRESETS[config.size]
    n_mammo = config.mammograms if config.mammograms is not None else preset.mammograms
    n_dbt = config.volumes if config.volumes is not None else preset.volumes
    gap = DOMAIN_GAPS[config.domain_gap]
    dbt_tasks = _plan_dbt(config.seed, n_dbt, preset)
    mammo_tasks = _plan_mammo(config.seed, n_mammo, preset)
    rows, cols, breast_rows = mammo_geometry(gap, preset)
    for task in dbt_tasks:
        task["sweep_projections"] = gap.sweep_projections
    for task in mammo_tasks:
        task.update(rows=rows, cols=cols, breast_rows=breast_rows, field_width=gap.mammo_field_width)

    ensure_writable_dir(out.parent)  # one line naming the file that blocks the path, if one does
    try:
        tmp = Path(tempfile.mkdtemp(prefix=f"{out.name}.tmp-", dir=out.parent))
    except OSError as exc:
        raise ComotoError(f"cannot create output folder: {exc.strerror or exc}", path=out) from None
    try:
        jobs = [("dbt", t, str(tmp)) for t in dbt_tasks] + [("mammo", t, str(tmp)) for t in mammo_tasks]
        results = _run_jobs(jobs, progress, workers)
        summary = _write_tables(
            tmp,
            list(zip(dbt_tasks, results[: len(dbt_tasks)])),
            list(zip(mammo_tasks, results[len(dbt_tasks) :])),
            config,
            preset,
        )
        os.chmod(tmp, 0o755)  # mkdtemp makes it private; the dataset is ordinary data
        _check_destination(out)  # something may have appeared while we worked
        if out.is_dir():
            out.rmdir()
        os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return summary


def _run_jobs(jobs: list[tuple[str, dict[str, Any], str]], progress: bool, workers: int | None) -> list[dict]:
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    if workers is None:
        workers = min(4, os.cpu_count() or 1) if len(jobs) > 40 else 1
    columns = [TextColumn("synth"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn()]
    with Progress(*columns, disable=not progress, transient=False) as bar:
        task = bar.add_task("synth", total=len(jobs))
        if workers <= 1:
            results = []
            for job in jobs:
                results.append(_run(job))
                bar.advance(task)
            return results
        import multiprocessing

        # spawn: forking a parent that may hold torch/OpenMP threads can deadlock
        with ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn")) as pool:
            results = []
            for result in pool.map(_run, jobs, chunksize=1):
                results.append(result)
                bar.advance(task)
            return results
