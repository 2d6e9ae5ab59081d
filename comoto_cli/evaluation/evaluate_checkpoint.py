"""``comoto evaluate --checkpoint``: run a trained detector over a cache split and score it.

DBT caches are scored the DBTex way (volume inference -> DBTex CSV -> the challenge's sensitivity at 1-4 false
positives per volume, with a patient bootstrap interval). Mammography caches are scored per image: FROC
sensitivity at 1-4 false positives per image and COCO mAP (MONAI's COCOMetric).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from comoto_cli.cache.h5cache import SliceCache
from comoto_cli.config import EvaluateConfig
from comoto_cli.data.datasets import DetectionDataset
from comoto_cli.errors import CheckpointError, UsageError
from comoto_cli.evaluation.validation import FPS_PER_IMAGE, detection_metrics, ground_truth_boxes, predict_images
from comoto_cli.inference.volume import forward_batch_size, predict_cache
from comoto_cli.metrics.dbtex import DbtexTables, write_predictions_csv
from comoto_cli.metrics.image_froc import image_froc
from comoto_cli.metrics.plots import plot_froc
from comoto_cli.metrics.report import write_dbtex_report
from comoto_cli.networks.checkpoint import load_detector
from comoto_cli.transforms.geometry import cache_to_official
from comoto_cli.utils.atomic import ensure_writable_dir, write_json_atomic
from comoto_cli.utils.csvio import write_csv_atomic
from comoto_cli.utils.system import pick_device


def check_image_size(model, cache, checkpoint: Path) -> None:
    """The detector only makes sense on images of the size it was trained on."""
    model_size = tuple(int(v) for v in model.image_size)
    cache_size = (int(cache.image_height), int(cache.image_width))
    if model_size != cache_size:
        raise CheckpointError(
            f"checkpoint was trained on {model_size[0]}x{model_size[1]} images but cache {cache.path} holds "
            f"{cache_size[0]}x{cache_size[1]} (height x width); preprocess with --image-height {model_size[0]} "
            f"--image-width {model_size[1]} or use a matching checkpoint", path=checkpoint)


def dbtex_ground_truth(cache, split: str) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
    """The DBTex boxes and labels tables of ``split``, from the cache (boxes in the official frame).

    Labels list every volume of the split (normal volumes count for ``sensitivity_at_2_fps_all``); boxes
    carry ``Slice`` (central slice) and ``VolumeSlices`` as the official boxes CSV does.
    """
    vols = cache.volumes
    volumes = cache.volumes_in_split(split)
    lesion_volume = cache.lesions["volume"]
    in_split = np.isin(lesion_volume, volumes)
    lesion_rows = np.flatnonzero(in_split)
    owner = lesion_volume[lesion_rows]
    boxes = {
        "PatientID": vols["patient_id"][owner].astype(object),
        "StudyUID": vols["study_uid"][owner].astype(object),
        "View": vols["view"][owner].astype(object),
        "Subject": np.arange(len(lesion_rows), dtype=np.int64),
        "Slice": cache.lesions["slice"][lesion_rows].astype(np.int64),
        "X": cache.lesions["x"][lesion_rows].astype(np.float64),
        "Y": cache.lesions["y"][lesion_rows].astype(np.float64),
        "Width": cache.lesions["width"][lesion_rows].astype(np.float64),
        "Height": cache.lesions["height"][lesion_rows].astype(np.float64),
        "Class": cache.lesions["class"][lesion_rows].astype(object),
        "AD": np.zeros(len(lesion_rows), dtype=np.int64),
        "VolumeSlices": vols["volume_slices"][owner].astype(np.int64),
    }
    has_lesion = np.isin(volumes, owner)
    label_text = np.array([str(v).lower() for v in vols["label"][volumes]], dtype=object)
    labels = {
        "PatientID": vols["patient_id"][volumes].astype(object),
        "StudyUID": vols["study_uid"][volumes].astype(object),
        "View": vols["view"][volumes].astype(object),
        "Normal": ((label_text == "normal") | ((label_text == "") & ~has_lesion)).astype(np.int64),
        "Actionable": (label_text == "actionable").astype(np.int64),
        "Benign": (label_text == "benign").astype(np.int64),
        "Cancer": (label_text == "cancer").astype(np.int64),
    }
    return boxes, labels


def _evaluate_dbt(model, cache, config: EvaluateConfig, out: Path, device, progress: bool) -> dict:

    # One volume at a time, its cached slices read batch by batch (CacheVolume): never a whole volume or split.
    predictions = predict_cache(model, cache, config.split, config.inference, device, progress=progress)
    boxes, labels = dbtex_ground_truth(cache, config.split)
    tables = DbtexTables(predictions=predictions, boxes=boxes, labels=labels)
    write_predictions_csv(out / "predictions.csv", predictions)
    return write_dbtex_report(out, tables, bootstrap=config.bootstrap, seed=config.seed, froc=config.froc,
                              extra={"checkpoint": str(config.checkpoint), "split": config.split})


def _write_image_predictions(path: Path, cache, rows, predictions) -> None:

    vols = cache.volumes
    records = []
    for row, prediction in zip(rows, predictions):
        volume = int(cache.slice_volume[row])
        xywh = cache_to_official(prediction["boxes"], float(vols["scale_y"][volume]), float(vols["scale_x"][volume]))
        for (x, y, w, h), score in zip(xywh, prediction["scores"]):
            records.append((vols["source"][volume], vols["patient_id"][volume], vols["study_uid"][volume],
                            vols["view"][volume], f"{x:.2f}", f"{w:.2f}", f"{y:.2f}", f"{h:.2f}", f"{score:.6f}"))
    write_csv_atomic(path, ["image_id", "PatientID", "StudyUID", "View", "X", "Width", "Y", "Height", "Score"],
                     records)


def _plot_image_froc(path: Path, predictions, ground_truth, marks, split: str) -> None:

    froc = image_froc(list(predictions), list(ground_truth), fps_per_image=marks)
    plot_froc(path, {split: (froc["fps"], froc["sensitivities"])}, marks=marks,
              title=f"FROC, {split} split (per image)", xlabel="false positives per image")


def _evaluate_mammo(model, cache, config: EvaluateConfig, out: Path, device, progress: bool) -> dict:
    """Per-image scoring, shared with the teacher's per-epoch validation (:mod:`comoto_cli.evaluation.validation`)."""

    dataset = DetectionDataset(cache, config.split, augment=None)
    # Images are read from the cache batch by batch; on the CPU a batch is capped in pixels like volume inference.
    batch_size = forward_batch_size(config.inference.batch_size, (cache.image_height, cache.image_width), device)
    predictions = predict_images(model, dataset, batch_size=batch_size, device=device)
    ground_truth = ground_truth_boxes(dataset)
    metrics = {**detection_metrics(predictions, ground_truth), "split": config.split,
               "checkpoint": str(config.checkpoint)}
    _write_image_predictions(out / "predictions.csv", cache, dataset.rows, predictions)
    if config.froc:
        _plot_image_froc(out / "froc.png", predictions, ground_truth, FPS_PER_IMAGE, config.split)
    write_json_atomic(out / "metrics.json", metrics)
    _print_image_metrics(metrics)
    return metrics


