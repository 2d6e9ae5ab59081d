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
from comoto_cli.data.tables import (
    IMAGE_PREDICTION_COLUMNS,
    dbtex_boxes,
    dbtex_labels,
    write_dbtex_predictions,
    write_image_predictions,
)
from comoto_cli.errors import CheckpointError, UsageError
from comoto_cli.evaluation.html_report import require_dbt_cache, write_evaluation_report
from comoto_cli.evaluation.validation import detect_images, detection_metrics, ground_truth_boxes
from comoto_cli.inference.volume import detect_cache, forward_batch_size
from comoto_cli.metrics.dbtex import DbtexTables, counting_volumes
from comoto_cli.metrics.image_froc import FPS_PER_IMAGE, image_froc
from comoto_cli.metrics.plots import plot_froc
from comoto_cli.metrics.report import write_dbtex_report
from comoto_cli.networks.checkpoint import load_detector
from comoto_cli.transforms.geometry import cache_to_official
from comoto_cli.utils.atomic import ensure_writable_dir, write_json_atomic
from comoto_cli.utils.system import pick_device


def check_image_size(model, cache, checkpoint: Path) -> None:
    """The detector only makes sense on images of the size and framing it was trained on."""
    model_size = tuple(int(v) for v in model.image_size)
    cache_size = (int(cache.image_height), int(cache.image_width))
    if model_size != cache_size:
        raise CheckpointError(
            f"checkpoint was trained on {model_size[0]}x{model_size[1]} images but cache {cache.path} holds "
            f"{cache_size[0]}x{cache_size[1]} (height x width); preprocess with --image-height {model_size[0]} "
            f"--image-width {model_size[1]} or use a matching checkpoint", path=checkpoint)
    if model.geometry != cache.geometry:
        raise CheckpointError(
            f"checkpoint was trained on images framed with geometry {model.geometry!r} but cache {cache.path} was "
            f"made with {cache.geometry!r}; preprocess with --geometry {model.geometry} or use a matching checkpoint",
            path=checkpoint)


def dbtex_ground_truth(cache, split: str) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
    """The scorer's boxes and labels tables of ``split``, built from the cache (boxes in the official frame).

    Labels list every volume of the split (normal volumes count for ``sensitivity_at_2_fps_all``); each box
    carries its central ``Slice`` and its view's ``VolumeSlices``, as a BCS-DBT boxes CSV row does. The tables
    are the structures :mod:`comoto_cli.data.tables` reads from CSV files, so no CSV is written in between.
    """
    vols = cache.volumes
    volumes = cache.volumes_in_split(split)
    lesion_rows = np.flatnonzero(np.isin(cache.lesions["volume"], volumes))
    owner = cache.lesions["volume"][lesion_rows]
    boxes = dbtex_boxes(
        vols["patient_id"][owner], vols["study_uid"][owner], vols["view"][owner],
        cache.lesions["x"][lesion_rows], cache.lesions["y"][lesion_rows],
        cache.lesions["width"][lesion_rows], cache.lesions["height"][lesion_rows],
        cache.lesions["slice"][lesion_rows], vols["volume_slices"][owner],
    )
    labels = dbtex_labels(vols["patient_id"][volumes], vols["study_uid"][volumes], vols["view"][volumes])
    return boxes, labels


def _evaluate_dbt(model, cache, config: EvaluateConfig, out: Path, device, progress: bool) -> dict:

    # One volume at a time, its cached slices read batch by batch (CacheVolume): never a whole volume or split.
    predictions = detect_cache(model, cache, config.split, config.inference, device, progress=progress)
    boxes, labels = dbtex_ground_truth(cache, config.split)
    tables = counting_volumes(DbtexTables(predictions=predictions, boxes=boxes, labels=labels), config.volumes)
    write_dbtex_predictions(out / "predictions.csv", predictions)
    inputs = {"checkpoint": str(config.checkpoint), "split": config.split, "volumes_counted": config.volumes}
    payload = write_dbtex_report(out, tables, bootstrap=config.bootstrap, seed=config.seed, froc=config.froc,
                                 extra=inputs)
    if config.report:
        write_evaluation_report(out, tables, payload, cache=cache, inputs={**inputs, "cache": str(config.cache)},
                                false_positives_per_view=config.report_false_positives, progress=progress)
    return payload


def _write_image_predictions(path: Path, cache, rows, predictions) -> None:

    vols = cache.volumes
    columns: dict[str, list] = {name: [] for name in IMAGE_PREDICTION_COLUMNS}
    for row, prediction in zip(rows, predictions):
        volume = int(cache.slice_volume[row])
        xywh = cache_to_official(prediction["boxes"], **cache.mapping(volume))
        image = {"image_id": vols["source"][volume], "PatientID": vols["patient_id"][volume],
                 "StudyUID": vols["study_uid"][volume], "View": vols["view"][volume]}
        for (x, y, w, h), score in zip(xywh, prediction["scores"]):
            for name, value in {**image, "X": x, "Width": w, "Y": y, "Height": h, "Score": score}.items():
                columns[name].append(value)
    write_image_predictions(path, columns)


def _plot_image_froc(path: Path, predictions, ground_truth, marks, split: str) -> None:

    froc = image_froc(list(predictions), list(ground_truth), fps_per_image=marks)
    plot_froc(path, {split: (froc["fps"], froc["sensitivities"])}, marks=marks,
              title=f"FROC, {split} split (per image)", xlabel="false positives per image")


def _evaluate_mammo(model, cache, config: EvaluateConfig, out: Path, device, progress: bool) -> dict:
    """Per-image scoring, shared with the teacher's per-epoch validation (:mod:`comoto_cli.evaluation.validation`)."""

    dataset = DetectionDataset(cache, config.split, augment=None, input_slices=model.config.input_slices)
    # Images are read from the cache batch by batch; on the CPU a batch is capped in pixels like volume inference.
    batch_size = forward_batch_size(config.inference.batch_size, (cache.image_height, cache.image_width), device)
    predictions = detect_images(model, dataset, batch_size=batch_size, device=device)
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

    config.require("checkpoint", "cache", "out", needed_by="evaluate --checkpoint")
    cache = SliceCache(config.cache)
    if len(cache.volumes_in_split(config.split)) == 0:
        raise UsageError(f"cache has no {config.split!r} volumes to evaluate", path=config.cache)
    model, _metadata = load_detector(config.checkpoint, map_location="cpu")
    check_image_size(model, cache, config.checkpoint)
    if config.report:
        require_dbt_cache(cache)
    out = ensure_writable_dir(config.out)
    device = pick_device()
    model.to(device)
    try:
        if cache.modality == "dbt":
            return _evaluate_dbt(model, cache, config, out, device, progress)
        return _evaluate_mammo(model, cache, config, out, device, progress)
    finally:
        cache.close()
