"""The DBT student: LsKD (the paper's contribution) and the baselines, on the one shared trainer.

The modes (``lesion`` = LsKD, ``image``, ``pretrain``, ``none``; docs/design.md section 3) are registered in
:mod:`comoto_cli.engine.modes`; :func:`run_distill` runs any registered one: it loads the teacher when the mode
needs it, starts the student as the mode says (the teacher's architecture and weights, or fresh), freezes the
teacher (eval mode, no gradient) and feeds it unpaired mammography batches cycling through its cache's training
split when the mode reads them, and adds the loss and modules the mode builds:

``lesion``   Per step: teacher lesion points averaged over its batch -> (C, P); student lesion points averaged
             over the DBT batch's lesion images -> (C, P) -> learnable Linear(P, P); loss ``alpha * T^2 * KL``
             added to the detection loss (``lesion_kd_loss``). Teacher batches of lesion images only.
``image``    Whole feature maps, batch-averaged (C, h*w), Linear(student h*w -> teacher h*w), the same KL
             (``image_kd_loss``).

Validation every epoch: full volume inference on the val DBT volumes, volume NMS and the DBTex metric; best.pt
by ``mean_sensitivity_positive``. ``train_ratio`` keeps a seeded, patient-level subset of the training cases
(recorded in ``train_subset.json`` in the run folder).
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import numpy as np
import torch
from pydantic import ValidationError

from comoto_cli.cache import SliceCache
from comoto_cli.config import DistillConfig, InferenceConfig, ModelConfig
from comoto_cli.data.datasets import DetectionDataset, infinite_batches, move_batch
from comoto_cli.engine import distributed
from comoto_cli.engine.diagnostics import (
    DistillDiagnostics,
    coarse_map_warning,
    describe_choice,
    describe_diagnostics,
    map_facts,
    resolve_distill_feature,
    shorter_sides,
    training_boxes,
)
from comoto_cli.engine.modes import DistillMode, ModeSetup, get_mode
from comoto_cli.engine.trainer import LAST_CHECKPOINT, seed_everything, train
from comoto_cli.errors import UsageError
from comoto_cli.evaluation.evaluate_checkpoint import dbtex_ground_truth
from comoto_cli.inference.volume import detect_cache
from comoto_cli.losses import (
    PointProjection,
    has_boxes,
    image_kd_loss,
    image_projection,
    lesion_kd_loss,
    lesion_points,
    masked_batch_mean,
)
from comoto_cli.metrics.registry import compute_metrics, metric_names
from comoto_cli.networks.backbone import AUTO_FEATURE, cells_per_axis, fit_first_conv
from comoto_cli.networks.checkpoint import load_detector
from comoto_cli.networks.detector import build_detector
from comoto_cli.utils.atomic import ensure_writable_dir, sha256_file, write_json_atomic
from comoto_cli.utils.system import loader_workers

SUBSET_FILE = "train_subset.json"


def patient_subset(patients: np.ndarray, ratio: float, seed: int) -> np.ndarray:
    """Seeded patient-level subset for the low-data setting: sorted unique patients, a seeded permutation, the
    first ``max(1, round(ratio * n))``. Deterministic whatever the order of ``patients``."""
    unique = np.array(sorted(set(str(p) for p in patients)), dtype=object)
    if ratio >= 1.0 or len(unique) == 0:
        return unique
    keep = max(1, int(round(ratio * len(unique))))
    order = np.random.default_rng(np.random.SeedSequence([seed, 0x5EED])).permutation(len(unique))
    return np.array(sorted(unique[order[:keep]]), dtype=object)


def training_rows(cache, ratio: float, seed: int) -> tuple[np.ndarray, list[str]]:
    """Rows of the cache's training slices that belong to the kept patients, and those patients."""
    rows = cache.slices_in_split("train")
    patients_of_rows = cache.volumes["patient_id"][cache.slice_volume[rows]]
    kept = patient_subset(patients_of_rows, ratio, seed)
    return rows[np.isin(patients_of_rows, kept)], [str(p) for p in kept]


