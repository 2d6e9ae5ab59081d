"""Pydantic models for every subcommand's configuration.

Each command's effective config = defaults, then a JSON (or YAML) file given with ``--config``, then the flags
given on the command line. ``comoto config show COMMAND`` prints it, ``comoto config schema COMMAND`` its JSON
Schema; ``make schemas`` writes those schemas into ``schemas/`` (a test fails when they are stale).
Defaults follow the reference implementation (docs/design.md section 3) unless stated.
"""

from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path
from typing import Annotated, Any, ClassVar, Literal, TypeVar

from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_serializer,
    model_validator,
)

from comoto_cli.errors import UsageError
from comoto_cli.utils.split_names import split_csvs


class StrictModel(BaseModel):
    """Unknown keys are errors: a misspelled option must not be silently ignored."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)

    def require(self, *fields: str, needed_by: str = "") -> None:
        """One-line UsageError naming the first of ``fields`` left unset: its key, its flag and its description.
        (Paths are optional in the models because configs nest: ``experiment`` fills them in per run.)"""
        for name in fields:
            if getattr(self, name) is None:
                reason = f", needed by {needed_by}" if needed_by else ""
                raise UsageError(f"missing {name} (--{name.replace('_', '-')}){reason}: "
                                 f"{type(self).model_fields[name].description}")


OnError = Literal["fail", "skip"]


def _modality_codes(values: list[str]) -> list[str]:
    """DICOM Modality codes (CS: upper case, digits, '_', at most 16 characters), upper-cased, duplicates dropped."""
    codes: list[str] = []
    for value in values:
        code = value.strip().upper()
        if not re.fullmatch(r"[A-Z0-9_ ]{1,16}", code):
            raise ValueError(f"{value!r} is not a DICOM Modality code (such as RG, DX, CR or OT)")
        if code not in codes:
            codes.append(code)
    return codes


# Modalities the user vouches for: generic X-ray / Secondary Capture images with one of them are read as
# mammograms (DBT volumes for a multi-frame input of `predict`), as Modality MG is. Empty: only MG.
AcceptModality = Annotated[list[str], AfterValidator(_modality_codes)]
_ACCEPT_HELP = ("Modality codes (e.g. RG for digitised film stored as Secondary Capture) whose generic X-ray or "
                "Secondary Capture images you vouch are mammograms; by default only Modality MG is accepted")


# ---------------------------------------------------------------------------------------------- synth
class SynthConfig(StrictModel):
    """`comoto synth`: a synthetic dataset in the real BCS-DBT and VinDr-Mammo layouts."""

    size: Literal["tiny", "demo", "bench"] = Field("tiny", description="preset: tiny (tests), demo, bench")
    mammograms: int | None = Field(None, ge=2, description="number of mammograms (default: the preset's)")
    volumes: int | None = Field(None, ge=2, description="number of DBT volumes (default: the preset's)")
    seed: int = Field(0, ge=0, description="random seed; the same seed writes the same files")
    domain_gap: Literal["basic", "realistic"] = Field(
        "basic", description="how the two modalities' acquisitions differ: basic (one pixel size and field, isotropic "
        "out-of-plane blur) or realistic (limited-angle DBT blur and ripple along the sweep, mammograms with finer "
        "pixels over a taller field); docs/design.md section 7")

    @model_serializer(mode="wrap")
    def _without_basic_gap(self, handler):
        """``domain_gap: basic`` is left out of the dump: configs and datasets made before it read the same."""
        data = handler(self)
        if self.domain_gap == "basic":
            data.pop("domain_gap", None)
        return data


# ---------------------------------------------------------------------------------------------- preprocess
class SplitConfig(StrictModel):
    """Patient-level split. A dataset's own split column (VinDr `split`) wins when present and respected."""

    val_fraction: float = Field(0.15, ge=0.0, lt=1.0)
    test_fraction: float = Field(0.15, ge=0.0, lt=1.0)
    seed: int = Field(0, ge=0)
    respect_dataset_split: bool = True
    stratify: bool = Field(True, description="split patients with and without lesions separately (each split gets both)")
    folds: int = Field(0, ge=0, description="k-fold cross-validation: the patients outside test are dealt into this "
                       "many folds and fold `fold` is the val split (replaces val_fraction; only where the dataset "
                       "brings no val split of its own); 0 or 1: off")
    fold: int = Field(0, ge=0, description="which fold is val when folds > 1 (0-based); the test split is the same "
                      "for every fold of one seed")

    @model_serializer(mode="wrap")
    def _without_folds_when_off(self, handler):
        """``folds`` and ``fold`` are left out of the dump when off, so the config hash of every cache made before
        they existed stays what it was."""
        data = handler(self)
        if self.folds <= 1 and self.fold == 0:
            data.pop("folds", None)
            data.pop("fold", None)
        return data

    @model_validator(mode="after")
    def _fractions_leave_training_data(self) -> SplitConfig:
        if self.val_fraction + self.test_fraction >= 1.0:
            raise ValueError("val_fraction + test_fraction must be < 1")
        if self.folds > 1 and self.fold >= self.folds:
            raise ValueError(f"fold {self.fold} does not exist: folds are 0 to {self.folds - 1}")
        return self


