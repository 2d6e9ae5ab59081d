"""Ensembles of detectors: weighted box fusion (Solovyev et al., 2021) of several DBTex prediction tables.

Each member table is one model's detections (already through volume NMS), e.g. the runs of several seeds or folds.
Per volume (StudyUID, View), every member's boxes are taken best first; a box joins the cluster whose fused box
overlaps it most, among those with IoU > ``iou``, a fused slice within ``slice_window`` slices and no box of the
same member yet, else it starts a new cluster. A cluster's box and slice are the score-weighted means of its
members'; its score is the mean member score times ``members / models`` (a cluster holds one box per model at
most), so a box that only some models found counts for less, the rule of the WBF paper.

Boxes stay in the tables' frame (the official frame at full resolution); ``Z`` becomes the rounded weighted slice and
``Depth`` 0, as our volume inference writes them. The result is best first per volume and capped at ``max_boxes``.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from comoto_cli.data.tables import DBTEX_COLUMNS, rows_by_volume


def _iou(box: np.ndarray, boxes: np.ndarray) -> np.ndarray:
    """IoU of one xyxy box with (n, 4) xyxy boxes."""
    width = np.clip(np.minimum(box[2], boxes[:, 2]) - np.maximum(box[0], boxes[:, 0]), 0, None)
    height = np.clip(np.minimum(box[3], boxes[:, 3]) - np.maximum(box[1], boxes[:, 1]), 0, None)
    inter = width * height
    union = (box[2] - box[0]) * (box[3] - box[1]) + (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1]) - inter
    return np.where(union > 0, inter / np.where(union > 0, union, 1), 0.0)


def _fuse_volume(boxes: np.ndarray, slices: np.ndarray, scores: np.ndarray, member: np.ndarray, models: int,
                 iou: float, slice_window: float) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """One volume: (n, 4) xyxy, (n,) slice, (n,) score, (n,) member index -> fused (k, 4), (k,), (k,)."""
    order = np.argsort(-scores, kind="stable")
    fused_boxes: list[np.ndarray] = []
    fused_slices: list[float] = []
    sums: list[list] = []  # per cluster: [weighted box sum, weighted slice sum, score sum, count, members]
    for index in order:
        chosen = -1
        if fused_boxes:
            overlaps = _iou(boxes[index], np.asarray(fused_boxes))
            near = np.abs(np.asarray(fused_slices) - slices[index]) <= slice_window
            eligible = np.flatnonzero((overlaps > iou) & near)
            for cluster in eligible[np.argsort(-overlaps[eligible], kind="stable")]:  # the best overlap first
                if member[index] not in sums[cluster][4]:
                    chosen = int(cluster)
                    break
        weight = scores[index]
        if chosen < 0:
            sums.append([boxes[index] * weight, slices[index] * weight, weight, 1, {member[index]}])
            fused_boxes.append(boxes[index].astype(np.float64))
            fused_slices.append(float(slices[index]))
            continue
        entry = sums[chosen]
        entry[0] = entry[0] + boxes[index] * weight
        entry[1] += slices[index] * weight
        entry[2] += weight
        entry[3] += 1
        entry[4].add(member[index])
        if entry[2] > 0:
            fused_boxes[chosen] = entry[0] / entry[2]
            fused_slices[chosen] = entry[1] / entry[2]
    out_scores = np.array([entry[2] / entry[3] * min(entry[3], models) / models for entry in sums])
    return np.asarray(fused_boxes).reshape(-1, 4), np.asarray(fused_slices), out_scores


def fuse_predictions(tables: Sequence[dict[str, np.ndarray]], *, iou: float = 0.55, slice_window: float = 2.0,
                     max_boxes: int = 100) -> dict[str, np.ndarray]:
    """Weighted box fusion of ``tables`` (DBTex columns, one per model) into one DBTex table (see module doc)."""
    if not tables:
        raise ValueError("no prediction tables to fuse")
    models = len(tables)
    per_volume: dict[tuple[str, str], list[tuple[int, np.ndarray]]] = {}
    patient: dict[tuple[str, str], str] = {}
    for index, table in enumerate(tables):
        for key, rows in rows_by_volume(table).items():
            per_volume.setdefault(key, []).append((index, rows))
            patient.setdefault(key, str(table["PatientID"][rows[0]]))
    columns: dict[str, list] = {name: [] for name in DBTEX_COLUMNS}
    for key in sorted(per_volume):
        parts = per_volume[key]
        xywh = np.concatenate([np.stack([tables[i][n][rows] for n in ("X", "Y", "Width", "Height")], axis=1)
                               for i, rows in parts]).astype(np.float64)
        boxes = np.concatenate([xywh[:, :2], xywh[:, :2] + xywh[:, 2:]], axis=1)
        slices = np.concatenate([tables[i]["Z"][rows] + tables[i]["Depth"][rows] / 2 for i, rows in parts]).astype(float)
        scores = np.concatenate([tables[i]["Score"][rows] for i, rows in parts]).astype(np.float64)
        member = np.concatenate([np.full(len(rows), i) for i, rows in parts])
        fused, fused_slices, fused_scores = _fuse_volume(boxes, slices, scores, member, models, iou, slice_window)
        best = np.argsort(-fused_scores, kind="stable")[:max_boxes]
        for row in best:
            x0, y0, x1, y1 = fused[row]
            values = {"PatientID": patient[key], "StudyUID": key[0], "View": key[1], "X": x0, "Width": x1 - x0,
                      "Y": y0, "Height": y1 - y0, "Z": int(round(fused_slices[row])), "Depth": 0,
                      "Score": float(fused_scores[row])}
            for name, value in values.items():
                columns[name].append(value)
    result = {name: np.asarray(values) for name, values in columns.items()}
    for name in ("X", "Width", "Y", "Height", "Score"):
        result[name] = result[name].astype(np.float64)
    for name in ("Z", "Depth"):
        result[name] = result[name].astype(np.int64)
    for name in ("PatientID", "StudyUID", "View"):
        result[name] = result[name].astype(str)
    return result