def check_distill_config(config: DistillConfig) -> DistillMode:
    """What ``distill`` needs from its config, checked before any file is read or model trained; its mode."""
    mode = get_mode(config.mode)
    config.require("cache", "out")
    if mode.needs_teacher:
        config.require("teacher", needed_by=f"mode {mode.name}")
    if mode.needs_teacher_cache:
        config.require("teacher_cache", needed_by=f"mode {mode.name}")
    config.require_metric(metric_names("volume"), "distill")
    return mode


def make_volume_val_fn(cache, inference: InferenceConfig, split: str = "val"):
    """``val_fn`` for the trainer: every registered volume-level metric (:mod:`comoto_cli.metrics.registry`; by
    default the DBTex metric and ``num_predictions``) of full-volume inference on ``split``."""

    boxes, labels = dbtex_ground_truth(cache, split)
    if len(boxes["X"]) == 0:
        raise UsageError(f"the {split} split has no lesion volume: the DBTex metric is undefined; preprocess with a "
                         "larger val fraction", path=cache.path)

    def val_fn(model) -> dict:
        device = next(model.parameters()).device
        predictions = detect_cache(model, cache, split, inference, device, progress=False)
        return compute_metrics("volume", predictions, (boxes, labels))

    val_fn.size = len(cache.volumes_in_split(split))  # the trainer's val_every "auto" reads it
    return val_fn


def _observe(diagnostics, ctx, losses: dict, kd=None, teacher=None) -> None:
    """Report one step to the run's :class:`DistillDiagnostics` (none in library use without it)."""
    if diagnostics is not None:
        detection = sum(losses.values()) if kd is not None else None
        diagnostics.observe_step(ctx.epoch, kd, detection, teacher)


def make_lesion_kd_loss(config: DistillConfig, teacher, teacher_batches, student_size, teacher_size,
                        diagnostics=None):
    """The trainer's ``extra_loss`` for LsKD: ``{"lskd": ...}``; ``{}`` before ``distill_start_epoch`` or for a
    DBT batch without lesions (LsKD only distils lesion points). Every step is reported to ``diagnostics``."""

    def kd_and_target(batch, features, ctx):
        """(the KD term, the teacher's (C, P) points), or (None, None) on a step without lesion points."""
        if ctx.epoch < config.distill_start_epoch:
            return None, None
        student_boxes = [target["boxes"] for target in batch["targets"]]
        student_mask = has_boxes(student_boxes)
        if not bool(student_mask.any()):
            return None, None
        mammo = move_batch(next(teacher_batches), ctx.device)
        teacher_boxes = [target["boxes"] for target in mammo["targets"]]
        with torch.no_grad():
            teacher_map = teacher.distill_features(mammo["images"]).float()
            teacher_points = masked_batch_mean(
                lesion_points(teacher_map, teacher_boxes, teacher_size, config.num_points), has_boxes(teacher_boxes))
        if teacher_points is None:
            return None, None
        student_points = masked_batch_mean(
            lesion_points(features.float(), student_boxes, student_size, config.num_points), student_mask)
        projected = ctx.extra_modules["projection"](student_points)
        return lesion_kd_loss(projected, teacher_points, config.alpha, config.temperature), teacher_points

    def lskd(batch, losses, features, ctx):
        kd, target = kd_and_target(batch, features, ctx)
        _observe(diagnostics, ctx, losses, kd, target)
        return {} if kd is None else {"lskd": kd}

    return lskd


def make_image_kd_loss(config: DistillConfig, teacher, teacher_batches, diagnostics=None):
    """The trainer's ``extra_loss`` for the image-level KD baseline: ``{"image_kd": ...}``."""

    def image_kd(batch, losses, features, ctx):
        if ctx.epoch < config.distill_start_epoch:
            _observe(diagnostics, ctx, losses)
            return {}
        mammo = move_batch(next(teacher_batches), ctx.device)
        with torch.no_grad():
            teacher_map = teacher.distill_features(mammo["images"]).float()
        projection = ctx.extra_modules["projection"]
        kd = image_kd_loss(features.float(), teacher_map, projection, config.alpha, config.temperature)
        _observe(diagnostics, ctx, losses, kd, teacher_map.flatten(2).mean(dim=0))
        return {"image_kd": kd}

    return image_kd


