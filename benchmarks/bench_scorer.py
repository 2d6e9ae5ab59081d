"""DBTex scorer throughput on a challenge-sized submission.

``run()`` makes a seeded, in-memory world of ``volumes`` DBT views (about a third with 1-2 lesions, the rest
normal) and ``predictions`` detections (some near lesions, the rest anywhere), then times
:func:`comoto_cli.metrics.dbtex.score_dbtex` (matching + both FROC passes), best of ``repeats`` runs after a
warm-up. For scale: the official pandas scorer is reported (docs/design.md section 2) to need about 16 s for 4000
volumes; it is not run here.

    python benchmarks/bench_scorer.py [--volumes 4000 --predictions 16000 --bootstrap 0]
"""

from __future__ import annotations

import argparse
import json
import time

import numpy as np


def make_world(volumes: int = 4000, predictions: int = 16000, seed: int = 0):
    from comoto_cli.metrics.dbtex import DbtexTables

    rng = np.random.default_rng(seed)
    views = np.array(["lcc", "lmlo", "rcc", "rmlo"])
    study = np.array([f"1.2.840.{v // 4}" for v in range(volumes)])
    view = views[np.arange(volumes) % 4]
    patient = np.array([f"DBT-P{v // 4:05d}" for v in range(volumes)])
    volume_slices = rng.integers(40, 90, volumes).astype(np.float64)

    positive = rng.random(volumes) < 0.35
    lesions_per_volume = np.where(positive, rng.integers(1, 3, volumes), 0)
    box_volume = np.repeat(np.arange(volumes), lesions_per_volume)
    n_boxes = box_volume.size
    box_w = rng.uniform(20, 400, n_boxes)
    box_h = rng.uniform(20, 400, n_boxes)
    box_x = rng.uniform(0, 1800, n_boxes)
    box_y = rng.uniform(0, 2300, n_boxes)
    box_slice = np.floor(rng.uniform(0.1, 0.9, n_boxes) * volume_slices[box_volume])
    boxes = {
        "PatientID": patient[box_volume], "StudyUID": study[box_volume], "View": view[box_volume],
        "X": box_x, "Y": box_y, "Width": box_w, "Height": box_h, "Slice": box_slice,
        "VolumeSlices": volume_slices[box_volume],
    }

    near = rng.random(predictions) < 0.25
    target_box = rng.integers(0, max(n_boxes, 1), predictions)
    pred_volume = np.where(near, box_volume[target_box], rng.integers(0, volumes, predictions))
    width = rng.uniform(20, 300, predictions)
    height = rng.uniform(20, 300, predictions)
    centre_x = np.where(near, box_x[target_box] + box_w[target_box] / 2 + rng.normal(0, 80, predictions),
                        rng.uniform(0, 2000, predictions))
    centre_y = np.where(near, box_y[target_box] + box_h[target_box] / 2 + rng.normal(0, 80, predictions),
                        rng.uniform(0, 2500, predictions))
    z = np.where(near, box_slice[target_box] + np.round(rng.normal(0, 8, predictions)),
                 np.floor(rng.uniform(0, 1, predictions) * volume_slices[pred_volume]))
    preds = {
        "PatientID": patient[pred_volume], "StudyUID": study[pred_volume], "View": view[pred_volume],
        "X": centre_x - width / 2, "Width": width, "Y": centre_y - height / 2, "Height": height,
        "Z": z, "Depth": np.zeros(predictions),
        "Score": np.where(near, rng.beta(4, 2, predictions), rng.beta(2, 4, predictions)),
    }
    labels = {"PatientID": patient, "StudyUID": study, "View": view}
    return DbtexTables(predictions=preds, boxes=boxes, labels=labels)


def run(volumes: int = 4000, predictions: int = 16000, repeats: int = 3, seed: int = 0, bootstrap: int = 0) -> dict:
    from comoto_cli.metrics.dbtex import bootstrap_mean_sensitivity, score_dbtex

    tables = make_world(volumes, predictions, seed)
    metrics = score_dbtex(tables)  # warm-up
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        metrics = score_dbtex(tables)
        times.append(time.perf_counter() - start)
    best = min(times)
    result = {
        "volumes": volumes,
        "predictions": predictions,
        "boxes": len(tables.boxes["X"]),
        "score_s": best,
        "volumes_per_s": volumes / best,
        "mean_sensitivity_positive": metrics["mean_sensitivity_positive"],
    }
    if bootstrap:
        start = time.perf_counter()
        bootstrap_mean_sensitivity(tables, bootstrap, seed)
        result["bootstrap_resamples"] = bootstrap
        result["bootstrap_s"] = time.perf_counter() - start
    return result


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--volumes", type=int, default=4000)
    parser.add_argument("--predictions", type=int, default=16000)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--bootstrap", type=int, default=0, help="also time this many bootstrap resamples")
    arguments = parser.parse_args()
    print(json.dumps(run(arguments.volumes, arguments.predictions, arguments.repeats, arguments.seed,
                         arguments.bootstrap), indent=2))