class PreprocessConfig(StrictModel):
    """`comoto preprocess dbt|mammo`: DICOM + CSV -> HDF5 slice cache."""

    # The framings' names. Their registry, comoto_cli.transforms.framing, adds each name here as it registers it;
    # the built-in ones are valid from the start, as for ModelConfig.backbone_names.
    geometry_names: ClassVar[list[str]] = ["stretch", "breast-crop"]

    modality: Literal["dbt", "mammo"] = "dbt"
    image_height: int = Field(2048, ge=16, le=8192, description="cache image height in pixels")
    image_width: int = Field(1024, ge=16, le=8192, description="cache image width in pixels")
    geometry: str = Field(
        "stretch", description="how an image fills the cache frame, a registered framing: stretch (the whole image, "
        "each axis its own scale) or breast-crop (the breast's bounding box, one scale for both axes, zero padding)")
    split: SplitConfig = SplitConfig()
    lesion_slice_offset: int = Field(
        0, ge=0, description="DBT training slices: lesion centre slice +- this many neighbours (0 = centre only)"
    )
    normal_slices_per_volume: int = Field(
        2, ge=0, description="DBT training slices drawn (seeded) from each lesion-free training volume"
    )
    context_slices: int = Field(
        0, ge=0, le=4, description="DBT training volumes also store this many slices on each side of every training "
        "slice (clamped at the volume's ends), as the neighbour channels of a 2.5-D student (model.input_slices); "
        "they are not training samples themselves. Validation and test volumes store every slice anyway")
    on_error: OnError = Field("fail", description="fail: stop at the first bad input; skip: list and go on")
    workers: int = Field(0, ge=0, description="worker processes; 0 = as many as the cores and the free memory allow")
    decoder: Literal["auto", "pylibjpeg", "gdcm", "pillow"] = Field(
        "auto", description="JPEG 2000 decoder (auto: pylibjpeg-openjpeg, the most frames per core; others: GDCM)")
    compression_level: int = Field(
        4, ge=0, le=9, description="gzip level of the cache's image chunks; 0: stored uncompressed, about twice the "
        "disk of level 4 and the fastest to read (the training loader at full size)")
    # Explicit CSV paths; when absent they are found in ROOT by their columns. BCS-DBT's take one path (no split
    # of its own) or one path per split: {"train": P, "validation": P, "test": P} or ["train=P", ...].
    file_paths_csv: Path | dict[Literal["train", "val", "test"], Path] | None = Field(
        None, description="BCS-DBT file-paths CSV (no split of its own), or one per split, a split kept in the cache: "
        '{"train": P, "validation": P, "test": P} or ["train=P", "validation=P", "test=P"]')
    labels_csv: Path | dict[Literal["train", "val", "test"], Path] | None = Field(
        None, description="BCS-DBT labels CSV, or one per split (as file_paths_csv)")
    boxes_csv: Path | dict[Literal["train", "val", "test"], Path] | None = Field(
        None, description="BCS-DBT boxes CSV, or one per split (as file_paths_csv)")
    annotations_csv: Path | None = Field(None, description="VinDr-Mammo finding_annotations.csv")
    manifest_csv: Path | None = Field(None, description="generic manifest: path, patient_id, xmin, ymin, xmax, ymax")
    accept_modality: AcceptModality = Field([], description=_ACCEPT_HELP)
    dataset: str | None = Field(
        None, description="dataset adapter reading ROOT, by name (comoto_cli.data.adapters), e.g. bcs-dbt, vindr, "
        "manifest, jsonl, cbis-ddsm, omidb, inbreast; default: bcs-dbt for dbt; for mammo manifest when manifest_csv "
        "is given, else vindr")
    inputs: dict[str, Path] = Field(
        {}, description='input files of the dataset adapter by name, e.g. {"manifest": "images.jsonl"} for jsonl '
        "(command line: --input NAME=PATH)")

    @field_validator("file_paths_csv", "labels_csv", "boxes_csv", mode="before",
                     json_schema_input_type=str | list[str] | dict[str, str] | None)
    @classmethod
    def _csvs_by_split(cls, value: Any) -> Any:
        """A path, 'SPLIT=PATH', a list of those or {SPLIT: PATH} -> one path or {train|val|test: path}."""
        if value is None:
            return None
        normal = split_csvs(value)  # strings back: JSON-mode validation takes no Path objects
        if isinstance(normal, dict):
            return {split: str(path) for split, path in normal.items()}
        return None if normal is None else str(normal)

    @field_validator("inputs", mode="before", json_schema_input_type=dict[str, str] | list[str])
    @classmethod
    def _named_inputs(cls, value: Any) -> Any:
        """The repeated --input flag's 'NAME=PATH' strings -> {NAME: PATH}."""
        if not isinstance(value, (list, tuple)):
            return value
        named: dict[str, str] = {}
        for item in value:
            name, equals, path = str(item).partition("=")
            if not equals or not name.strip() or not path.strip():
                raise ValueError(f"expected NAME=PATH, got {item!r}")
            if name.strip() in named:
                raise ValueError(f"input {name.strip()!r} given twice")
            named[name.strip()] = path.strip()
        return named

    @field_validator("geometry")
    @classmethod
    def _registered_geometry(cls, name: str) -> str:
        return registered_name(name, cls.geometry_names, "framing")

    @model_serializer(mode="wrap")
    def _without_default_dataset(self, handler):
        """``dataset``, ``inputs``, ``geometry`` and ``context_slices`` at their defaults are left out of the dump,
        so the canonical JSON (the config hash, and the stored config, of every cache made before they existed)
        stays what it was."""
        data = handler(self)
        if self.dataset is None:
            data.pop("dataset", None)
        if self.geometry == "stretch":
            data.pop("geometry", None)
        if not self.inputs:
            data.pop("inputs", None)
        if self.context_slices == 0:
            data.pop("context_slices", None)
        return data