def build_lesion_kd(setup: ModeSetup):
    """Mode ``lesion``: LsKD's loss and its learnable Linear(P, P) projection."""
    extra_modules = {"projection": PointProjection(setup.config.num_points)}
    return make_lesion_kd_loss(setup.config, setup.teacher, setup.teacher_batches, setup.student_size,
                               setup.teacher_size, setup.diagnostics), extra_modules


def build_image_kd(setup: ModeSetup):
    """Mode ``image``: the image-level KD loss and its Linear(student h*w -> teacher h*w), sized by one forward pass
    of each network."""
    with torch.no_grad():
        probe = torch.zeros(1, 1, *setup.student_size)
        student_shape = setup.model.distill_features(probe).shape
        teacher_shape = setup.teacher.distill_features(torch.zeros(1, 1, *setup.teacher_size).to(setup.device)).shape
    extra_modules = {"projection": image_projection(student_shape, teacher_shape)}
    return make_image_kd_loss(setup.config, setup.teacher, setup.teacher_batches, setup.diagnostics), extra_modules


def _student_data(config: DistillConfig):
    """The DBT cache, the kept training rows and patients, the training set and the validation function."""
    cache = SliceCache(config.cache)
    if cache.modality != "dbt":
        raise UsageError(f"a '{cache.modality}' cache; the student trains on a DBT cache (`comoto preprocess dbt`)",
                         path=config.cache)
    rows, kept_patients = training_rows(cache, config.train_ratio, config.seed)
    train_set = DetectionDataset(cache, "train", augment=config.augment, seed=config.seed, rows=rows,
                                 input_slices=config.model.input_slices)
    if len(train_set) == 0:
        raise UsageError("the train split has no slices", path=config.cache)
    inference = config.val_inference.model_copy(update={"batch_size": config.val_batch_size,
                                                         "num_workers": config.num_workers})
    val_fn = make_volume_val_fn(cache, inference)
    return cache, rows, kept_patients, train_set, val_fn


def _student_and_teacher(config: DistillConfig, mode: DistillMode, student_size: tuple[int, int], sources):
    """The student as the mode starts it, the teacher (None when the mode needs none), its metadata and the
    ``auto`` map choice (None when the map was named). ``sources``: (cache, training rows) of the DBT cache and, when
    the mode reads one, the teacher's cache: what ``distill_feature: auto`` sizes the map by."""
    teacher, teacher_meta = None, {}
    if mode.needs_teacher:  # loaded before the student is built: the order of the seeded initialisations
        teacher, teacher_meta = load_detector(Path(config.teacher), map_location="cpu")
    own, choice = resolve_distill_feature(config.model, sources)
    if mode.init == "teacher":
        # Student = teacher architecture: "the reference initialises the student from the teacher"; only its input
        # slices are the student's own (a 2.5-D student starts from the 2-D teacher, see fit_first_conv).
        check_same_map(own, teacher.config, config.model, Path(config.teacher))
        model_config = with_input_slices(teacher.config, config.model.input_slices, Path(config.teacher))
    else:
        model_config = own
    model = build_detector(model_config, student_size)
    if mode.init == "teacher":
        model.load_state_dict(fitted_to(teacher.state_dict(), model.state_dict()))
    return model, teacher, teacher_meta, choice


def check_same_map(student: ModelConfig, teacher: ModelConfig, given: ModelConfig, path: Path) -> None:
    """A student that names its distillation map (or ``auto``) distils on the teacher's: one usage error if not.
    A student that leaves the field unset takes the teacher's."""
    if "distill_feature" not in given.model_fields_set or student.distill_feature == teacher.distill_feature:
        return
    named = ("auto chose" + " (over the DBT and the teacher's training lesions)"
             if given.distill_feature == AUTO_FEATURE else "names")
    raise UsageError(f"the teacher was trained on the distillation map {teacher.distill_feature!r}, this student's "
                     f"model.distill_feature {named} {student.distill_feature!r}; train the teacher with "
                     f"--distill-feature {student.distill_feature}, or leave the student's unset to distil on the "
                     "teacher's", path=path)