def _print_image_metrics(metrics: dict) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"per-image metrics ({metrics['split']} split)")
    table.add_column("metric")
    table.add_column("value", justify="right")
    for key, value in metrics.items():
        if key in ("split", "checkpoint"):
            continue
        table.add_row(key, "n/a" if value is None else (f"{value:.4f}" if isinstance(value, float) else str(value)))
    Console(highlight=False).print(table)


def evaluate_checkpoint(config: EvaluateConfig, progress: bool = True) -> dict:
    """Score ``config.checkpoint`` on ``config.split`` of ``config.cache``; write predictions and metrics into
    ``config.out``. Returns the metrics written to ``metrics.json``."""

    if config.checkpoint is None or config.cache is None or config.out is None:
        raise UsageError("evaluate --checkpoint needs --cache and --out as well")
    cache = SliceCache(config.cache)
    if len(cache.volumes_in_split(config.split)) == 0:
        raise UsageError(f"cache has no {config.split!r} volumes to evaluate", path=config.cache)
    model, _metadata = load_detector(config.checkpoint, map_location="cpu")
    check_image_size(model, cache, config.checkpoint)
    out = ensure_writable_dir(config.out)
    device = pick_device()
    model.to(device)
    try:
        if cache.modality == "dbt":
            return _evaluate_dbt(model, cache, config, out, device, progress)
        return _evaluate_mammo(model, cache, config, out, device, progress)
    finally:
        cache.close()