def registered_name(name: str, names: list[str], kind: str) -> str:
    """``name`` when it is one of ``names`` (a plug-in kind's registered names), else a ValueError listing them."""
    if name not in names:
        raise ValueError(f"unknown {kind} {name!r}; registered: {', '.join(names)}")
    return name


# ---------------------------------------------------------------------------------------------- inference
class InferenceConfig(StrictModel):
    """Volume inference: every slice through the detector, then volume NMS (docs/design.md section 3)."""

    batch_size: int = Field(16, ge=1)
    skip_edge_slices: int = Field(0, ge=0, description="slices skipped at each end (the reference skips 4)")
    nms_iou: float = Field(0.5, gt=0.0, le=1.0)
    nms_min_score: float = Field(0.001, ge=0.0)
    nms_window_fraction: float = Field(0.25, gt=0.0, le=1.0, description="window = +- fraction * slices")
    nms_window_slices: Literal["volume", "detected"] = Field(
        "volume", description="the slice count the NMS window is a fraction of: volume, all its slices; detected, "
        "those that went through the detector (the reference: int((n - 8) / 4) with 4 edge slices skipped)")
    max_boxes_per_volume: int = Field(100, ge=1)
    flip_tta: bool = Field(False, description="horizontal-flip test-time augmentation: each slice and its mirror "
                           "through the detector, their detections merged by the per-slice NMS (twice the cost)")
    num_workers: int | Literal["auto"] = Field(
        "auto", description="processes reading cached slices ahead of the detector; auto: none on the CPU, on a GPU "
        "this process's share of the cores less one (at most 8)")

    @field_validator("num_workers")
    @classmethod
    def _workers(cls, value):
        if value != "auto" and value < 0:
            raise ValueError("must be 'auto' or a whole number >= 0")
        return value


