"""``comoto predict``: a trained detector on DICOM files as users have them, DBTex rows out.

Each input is read like the training data (:func:`comoto_cli.data.dicom_io.open_dicom_image`: the official
reader's frame, VOI window, [0, 1]) and framed as ``comoto preprocess`` framed the detector's training cache (the
checkpoint's ``geometry``, :mod:`comoto_cli.transforms.framing`, with the same area filter), so the network sees
what it saw in training. DBT volumes
go through volume inference (every slice, volume NMS); a mammogram is a one-slice volume. Boxes are reported
in the official frame at full resolution: DBTex columns, then the input's path.

A DBT volume is streamed: :class:`ResizedVolume` decodes and resizes only the frames of the batch the detector
asks for (:class:`comoto_cli.data.dicom_io.DbtFrames`), so memory holds one batch at the model's size and one
full-resolution frame, never the whole volume (64 x 2457 x 1996 float32 would be 1.25 GB). Overlays decode
their few slices again.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from comoto_cli.config import InferenceConfig, PredictConfig
from comoto_cli.data.dicom_io import central_frame, open_dicom_image, view_from_dataset
from comoto_cli.errors import ComotoError, InputDataError, UsageError
from comoto_cli.inference.formats import PredictRun, get_format, write_output
from comoto_cli.inference.volume import detect_volume, detections_to_dbtex
from comoto_cli.networks.checkpoint import load_detector
from comoto_cli.transforms.framing import Framing, framing_for, stretch
from comoto_cli.transforms.geometry import cache_to_official
from comoto_cli.utils.atomic import atomic_path, ensure_writable_dir, sha256_file
from comoto_cli.utils.system import pick_device

DICOM_SUFFIXES = (".dcm", ".dicom")
# Boxes drawn per overlay panel and panels (distinct slices of the best detections) per overlay.
OVERLAY_BOXES = 5
OVERLAY_PANELS = 3
_BCS_STUDY = re.compile(r"(?:^|-)(DBT-S\d+)(?:-|$)")


def _has_dicom_preamble(path: Path) -> bool:
    """DICOM Part 10 files carry 'DICM' after a 128-byte preamble (how extension-less files are recognised)."""
    try:
        with open(path, "rb") as handle:
            handle.seek(128)
            return handle.read(4) == b"DICM"
    except OSError:
        return False


def collect_inputs(inputs: list[Path]) -> list[Path]:
    """Files named directly, plus every ``*.dcm`` / ``*.dicom`` (any case) and extension-less DICOM file
    found recursively in folders, sorted within each folder; duplicates dropped, order otherwise kept."""
    if not inputs:
        raise UsageError("give at least one DICOM file or folder to predict on")
    found: list[Path] = []
    for item in inputs:
        item = Path(item)
        if item.is_dir():
            matches = [p for p in sorted(item.rglob("*")) if p.is_file() and (
                p.suffix.lower() in DICOM_SUFFIXES or (p.suffix == "" and _has_dicom_preamble(p)))]
            if not matches:
                raise UsageError("folder holds no DICOM files (*.dcm, *.dicom or extension-less DICOM)", path=item)
            found.extend(matches)
        elif item.is_file():
            found.append(item)
        else:
            raise UsageError("input not found", path=item)
    unique: dict[Path, None] = {}
    for path in found:
        unique.setdefault(path.resolve(), None)
    return list(unique)


def dicom_keys(path: Path) -> dict[str, str]:
    """PatientID, StudyUID and DBTex View (e.g. 'lcc') from the DICOM header (pixels are not read); the view
    follows the same tags as the reader's flip rule (:func:`comoto_cli.data.dicom_io.view_from_dataset`).
    StudyUID is BCS-DBT's study key ('DBT-S01234') when the TCIA folder names carry it, else the DICOM
    StudyInstanceUID."""
    import pydicom


    try:
        dataset = pydicom.dcmread(path, stop_before_pixels=True)
    except Exception as exc:  # noqa: BLE001 - pydicom raises several unrelated types for a bad file
        raise InputDataError(f"cannot read DICOM header: {type(exc).__name__}: {exc}", path=path) from None
    laterality, position = view_from_dataset(dataset)
    description = str(dataset.get("SeriesDescription", "") or "").upper()
    if not position:
        # Some files (ours from `comoto synth` among them) name the view only in the series description,
        # e.g. "L CC Tomosynthesis Reconstruction".
        match = re.search(r"\b(CC|MLO|XCCL|ML|LM)\b", description)
        position = match.group(1).lower() if match else ""
    if not laterality:
        match = re.match(r"\s*([LR])\b", description)
        laterality = match.group(1).lower() if match else ""
    # BCS-DBT's CSVs (and so DBTex scoring) key studies as 'DBT-S01234', which the TCIA folder names carry,
    # not by the DICOM StudyInstanceUID; use that key when the path has it.
    bcs_study = [m.group(1) for part in Path(path).parts for m in [_BCS_STUDY.search(part)] if m]
    return {"PatientID": str(dataset.get("PatientID", "") or "").strip(),
            "StudyUID": bcs_study[-1] if bcs_study else str(dataset.get("StudyInstanceUID", "") or "").strip(),
            "View": laterality + position if laterality and position else ""}


def official_frames(volume, indices):
    """Yield ``(index, frame)``, full-resolution official-frame frames of ``volume`` (an (S, rows, cols) array
    or a frame reader such as :class:`DbtFrames`, which decodes only these), for ``indices`` in ascending order."""
    wanted = sorted({int(i) for i in indices})
    if isinstance(volume, np.ndarray):
        for index in wanted:
            yield index, volume[index]
    else:
        yield from volume.frames(wanted)


class ResizedVolume:
    """An official-frame volume seen at the model's size, (S, height, width), read lazily by slice ranges.

    ``volume`` is either an (S, rows, cols) array or a frame reader with ``shape`` (S, rows, cols) and
    ``frames(indices)`` yielding ``(index, frame)`` in ascending order (:class:`DbtFrames`, which decodes only
    the frames asked for). ``source[start:stop]`` decodes those frames one at a time and frames each as
    preprocess does (``framing``, default: stretched whole; per frame, so the result equals resizing the whole
    stack at once, bit for bit): only the requested range is ever held, at the model's size.
    """

    def __init__(self, volume, height: int, width: int, framing: Framing | None = None):
        self.volume = volume
        self.shape = (int(volume.shape[0]), int(height), int(width))
        self.framing = framing or stretch(tuple(volume.shape[1:]), int(height), int(width), None)

    def __len__(self) -> int:
        return self.shape[0]

    def __getitem__(self, index: slice) -> np.ndarray:

        if not isinstance(index, slice):
            raise TypeError("ResizedVolume is read by slice ranges, source[start:stop]")
        wanted = list(range(*index.indices(self.shape[0])))
        out = np.empty((len(wanted), self.shape[1], self.shape[2]), dtype=np.float32)
        position = {value: i for i, value in enumerate(wanted)}
        done = 0
        for frame_index, frame in official_frames(self.volume, wanted):
            out[position[frame_index]] = self.framing.apply(frame)
            done += 1
        if done != len(wanted):  # a reader that stopped early must not leave uninitialised slices behind
            raise RuntimeError(f"frame reader gave {done} of {len(wanted)} frames")
        return out


@dataclass
class InputPrediction:
    """One input's detections: ``rows`` are DBTex columns in the official frame; ``image_shape`` is (slices, rows,
    cols) for 'dbt', (rows, cols) for 'mammo'; ``flipped``: the official reader rotated the stored pixels by 180
    degrees (docs/design.md section 1), so the stored frame is the official one turned back."""

    path: Path
    kind: str
    keys: dict[str, str]
    rows: dict[str, np.ndarray]
    image_shape: tuple[int, ...] = field(default_factory=tuple)
    flipped: bool = False


def detect_dicom_image(model, image, kind: str, config: InferenceConfig, device) -> dict[str, np.ndarray]:
    """DBTex rows (numeric columns, no keys; boxes in the official frame) of one decoded DICOM image in the
    official frame: for 'dbt' an (S, rows, cols) array or a frame reader (:class:`DbtFrames`, streamed batch by
    batch), for 'mammo' a (rows, cols) array. Mammograms keep the detector's own NMS (there is no neighbouring
    slice to compare with)."""
    volume = np.asarray(image)[None] if kind == "mammo" else image
    shape = tuple(int(v) for v in volume.shape)
    if len(shape) != 3 or min(shape) < 1:
        raise ValueError(f"unexpected image shape {tuple(image.shape)} for kind {kind!r}")
    height, width = (int(v) for v in model.image_size)
    framing = framing_for(model.geometry, shape[1:], height, width, lambda: _reference_frame(volume))
    source = ResizedVolume(volume, height, width, framing)
    mapping = framing.mapping()
    if kind == "mammo":
        inference = config.model_copy(update={"skip_edge_slices": 0})
        detections = detect_volume(model, source, config=inference, device=device)
        keep = np.flatnonzero(detections["scores"] >= config.nms_min_score)
        keep = keep[np.argsort(-detections["scores"][keep], kind="stable")][: config.max_boxes_per_volume]

        xywh = cache_to_official(detections["boxes"][keep], **mapping)
        return {"X": xywh[:, 0], "Width": xywh[:, 2], "Y": xywh[:, 1], "Height": xywh[:, 3],
                "Z": np.zeros(len(keep), np.int64), "Depth": np.zeros(len(keep), np.int64),
                "Score": detections["scores"][keep].astype(np.float64)}
    detections = detect_volume(model, source, config=config, device=device)
    return detections_to_dbtex(detections, **mapping, num_slices=len(source), config=config)


def _reference_frame(volume) -> np.ndarray:
    """The frame a cropping framing finds the breast on, as preprocess reads it: the mammogram, or the central
    slice of a volume (decoded once more for a frame reader)."""
    if isinstance(volume, np.ndarray):
        return volume[volume.shape[0] // 2]
    return central_frame(volume)


class _InputErrors:
    """Context manager: any failure while reading or decoding ``path`` becomes one line naming the file.

    ``broad`` (opening a file) also converts unexpected exception types, as decoders raise many; while
    predicting only errors that are the input's (ComotoError without a path, MemoryError) are converted, so a
    bug elsewhere is not disguised as a bad file. (Decoding errors while streaming frames already arrive as
    InputDataError naming the file, from :class:`DbtFrames`.)
    """

    def __init__(self, path: Path, *, broad: bool):
        self.path, self.broad = path, broad

    def __enter__(self):
        return self

    def __exit__(self, kind, exc, _traceback):
        if exc is None:
            return False
        if isinstance(exc, ComotoError):
            # Decoder messages can span lines (pydicom lists every plugin's failure on its own line).
            reason = " ".join(exc.reason.split())
            if exc.path is None:
                raise InputDataError(reason, path=self.path) from None
            if reason != exc.reason:
                raise type(exc)(reason, path=exc.path, row=exc.row) from None
            return False
        if isinstance(exc, MemoryError):
            raise InputDataError("not enough memory to decode this image", path=self.path) from None
        if self.broad and isinstance(exc, Exception):
            reason = " ".join(f"cannot read DICOM image: {type(exc).__name__}: {exc}".split())
            raise InputDataError(reason, path=self.path) from None
        return False


def open_input(path: Path, accept_modality: tuple[str, ...] = ()):
    """``(image, kind)`` of one input without decoding a DBT volume's pixels: for 'dbt' a :class:`DbtFrames`
    (frames decoded on demand), for 'mammo' a (rows, cols) float32 array; every failure is one line naming the
    file."""

    with _InputErrors(path, broad=True):
        image, kind = open_dicom_image(path, accept_modality=accept_modality)
    return (image if kind == "dbt" else np.asarray(image)), str(kind)


def detect_files(model, paths: list[Path], config: InferenceConfig, device, *, overlays: Path | None = None,
                 progress: bool = True, accept_modality: tuple[str, ...] = ()) -> list[InputPrediction]:
    """Detections of every DICOM file in ``paths``, one :class:`InputPrediction` each, in order; with
    ``overlays`` write one PNG per input there as it goes. ``accept_modality``: modalities the user vouches for
    (``--accept-modality``)."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn

    results: list[InputPrediction] = []
    names = overlay_names(paths) if overlays is not None else []
    model.to(device)
    with Progress(TextColumn("[bold]predict[/] {task.description}"), BarColumn(), MofNCompleteColumn(),
                  disable=not progress, transient=True) as bar:
        task = bar.add_task("", total=len(paths))
        for index, path in enumerate(paths):
            bar.update(task, description=path.name)
            image, kind = open_input(path, accept_modality)
            keys = dicom_keys(path)
            if kind not in ("dbt", "mammo"):
                raise InputDataError(f"unsupported image kind {kind!r}", path=path)
            with _InputErrors(path, broad=False):
                rows = detect_dicom_image(model, image, kind, config, device)
            result = InputPrediction(path=path, kind=kind, keys=keys, rows=rows,
                                     image_shape=tuple(int(v) for v in image.shape),
                                     flipped=bool(getattr(image, "flipped", False)))
            if overlays is not None:
                with _InputErrors(path, broad=False):
                    write_overlay(overlays / names[index], image, kind, result)
            results.append(result)
            del image
            bar.advance(task)
    return results