def with_input_slices(model: ModelConfig, slices: int, teacher: Path) -> ModelConfig:
    """The teacher's model config with the student's input slices, validated as a config file would be."""
    try:
        return ModelConfig.model_validate({**model.model_dump(), "input_slices": slices})
    except ValidationError as exc:
        reason = exc.errors()[0]["msg"].removeprefix("Value error, ")
        raise UsageError(f"a student initialised from this teacher cannot take {slices} input slices: {reason}",
                         path=teacher) from None


def fitted_to(state: dict, target: dict) -> dict:
    """``state`` with each first convolution fitted to ``target``'s input channels (:func:`fit_first_conv`)."""
    return {key: fit_first_conv(value, target[key].shape[1]) if key.endswith("body.conv1.weight") else value
            for key, value in state.items()}


def _freeze(teacher, device):
    teacher.to(device).eval()
    for parameter in teacher.parameters():
        parameter.requires_grad_(False)
    return teacher


def _with_teacher_batches(setup: ModeSetup, mode: DistillMode, teacher, env) -> tuple[ModeSetup, dict]:
    """``setup`` with the frozen teacher and the endless batches of its cache; what the checkpoint records of them."""
    config = setup.config
    mammo = SliceCache(config.teacher_cache)
    if mammo.modality != "mammo":
        raise UsageError(f"--teacher-cache must be a mammography cache, this one is '{mammo.modality}'",
                         path=config.teacher_cache)
    teacher_size = (mammo.image_height, mammo.image_width)
    if tuple(teacher.image_size) != teacher_size:
        raise UsageError(f"the teacher was trained on {teacher.image_size[0]}x{teacher.image_size[1]} images,"
                         f" the teacher cache holds {teacher_size[0]}x{teacher_size[1]}", path=config.teacher_cache)
    if teacher.geometry != mammo.geometry:
        raise UsageError(f"the teacher was trained on images framed with geometry {teacher.geometry!r}, the teacher "
                         f"cache was made with {mammo.geometry!r}", path=config.teacher_cache)
    _freeze(teacher, env.device)
    mammo_set = DetectionDataset(mammo, "train", augment=None, lesions_only=mode.teacher_images == "lesions",
                                 stored_precision=env.device.type == "cuda")
    # Each rank draws its own stream of unpaired mammography batches.
    # Its own loader workers (half the automatic count; the DBT loader has the other half).
    teacher_batches = infinite_batches(mammo_set, batch_size=config.batch_size,
                                       seed=config.seed + 7919 * (env.rank + 1),
                                       num_workers=loader_workers(config.num_workers, env.device.type, 2),
                                       pin_memory=env.device.type == "cuda")
    info = {"teacher_cache": str(config.teacher_cache), "teacher_images": len(mammo_set)}
    return replace(setup, teacher=teacher, teacher_batches=teacher_batches, teacher_size=teacher_size), info


def _mode_extras(config: DistillConfig, mode: DistillMode, model, teacher, student_size, env, diagnostics=None):
    """The mode's extra loss and modules (None, {} for the detection loss alone) and its teacher-batch metadata."""
    factory = mode.factory()
    if factory is None:
        return None, {}, {}
    setup, teacher_info = ModeSetup(config=config, model=model, student_size=student_size, device=env.device,
                                    diagnostics=diagnostics), {}
    if mode.needs_teacher_cache:
        setup, teacher_info = _with_teacher_batches(setup, mode, teacher, env)
    elif mode.needs_teacher:
        setup = replace(setup, teacher=_freeze(teacher, env.device))
    extra_loss, extra_modules = factory(setup)
    return extra_loss, extra_modules, teacher_info