# ---------------------------------------------------------------------------------------------- model
class ModelConfig(StrictModel):
    """2D RetinaNet (MONAI) with a ResNet-FPN backbone and one input channel; 2 classes (background, lesion)."""

    # The backbones' names. Their registry, comoto_cli.networks.backbones, adds each name here as it registers it:
    # it lives with the networks (a backbone builds modules), a layer above this module, which cannot import it.
    # The built-in names are valid from the start, so that a config is read and checked as before the registry
    # without the networks imported (library use, tests); a plug-in's name needs its module imported first.
    backbone_names: ClassVar[list[str]] = ["resnet18", "resnet34", "resnet50", "resnet101"]

    backbone: str = Field(
        "resnet50", description="feature extractor, a registered one (built in: resnet18, resnet34, resnet50, "
        "resnet101): `comoto train-teacher --help` lists them")
    width: list[int] = Field(
        [64, 128, 256, 512], min_length=4, max_length=4, description="ResNet stage widths (tiny models: 8,16,32,64)"
    )
    fpn_channels: int = Field(256, ge=4)
    returned_layers: list[int] = Field(
        [2, 3, 4], min_length=1,
        description="ResNet stages (1-4) fed to the FPN; keep 4 so the last stage, which ImPA and LsKD read by default, "
        "is trained by the detection loss too",
    )
    anchor_base_sizes: list[float] = Field(
        [32.0, 32.0], min_length=2, max_length=2, description="base anchor (height, width) at the finest level"
    )
    anchor_aspect_ratios: list[float] = Field([0.5, 1.0, 2.0], min_length=1)
    anchor_scales: list[float] = Field(
        [1.0], min_length=1, description="anchor sizes per cell, as multiples of anchor_base_sizes at each level "
        "(the reference: 1, 2, 4, 8, 16, i.e. 32-512 pixels at its one level)")
    fpn: bool = Field(True, description="false: no FPN; the heads read the last returned ResNet stage directly, one "
                      "level as wide as the stage (the reference's stride-32 RetinaNet); returned_layers is then one "
                      "stage")
    input_norm: Literal["unit", "imagenet"] = Field(
        "unit", description="network input: unit, the grey image in [0, 1] on one channel; imagenet, as the "
        "reference feeds torchvision: three equal channels scaled to 0-255 and normalised by ImageNet's mean and "
        "std (conv1 then takes 3 channels, so ImageNet weights load unchanged)")
    input_slices: int = Field(
        1, ge=1, le=9, description="DBT slices per input: 1, the slice alone (2-D); 3, 5 ...: the slice and its "
        "neighbours as channels (2.5-D; the training cache needs preprocess.context_slices >= (input_slices - 1) / 2). "
        "A one-channel image (a mammogram: the teacher's batches) is given to every channel")
    distill_feature: str = Field(
        "backbone",
        description="feature map for ImPA / distillation: 'backbone' (last ResNet stage, as the reference), an FPN "
        "level name such as 'fpn0', or 'auto': the coarsest map on which the median training lesion spans at least "
        "distill_min_cells cells per axis (chosen from the caches' training boxes when training starts, and recorded "
        "in the checkpoint)",
    )
    distill_min_cells: float = Field(
        2.0, gt=0.0, le=64.0,
        description="with distill_feature 'auto': cells per axis the median training lesion must span on the chosen "
        "map (the reference's lesions span about 1.5-4 cells of its stride-32 map)")
    weights: Path | None = Field(None, description="optional user-supplied weights file (state dict, weights_only)")
    matcher: Literal["atss", "iou"] = Field(
        "atss", description="anchor matching: atss (MONAI's ATSS, 4 candidates per level), or iou (an anchor is a "
        "lesion at IoU >= 0.5 with a box, background below 0.4, ignored between; every box keeps its best anchors), "
        "the reference's torchvision rule")
    focal_alpha: float | None = Field(None, gt=0.0, lt=1.0, description="focal loss alpha (the reference: 0.25); "
                                      "null: no class weighting")
    box_loss: Literal["smooth_l1", "l1"] = Field(
        "smooth_l1", description="box regression loss on encoded deltas: smooth_l1 (beta 1/9, MONAI's) or l1 (the "
        "reference's)")
    score_threshold: float = Field(0.02, ge=0.0, le=1.0)
    nms_threshold: float = Field(0.22, gt=0.0, le=1.0)
    detections_per_image: int = Field(100, ge=1)
    topk_candidates_per_level: int = Field(1000, ge=1)

    preset: Literal["reference"] | None = Field(
        None, description="reference: the reference implementation's detector (no FPN, stride 32, 15 anchors, IoU "
        "matcher, focal alpha 0.25, L1 box loss, ImageNet-normalised 3-channel input, its thresholds); fields given "
        "explicitly still win")

    @model_validator(mode="before")
    @classmethod
    def _apply_preset(cls, data):
        if isinstance(data, dict) and data.get("preset") is not None:
            preset = MODEL_PRESETS.get(data["preset"])
            if preset is not None:  # an unknown name is reported by the field's own validation
                data = {**preset, **data}
        return data

    @model_serializer(mode="wrap")
    def _without_single_slice(self, handler):
        """``input_slices`` 1 is left out of the dump: checkpoints and run configs from before it read the same."""
        data = handler(self)
        if self.input_slices == 1:
            data.pop("input_slices", None)
        return data

    @model_validator(mode="after")
    def _odd_input_slices(self) -> ModelConfig:
        if self.input_slices % 2 == 0:
            raise ValueError("model.input_slices must be odd: the slice in the middle, as many neighbours each side")
        if self.input_norm == "imagenet" and self.input_slices not in (1, 3):
            raise ValueError("model.input_norm imagenet normalises three channels: input_slices must be 1 or 3")
        return self

    @model_validator(mode="after")
    def _one_level_without_fpn(self) -> ModelConfig:
        if not self.fpn:
            if len(self.returned_layers) != 1:
                raise ValueError("model.fpn false: the heads read one ResNet stage; set returned_layers to one, "
                                 "e.g. [4]")
            if self.distill_feature not in ("backbone", "auto"):
                raise ValueError("model.fpn false: there are no FPN levels; distill_feature must be 'backbone' (or auto)")
        return self

    @field_validator("returned_layers")
    @classmethod
    def _layers_in_range(cls, layers: list[int]) -> list[int]:
        if any(layer not in (1, 2, 3, 4) for layer in layers) or sorted(set(layers)) != layers:
            raise ValueError("returned_layers must be increasing values in 1..4")
        return layers

    @field_validator("backbone")
    @classmethod
    def _registered_backbone(cls, name: str) -> str:
        return registered_name(name, cls.backbone_names, "backbone")