def records(results: list[InputPrediction]) -> list[dict]:
    """One dict per predicted box: DBTex columns then ``path``; best first within each input."""
    table = []
    for result in results:
        rows = result.rows
        for i in range(len(rows["Score"])):
            table.append({
                "PatientID": result.keys["PatientID"], "StudyUID": result.keys["StudyUID"],
                "View": result.keys["View"],
                "X": round(float(rows["X"][i]), 3), "Width": round(float(rows["Width"][i]), 3),
                "Y": round(float(rows["Y"][i]), 3), "Height": round(float(rows["Height"][i]), 3),
                "Z": int(rows["Z"][i]), "Depth": int(rows["Depth"][i]), "Score": float(rows["Score"][i]),
                "path": str(result.path),
            })
    return table


# ---------------------------------------------------------------------------------------------- overlays
def overlay_names(paths: list[Path]) -> list[str]:
    """Unique PNG names: the path below the inputs' common folder, separators as '__' (BCS-DBT names every
    file 1-1.dcm, so the file name alone would collide)."""
    import os

    parents = [str(p.parent) for p in paths]
    common = Path(os.path.commonpath(parents)) if parents else Path(".")
    names = []
    for path in paths:
        relative = path.relative_to(common).with_suffix("")
        stem = re.sub(r"[^A-Za-z0-9._-]+", "_", "__".join(relative.parts)) or "input"
        names.append(stem + ".png")
    seen: dict[str, int] = {}
    for i, name in enumerate(names):
        count = seen.get(name, 0)
        seen[name] = count + 1
        if count:
            names[i] = f"{name[:-4]}-{count}.png"
    return names


