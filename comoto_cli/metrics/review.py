"""What a person reviews after a DBTex score: every lesion with the detection that found it (or came closest),
and the highest-scoring false positives of each volume.

Hits follow the official rule (:func:`comoto_cli.metrics.dbtex.prediction_hits`), so a lesion reviewed as found
is one the score counts. Its *status* places it against the operating point of ``fps_per_volume`` false
positives per volume (:func:`comoto_cli.metrics.dbtex.operating_threshold`):

- ``found``: a hitting prediction scores at least the operating threshold;
- ``found-below``: hit only by predictions scoring below it (counted further along the FROC curve);
- ``missed``: no prediction hits it. Its *detection* is then the best-scoring prediction of the view whose
  in-plane centre is within the hit distance, if there is one: either its slice is outside this lesion's window,
  or it is inside and the official rule gave the hit to another lesion of the view, nearer in 3-D
  (``Detection.hit_box``).

All coordinates are those of the tables: the official frame at full resolution, slices as the CSVs count them.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from comoto_cli.data.tables import rows_by_volume
from comoto_cli.metrics.dbtex import MIN_HIT_DISTANCE, DbtexTables, operating_threshold, prediction_hits

STATUSES = ("found", "found-below", "missed")


@dataclass(frozen=True)
class Detection:
    """One prediction row: ``box`` is (X, Y, Width, Height); ``slice`` its centre slice (Z + Depth / 2);
    ``hit_box`` the boxes-table row it hits, -1 for none."""

    row: int
    box: tuple[float, float, float, float]
    slice: float
    score: float
    hit_box: int


@dataclass(frozen=True)
class LesionReview:
    box_row: int
    patient_id: str
    study_uid: str
    view: str
    box: tuple[float, float, float, float]
    slice: int
    volume_slices: int
    status: str
    detection: Detection | None  # best hit; for a missed lesion the best in-plane near miss, if any

    @property
    def slice_offset(self) -> float | None:
        return None if self.detection is None else self.detection.slice - self.slice

    @property
    def centre_distance(self) -> float | None:
        """In-plane distance between the detection's and the lesion's box centres (official-frame pixels)."""
        if self.detection is None:
            return None
        (x, y, w, h), (dx, dy, dw, dh) = self.box, self.detection.box
        return float(np.hypot(dx + dw / 2 - (x + w / 2), dy + dh / 2 - (y + h / 2)))

    @property
    def hit_radius(self) -> float:
        """The official in-plane hit distance for this lesion: half its diagonal, at least 100 pixels."""
        return max(float(np.hypot(self.box[2], self.box[3])) / 2, MIN_HIT_DISTANCE)


@dataclass(frozen=True)
class FalsePositiveReview:
    patient_id: str
    study_uid: str
    view: str
    rank: int  # 1 = the view's highest-scoring false positive
    detection: Detection


@dataclass(frozen=True)
class DetectionReview:
    lesions: list[LesionReview]
    false_positives: list[FalsePositiveReview]  # highest score first
    threshold: float
    fps_per_volume: float
    false_positives_left_out: int  # beyond ``max_false_positives``


def _detection(predictions: dict[str, np.ndarray], hits: np.ndarray, row: int) -> Detection:
    box = tuple(float(predictions[name][row]) for name in ("X", "Y", "Width", "Height"))
    centre = float(predictions["Z"][row] + predictions["Depth"][row] / 2)
    return Detection(row=int(row), box=box, slice=centre, score=float(predictions["Score"][row]),
                     hit_box=int(hits[row]))


def _near_miss(predictions: dict[str, np.ndarray], rows: np.ndarray, box: tuple[float, ...]) -> int | None:
    """The best-scoring of ``rows`` whose in-plane centre is within the official hit distance of ``box``."""
    if rows.size == 0:
        return None
    x, y, width, height = box
    dx = predictions["X"][rows] + predictions["Width"][rows] / 2 - (x + width / 2)
    dy = predictions["Y"][rows] + predictions["Height"][rows] / 2 - (y + height / 2)
    near = rows[np.sqrt(dx * dx + dy * dy) <= max(np.hypot(width, height) / 2, MIN_HIT_DISTANCE)]
    if near.size == 0:
        return None
    return int(near[np.argmax(predictions["Score"][near])])


def _best_hit(scores: np.ndarray, hits: np.ndarray, n_boxes: int) -> np.ndarray:
    """(B,) the highest-scoring prediction hitting each box (the first in file order on a tie), -1 if none."""
    rows = np.flatnonzero(hits >= 0)
    order = rows[np.lexsort((rows, -scores[rows], hits[rows]))]
    first = np.ones(order.size, dtype=bool)
    first[1:] = hits[order][1:] != hits[order][:-1]
    best = np.full(n_boxes, -1, dtype=np.int64)
    best[hits[order[first]]] = order[first]
    return best


def _review_lesions(tables: DbtexTables, hits: np.ndarray, threshold: float) -> list[LesionReview]:
    predictions, boxes = tables.predictions, tables.boxes
    by_view = rows_by_volume(predictions)
    best_hit = _best_hit(predictions["Score"], hits, len(boxes["Slice"]))
    reviews = []
    for row in range(len(boxes["Slice"])):
        key = (str(boxes["StudyUID"][row]), str(boxes["View"][row]))
        box = tuple(float(boxes[name][row]) for name in ("X", "Y", "Width", "Height"))
        if best_hit[row] >= 0:
            best = int(best_hit[row])
            status = "found" if predictions["Score"][best] >= threshold else "found-below"
        else:
            best = _near_miss(predictions, by_view.get(key, np.zeros(0, np.int64)), box)
            status = "missed"
        reviews.append(LesionReview(
            box_row=row, patient_id=str(boxes["PatientID"][row]), study_uid=key[0], view=key[1], box=box,
            slice=int(boxes["Slice"][row]), volume_slices=int(boxes["VolumeSlices"][row]), status=status,
            detection=None if best is None else _detection(predictions, hits, best)))
    return reviews


def _review_false_positives(tables: DbtexTables, hits: np.ndarray, per_view: int) -> list[FalsePositiveReview]:
    predictions = tables.predictions
    reviews = []
    for (study_uid, view), rows in rows_by_volume(predictions).items():
        false_rows = rows[hits[rows] < 0]
        order = false_rows[np.argsort(-predictions["Score"][false_rows], kind="stable")][:per_view]
        for rank, row in enumerate(order, start=1):
            reviews.append(FalsePositiveReview(
                patient_id=str(predictions["PatientID"][row]), study_uid=study_uid, view=view, rank=rank,
                detection=_detection(predictions, hits, int(row))))
    reviews.sort(key=lambda review: -review.detection.score)
    return reviews


def review_detections(tables: DbtexTables, *, fps_per_volume: float = 2.0, false_positives_per_view: int = 2,
                      max_false_positives: int = 500) -> DetectionReview:
    """Every lesion of ``tables.boxes`` in file order, and the ``false_positives_per_view`` highest-scoring false
    positives of each view (at most ``max_false_positives`` in all, the highest kept)."""
    hits = prediction_hits(tables)
    threshold = operating_threshold(tables, fps_per_volume)
    false_positives = _review_false_positives(tables, hits, false_positives_per_view)
    return DetectionReview(
        lesions=_review_lesions(tables, hits, threshold),
        false_positives=false_positives[:max_false_positives],
        threshold=threshold,
        fps_per_volume=fps_per_volume,
        false_positives_left_out=max(0, len(false_positives) - max_false_positives),
    )