#: Named bundles of ModelConfig fields (``model.preset``). "reference": the detector of the reference implementation
#: (torchvision RetinaNet on the last ResNet stage, docs/fidelity.md items 1-11).
MODEL_PRESETS: dict[str, dict] = {
    "reference": {
        "fpn": False, "returned_layers": [4], "distill_feature": "backbone",
        "anchor_base_sizes": [32.0, 32.0], "anchor_scales": [1.0, 2.0, 4.0, 8.0, 16.0],
        "anchor_aspect_ratios": [0.5, 1.0, 2.0],
        "matcher": "iou", "focal_alpha": 0.25, "box_loss": "l1", "input_norm": "imagenet",
        "score_threshold": 0.05, "nms_threshold": 0.5, "detections_per_image": 300,
    },
}


class OptimConfig(StrictModel):
    name: Literal["sgd", "adamw"] = "sgd"
    lr: float = Field(5e-5, gt=0.0, description="learning rate")
    momentum: float = Field(0.9, ge=0.0, lt=1.0)
    weight_decay: float = Field(0.0, ge=0.0)
    scheduler: Literal["step", "cosine", "none"] = "step"
    step_size: int = Field(30, ge=1, description="StepLR period in epochs")
    gamma: float = Field(0.1, gt=0.0, le=1.0)
    grad_clip: float | None = Field(None, gt=0.0, description="max gradient norm; none = no clipping")


class AugmentConfig(StrictModel):
    horizontal_flip: float = Field(0.5, ge=0.0, le=1.0, description="probability")
    vertical_flip: float = Field(0.5, ge=0.0, le=1.0, description="probability")
    intensity_jitter: float = Field(0.1, ge=0.0, le=1.0, description="max relative contrast/brightness change")
    on_device: bool | Literal["auto"] = Field(
        "auto", description="apply flips and intensity jitter to the batch on the training device instead of in the "
        "loader (the same random draws, the same pixels): the loader then only reads and decompresses, which at "
        "2048 x 1024 nearly doubles its slices per second; auto: when training on a GPU (on the CPU the work would "
        "only move into the training process)")


class TrainConfig(StrictModel):
    """Shared by `train-teacher` and `distill`: one engine trains both."""

    cache: Path | None = Field(None, description="HDF5 slice cache made by `comoto preprocess`")
    out: Path | None = Field(None, description="run folder: checkpoints, metrics.jsonl, config.json")
    model: ModelConfig = ModelConfig()
    optim: OptimConfig = OptimConfig()
    augment: AugmentConfig = AugmentConfig()
    epochs: int = Field(50, ge=1)
    batch_size: int = Field(8, ge=1)
    val_batch_size: int = Field(16, ge=1)
    num_workers: int | Literal["auto"] = Field(
        "auto", description="DataLoader worker processes; auto: none on the CPU, on a GPU this process's share of "
        "the cores less one (at most 8; distill splits them between the DBT and the mammography batches)")
    seed: int = Field(0, ge=0)
    amp: bool = Field(True, description="mixed precision when CUDA is available (ignored on CPU)")
    deterministic: bool = True
    best_metric: str = Field("mean_sensitivity", description="validation metric that picks best.pt")
    val_every: int | Literal["auto"] = Field(
        "auto", description="validate every N epochs and after the last one; best.pt is picked among the validated "
        "epochs; auto: every epoch, or every 5 on a validation split of more than 200 volumes (images)")
    log_every: int = Field(10, ge=1, description="steps between progress updates")

    @field_validator("num_workers", "val_every")
    @classmethod
    def _count_or_auto(cls, value, info):
        if value != "auto" and value < (0 if info.field_name == "num_workers" else 1):
            raise ValueError(f"must be 'auto' or a whole number >= {0 if info.field_name == 'num_workers' else 1}")
        return value

    # Paths a run needs stay optional in the model: `comoto experiment` embeds these configs and fills them per run,
    # and `comoto config show` prints a config before they are given. Each command checks its own with these.
    def require_metric(self, names: tuple[str, ...], command: str) -> None:
        """One-line UsageError unless ``best_metric`` is one of ``names`` (the metrics ``command`` validates)."""
        if self.best_metric not in names:
            raise UsageError(f"best_metric: '{self.best_metric}' is not a validation metric of {command}; one of: "
                             f"{', '.join(names)}")