def overlay_slices(rows: dict[str, np.ndarray], num_slices: int) -> list[int]:
    """Slices to show: those of the best detections (distinct, best first); the central slice if none."""
    chosen: list[int] = []
    for z in rows["Z"][np.argsort(-rows["Score"], kind="stable")]:
        if int(z) not in chosen:
            chosen.append(int(z))
        if len(chosen) == OVERLAY_PANELS:
            break
    return chosen or [num_slices // 2]


def write_overlay(path: Path, image, kind: str, result: InputPrediction) -> None:
    """A PNG for a person to look at: the slice(s) of the top detections with their boxes and scores.

    ``image`` as for :func:`detect_dicom_image`; of a frame reader only the (at most ``OVERLAY_PANELS``) slices
    shown are decoded."""
    # The Agg canvas directly, not pyplot: no display and no global backend state.
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.patches import Rectangle


    volume = np.asarray(image)[None] if kind == "mammo" else image
    rows = result.rows
    slices = overlay_slices(rows, int(volume.shape[0]))
    shown = dict(official_frames(volume, slices))  # the few slices shown, decoded again
    aspect = volume.shape[1] / max(volume.shape[2], 1)
    panel_width = 4.0
    figure = Figure(figsize=(panel_width * len(slices), panel_width * aspect + 0.8), dpi=100)
    FigureCanvasAgg(figure)
    axes = figure.subplots(1, len(slices), squeeze=False)
    order = np.argsort(-rows["Score"], kind="stable")
    for axis, z in zip(axes[0], slices):
        axis.imshow(shown[z], cmap="gray", vmin=0.0, vmax=1.0, interpolation="antialiased")
        on_slice = [i for i in order if int(rows["Z"][i]) == z][:OVERLAY_BOXES]
        for rank, i in enumerate(on_slice):
            color = "red" if rank == 0 else "orange"
            axis.add_patch(Rectangle((rows["X"][i], rows["Y"][i]), rows["Width"][i], rows["Height"][i],
                                     fill=False, edgecolor=color, linewidth=1.5))
            axis.text(rows["X"][i], rows["Y"][i] - 8, f"{rows['Score'][i]:.2f}", color=color, fontsize=8,
                      va="bottom", ha="left", bbox={"facecolor": "black", "alpha": 0.5, "pad": 1, "linewidth": 0})
        label = f"slice {z}" if kind == "dbt" else "mammogram"
        axis.set_title(label if on_slice else f"{label}: no detections", fontsize=9)
        axis.set_axis_off()
    key = " ".join(v for v in (result.keys["PatientID"], result.keys["View"]) if v)
    figure.suptitle(f"{result.path.name}  {key}".strip(), fontsize=10)
    figure.tight_layout()
    with atomic_path(path) as temporary:
        figure.savefig(temporary, format="png", dpi=100)


def run_predict(config: PredictConfig, progress: bool = True) -> tuple[list[dict], int]:
    """The whole command: inputs -> detector -> ``config.out`` (in ``config.format``, a registered output format:
    :mod:`comoto_cli.inference.formats`) and optional overlays.

    Returns the records written and the number of inputs. The output file is written once, atomically,
    after every input succeeded.
    """

    config.require("checkpoint", "out", needed_by="predict")
    paths = collect_inputs(list(config.inputs))
    output = get_format(config.format)
    output.resolve()  # a writer registered by module name is imported now, not after the last input
    model, _metadata = load_detector(config.checkpoint, map_location="cpu")
    # A folder format (the DICOM SR) records the checkpoint it ran by its SHA-256.
    run = PredictRun(checkpoint=config.checkpoint,
                     checkpoint_sha256=sha256_file(config.checkpoint) if output.folder else "")
    if config.overlays is not None:
        ensure_writable_dir(config.overlays)
    results = detect_files(model, paths, config.inference, pick_device(), overlays=config.overlays,
                           progress=progress, accept_modality=tuple(config.accept_modality))
    table = records(results)
    write_output(config.out, table, config.format, predictions=results, run=run)
    return table, len(paths)