def run_distill(config: DistillConfig, *, resume: bool = False, console=None) -> dict:
    """Everything ``comoto distill`` does after parsing; returns the trainer's summary."""

    say = console.print if console is not None else print
    mode = check_distill_config(config)
    out = Path(config.out)
    if not resume and (out / LAST_CHECKPOINT).exists():
        raise UsageError(f"{out} already holds a training run ({LAST_CHECKPOINT}); pass --resume to continue it "
                         "or choose another --out")
    cache, rows, kept_patients, train_set, val_fn = _student_data(config)
    student_size = (cache.image_height, cache.image_width)
    sources = [(cache, rows)]
    if mode.needs_teacher_cache:
        mammo = SliceCache(config.teacher_cache)
        sources.append((mammo, mammo.slices_in_split("train")))

    env = distributed.init_distributed()
    try:
        seed_everything(config.seed, config.deterministic)
        model, teacher, teacher_meta, choice = _student_and_teacher(config, mode, student_size, sources)
        model.geometry = cache.geometry
        diagnostics, warning = _diagnostics(config, mode, model, sources)
        for teacher_cache, _ in sources[1:]:  # read for its boxes; the teacher batches open their own
            teacher_cache.close()
        extra_loss, extra_modules, teacher_info = _mode_extras(config, mode, model, teacher, student_size, env,
                                                               diagnostics)
        metadata = {
            "kind": "student", "modality": "dbt", "mode": config.mode, "cache": str(config.cache),
            "cache_config_hash": str(cache.attrs.get("config_hash", "")), "train_ratio": config.train_ratio,
            "train_patients": len(kept_patients),
            "teacher": None if config.teacher is None else str(config.teacher),
            "teacher_sha256": None if config.teacher is None else sha256_file(Path(config.teacher)),
            "teacher_kind": teacher_meta.get("kind"), **teacher_info,
            "distill_feature_choice": choice, "distill_map": diagnostics.static,
        }
        if env.is_main:
            ensure_writable_dir(out)
            write_json_atomic(out / SUBSET_FILE, {"train_ratio": config.train_ratio, "seed": config.seed,
                                                  "patients": kept_patients, "slices": int(len(rows))})
            say(f"distill --mode {config.mode}: {len(train_set)} training slices ({train_set.num_with_lesions()} "
                f"with lesions) from {len(kept_patients)} patients (train_ratio {config.train_ratio}), "
                f"{len(cache.volumes_in_split('val'))} validation volumes, {student_size[0]}x{student_size[1]}, "
                f"device {env.device}")
            for line in (describe_choice(choice) if choice else None, warning):
                if line:
                    say(line)
        summary = train(config, model=model, train_set=train_set, val_fn=val_fn, run_dir=out,
                        extra_loss=extra_loss, extra_modules=extra_modules, resume=resume, metadata=metadata,
                        dist_env=env, console=console,
                        loader_share=2 if teacher_info else 1,  # the teacher batches have a loader of their own
                        epoch_report=diagnostics.epoch_report)
    finally:
        distributed.cleanup(env)
    if env.is_main:
        best = summary["best_value"]
        say(f"best {summary['best_metric']} = {best if best is None else round(best, 4)} "
            f"(epoch {summary['best_epoch']}); checkpoints in {out}")
        report = summary["history"][-1].get("distill_diagnostics") if summary["history"] else None
        if report is not None:  # absent from the epochs of a run started before the diagnostics
            say(describe_diagnostics(report))
    return summary


def _diagnostics(config: DistillConfig, mode: DistillMode, model, sources) -> tuple[DistillDiagnostics, str | None]:
    """The run's diagnostics (the distilled map against the training lesions, measured once) and, for a mode that
    distils, the too-coarse warning line, if any."""
    stride, name = model.backbone.distill_stride, model.config.distill_feature
    boxes = [training_boxes(cache, rows) for cache, rows in sources]
    caches = [cache for cache, _ in sources]
    sizes = [(cache.image_height, cache.image_width) for cache in caches]
    static = map_facts(name, stride, sizes[0], boxes[0], config.num_points)
    if len(sources) > 1:
        teacher = map_facts(name, stride, sizes[1], boxes[1], config.num_points)
        static.update({"teacher_map_shape": teacher["map_shape"],
                       "teacher_cells_per_lesion_median": teacher["cells_per_lesion_median"],
                       "teacher_cells_per_axis_median": teacher["cells_per_axis_median"]})
    distils = mode.needs_teacher_cache
    warning = None
    sides = [shorter_sides(b) for b in boxes]
    medians = [float(np.median(cells_per_axis(s, size[1], stride))) for s, size in zip(sides, sizes) if len(s)]
    if distils and medians:
        warning = coarse_map_warning(name, min(medians), model.config, sides, [size[1] for size in sizes],
                                     from_teacher=mode.init == "teacher")
    return DistillDiagnostics(static, model, config.temperature, distils=distils), warning