class TeacherConfig(TrainConfig):
    """`comoto train-teacher`: RetinaNet on mammography, optionally with ImPA."""

    cache: Path | None = Field(None, description="mammography slice cache made by `comoto preprocess mammo`")
    impa: bool = Field(True, description="intra-modal point alignment loss")
    beta: float = Field(2.0, ge=0.0, description="ImPA weight")
    num_points: Literal[1, 4, 5, 9] = 9


class DistillConfig(TrainConfig):
    """`comoto distill`: the DBT student with LsKD or a baseline."""

    # The distillation modes' names. Their registry, comoto_cli.engine.modes, adds each name here as it registers it:
    # it lives with the engine (a mode builds losses), a layer above this module, which cannot import it. The
    # built-in names are valid from the start, as for ModelConfig.backbone_names.
    mode_names: ClassVar[list[str]] = ["lesion", "image", "pretrain", "none"]

    cache: Path | None = Field(None, description="DBT slice cache made by `comoto preprocess dbt`")
    teacher: Path | None = Field(None, description="teacher checkpoint (best.pt of train-teacher)")
    teacher_cache: Path | None = Field(None, description="mammography cache for the unpaired teacher batches")
    mode: str = Field("lesion", description="distillation mode, a registered one: `comoto distill --help` lists them")
    train_ratio: float = Field(1.0, gt=0.0, le=1.0, description="fraction of training patients kept (seeded)")
    alpha: float = Field(2.0, ge=0.0, description="distillation weight")
    temperature: float = Field(4.0, gt=0.0)
    num_points: Literal[1, 4, 5, 9] = 9
    distill_start_epoch: int = Field(0, ge=0, description="epoch at which the distillation loss is switched on")
    best_metric: str = "mean_sensitivity_positive"
    val_inference: InferenceConfig = Field(
        InferenceConfig(), description="volume inference of the per-epoch validation (edge slices, volume NMS); its "
        "batch_size and num_workers are replaced by val_batch_size and num_workers")

    @classmethod
    def check_mode(cls, name: str) -> str:
        """``name`` if a mode of that name is registered, else a ValueError listing the registered ones."""
        return registered_name(name, cls.mode_names, "distillation mode")

    @field_validator("mode")
    @classmethod
    def _registered_mode(cls, mode: str) -> str:
        return cls.check_mode(mode)


# ---------------------------------------------------------------------------------------------- eval
class EvaluateConfig(StrictModel):
    checkpoint: Path | None = Field(None, description="checkpoint to evaluate (best.pt of train-teacher or distill)")
    cache: Path | None = Field(None, description="slice cache whose split is scored (`comoto preprocess`)")
    split: Literal["train", "val", "test"] = "test"
    predictions: Path | None = None
    boxes: Path | None = None
    labels: Path | None = None
    froc: bool = True
    out: Path | None = Field(None, description="output folder: metrics.json, froc.png, predictions.csv")
    report: bool = Field(False, description="also write report.html: metrics, FROC, a card per lesion and the top "
                         "false positives of each view (DBT; pictures from `cache`)")
    report_false_positives: int = Field(2, ge=0, description="false positives shown per view in report.html")
    bootstrap: int = Field(1000, ge=0, description="patient bootstrap resamples for the 95% interval (0 = off)")
    seed: int = Field(0, ge=0)
    volumes: Literal["labels", "boxes-table"] = Field(
        "labels", description="volumes counted for false positives: labels, every row of the labels table (the "
        "official DBTex definition); boxes-table, as the reference implementation scores (it passes its boxes table "
        "as the labels: one volume per box row, volumes without a lesion not counted). Not the official metric")
    inference: InferenceConfig = InferenceConfig()


class PredictConfig(StrictModel):
    # The output formats' names. Their registry, comoto_cli.inference.formats, adds each name here as it registers
    # it (a layer above this module, which cannot import it); the built-in ones are valid from the start, as for
    # ModelConfig.backbone_names.
    format_names: ClassVar[list[str]] = ["csv", "json", "dicom-sr"]

    checkpoint: Path | None = Field(None, description="detector checkpoint (best.pt of train-teacher or distill)")
    inputs: list[Path] = Field(default_factory=list)
    out: Path | None = Field(None, description="output file, in `format` (a folder for dicom-sr)")
    format: str = Field("csv", description="output file format, a registered one (built in: csv, json, dicom-sr): "
                        "`comoto predict --help` lists them")
    overlays: Path | None = None
    inference: InferenceConfig = InferenceConfig()
    accept_modality: AcceptModality = Field([], description=_ACCEPT_HELP)

    @field_validator("format")
    @classmethod
    def _registered_format(cls, name: str) -> str:
        return registered_name(name, cls.format_names, "output format")


class ExperimentConfig(StrictModel):
    """`comoto experiment`: the paper's comparison (DBT only, pretraining, image-level KD, LsKD, LsKD + ImPA) at
    several training ratios and seeds, on one dataset, with one shared teacher per ImPA setting."""

    # A method is a distillation mode, or MODE+impa: the mode with the teacher trained with ImPA; either may end in
    # :VARIANT, one of `variants`.
    IMPA_SUFFIX: ClassVar[str] = "+impa"
    VARIANT_SEPARATOR: ClassVar[str] = ":"
    # What a variant may not change: the experiment sets these per run, and the student's architecture is the
    # teacher's.
    RUN_FIELDS: ClassVar[tuple[str, ...]] = ("cache", "out", "teacher", "teacher_cache", "mode", "train_ratio", "seed",
                                             "model")

    out: Path = Field(Path("runs/experiment"), description="experiment folder (resumable: finished runs are kept)")
    synth: SynthConfig | None = Field(
        SynthConfig(size="demo"), description="synthetic dataset to generate into OUT/data; null = use dbt_root/mammo_root"
    )
    dbt_root: Path | None = Field(None, validate_default=True, description="BCS-DBT data root (when synth is null)")
    mammo_root: Path | None = Field(None, validate_default=True,
                                    description="mammography data root (when synth is null)")
    preprocess_dbt: PreprocessConfig = PreprocessConfig(modality="dbt")
    preprocess_mammo: PreprocessConfig = PreprocessConfig(modality="mammo")
    teacher: TeacherConfig = TeacherConfig()
    student: DistillConfig = DistillConfig()
    methods: list[str] = Field(
        ["none", "pretrain", "image", "lesion", "lesion+impa"], min_length=1,
        description="distillation modes to compare; MODE+impa: MODE with the teacher trained with ImPA")
    train_ratios: list[float] = Field([0.1, 1.0], min_length=1)
    seeds: list[int] = Field([0, 1, 2], min_length=1)
    split: Literal["val", "test"] = "test"
    bootstrap: int = Field(200, ge=0, description="patient bootstrap resamples per run for its 95% interval")
    paired_baselines: list[str] = Field(
        ["none", "pretrain"], description="every other method is compared with each of these (those among methods): "
        "paired difference over seeds with a paired patient-bootstrap interval")
    same_teacher_baseline: str | None = Field(
        None, description="a mode (e.g. pretrain): every method that distils, or has a variant, is also compared with "
        "this mode started from the same teacher (MODE+impa for a method whose teacher was trained with ImPA), so "
        "that the teacher's and the distillation's contributions are not confounded")
    variants: dict[str, dict[str, Any]] = Field(
        {}, description="named changes to the student's settings, for methods written MODE[+impa]:NAME, e.g. "
        "{\"alpha0\": {\"alpha\": 0}} (the distillation term at weight 0: the noise floor of a comparison)")
    paired_bootstrap: int = Field(1000, ge=0, description="paired patient-bootstrap resamples per comparison")
    power_goal: float = Field(
        0.025, gt=0.0, lt=1.0, description="paired half-width wanted: each comparison also reports the test patients "
        "that would reach it, its half-width scaled as 1/sqrt(test patients)")
    inference: InferenceConfig = Field(
        InferenceConfig(), description="volume inference of every student's validation and test evaluation (edge "
        "slices, volume NMS); batch size and workers come from student")

    @field_validator("train_ratios")
    @classmethod
    def _ratios_in_range(cls, ratios: list[float]) -> list[float]:
        if any(not 0.0 < ratio <= 1.0 for ratio in ratios):
            raise ValueError("train ratios must be in (0, 1]")
        return ratios

    @field_validator("dbt_root", "mammo_root")
    @classmethod
    def _root_without_synth(cls, root: Path | None, info) -> Path | None:
        # `synth` comes first, so it is in info.data unless it failed (then its own error says so).
        if root is None and "synth" in info.data and info.data["synth"] is None:
            raise ValueError("required when synth is null")
        return root

    @model_validator(mode="after")
    def _context_for_the_student(self) -> ExperimentConfig:
        """A 2.5-D student needs its neighbours in the DBT cache: caught here, not after both caches and the
        teachers are made."""
        needed = (self.student.model.input_slices - 1) // 2
        if self.preprocess_dbt.context_slices < needed:
            raise ValueError(f"student.model.input_slices {self.student.model.input_slices} needs "
                             f"preprocess_dbt.context_slices >= {needed}")
        return self

    @field_validator("methods")
    @classmethod
    def _registered_methods(cls, methods: list[str]) -> list[str]:
        for method in methods:
            DistillConfig.check_mode(method.partition(cls.VARIANT_SEPARATOR)[0].removesuffix(cls.IMPA_SUFFIX))
        return methods

    @model_validator(mode="after")
    def _known_variants(self) -> ExperimentConfig:
        for method in self.methods:
            variant = method.partition(self.VARIANT_SEPARATOR)[2]
            if variant and variant not in self.variants:
                raise ValueError(f"methods: {method!r}: no variant {variant!r} in variants")
        if self.same_teacher_baseline is not None:
            DistillConfig.check_mode(self.same_teacher_baseline)
        for name, change in self.variants.items():
            if not re.fullmatch(r"[a-z0-9][a-z0-9_-]*", name):
                raise ValueError(f"variants: {name!r}: lower-case letters, digits, '_' and '-' only")
            fixed = sorted(set(change) & set(self.RUN_FIELDS))
            if fixed:
                raise ValueError(f"variants: {name!r} changes {', '.join(fixed)}, which the experiment sets per run")
        return self


COMMAND_MODELS: dict[str, type[StrictModel]] = {
    "synth": SynthConfig,
    "preprocess": PreprocessConfig,
    "train-teacher": TeacherConfig,
    "distill": DistillConfig,
    "evaluate": EvaluateConfig,
    "predict": PredictConfig,
    "experiment": ExperimentConfig,
}

M = TypeVar("M", bound=BaseModel)


def _format_validation_error(error: ValidationError, source: str) -> str:
    parts = []
    for item in error.errors():
        field = ".".join(str(p) for p in item["loc"]) or "(top level)"
        message = item["msg"]
        if item["type"] == "extra_forbidden":
            message = "unknown key"
        parts.append(f"{field}: {message}")
    return f"invalid config ({source}): " + "; ".join(parts)


def _read_config_file(path: Path) -> dict[str, Any]:
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise UsageError("config file not found", path=path) from None
    except (OSError, UnicodeDecodeError) as exc:
        raise UsageError(f"cannot read config file: {exc}", path=path) from None
    if path.suffix.lower() in (".yaml", ".yml"):
        try:
            import yaml  # optional dependency
        except ImportError:
            raise UsageError("YAML configs need PyYAML (pip install pyyaml); or use JSON", path=path) from None
        try:
            data = yaml.safe_load(text)
        except yaml.YAMLError as exc:
            raise UsageError(f"invalid YAML: {exc}".splitlines()[0], path=path) from None
    else:
        try:
            data = json.loads(text)
        except json.JSONDecodeError as exc:
            raise UsageError(f"invalid JSON: {exc.msg} (line {exc.lineno}, column {exc.colno})", path=path) from None
    if not isinstance(data, dict):
        raise UsageError("config file must hold an object (key: value pairs)", path=path)
    return data


def _deep_merge(base: dict[str, Any], override: dict[str, Any]) -> dict[str, Any]:
    merged = dict(base)
    for key, value in override.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = _deep_merge(merged[key], value)
        else:
            merged[key] = value
    return merged


def set_dotted(target: dict[str, Any], dotted_key: str, value: Any) -> None:
    """``set_dotted(d, "optim.lr", 0.1)`` sets ``d["optim"]["lr"]``."""
    *parents, leaf = dotted_key.split(".")
    for part in parents:
        target = target.setdefault(part, {})
    target[leaf] = value


def load_config(
    model: type[M], config_file: Path | None = None, overrides: dict[str, Any] | None = None
) -> M:
    """Defaults <- config file <- CLI overrides (dotted keys; ``None`` values mean 'flag not given')."""
    data: dict[str, Any] = {}
    source = "defaults"
    if config_file is not None:
        data = _read_config_file(Path(config_file))
        source = str(config_file)
    flag_values: dict[str, Any] = {}
    for key, value in (overrides or {}).items():
        if value is not None:
            set_dotted(flag_values, key, value)
    if flag_values:
        data = _deep_merge(data, flag_values)
        source = f"{source} + command-line flags"
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        raise UsageError(_format_validation_error(exc, source)) from None


def config_json(config: BaseModel) -> str:
    """Canonical JSON (sorted keys) used for hashing and for storing in caches and checkpoints."""
    return json.dumps(config.model_dump(mode="json"), sort_keys=True, separators=(",", ":"))


def config_hash(config: BaseModel) -> str:
    return hashlib.sha256(config_json(config).encode()).hexdigest()[:16]


def json_schema(model: type[BaseModel]) -> dict[str, Any]:
    return model.model_json_schema()
