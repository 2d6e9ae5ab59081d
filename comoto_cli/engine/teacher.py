"""The mammography teacher: RetinaNet on a mammography cache, with ImPA by default, on the shared trainer.

ImPA (intra-modal point alignment, docs/design.md section 3) is an ``extra_loss`` of the trainer: on each batch, the
lesion points of the images that have boxes are pulled together and pushed away from random background points.
Validation every epoch on the cache's val split: per-image FROC and COCO AP; ``best.pt`` by ``best_metric``.
Under ``torchrun --nproc_per_node N`` the same code trains with DDP.
"""

from __future__ import annotations

from pathlib import Path

from comoto_cli.cache import SliceCache
from comoto_cli.config import TeacherConfig
from comoto_cli.data.datasets import DetectionDataset
from comoto_cli.engine import distributed
from comoto_cli.engine.diagnostics import describe_choice, resolve_distill_feature
from comoto_cli.engine.trainer import LAST_CHECKPOINT, seed_everything, train
from comoto_cli.errors import UsageError
from comoto_cli.evaluation.validation import make_val_fn
from comoto_cli.losses import background_points, impa_loss, lesion_points
from comoto_cli.metrics.registry import metric_names
from comoto_cli.networks.detector import build_detector


def make_impa_loss(config: TeacherConfig, image_size: tuple[int, int]):
    """The trainer's ``extra_loss`` for ImPA: ``{"impa": beta * (...)}``, or ``{}`` for a batch without lesions.

    Positives: lesion points (B_l, C, P) of the batch's images that have boxes; negatives: P random feature
    positions outside every box of those same images (drawn with the step's seeded generator).
    """

    def impa(batch, losses, features, ctx):
        keep = [index for index, target in enumerate(batch["targets"]) if len(target["boxes"]) > 0]
        if not keep:
            return {}
        boxes = [batch["targets"][index]["boxes"] for index in keep]
        selected = features[keep].float()
        positive = lesion_points(selected, boxes, image_size, config.num_points)
        negative = background_points(selected, boxes, image_size, config.num_points, generator=ctx.generator)
        return {"impa": impa_loss(positive, negative, config.beta)}

    return impa


def check_teacher_config(config: TeacherConfig) -> None:
    """What ``train-teacher`` needs from its config, checked before any file is read or model trained."""
    config.require("cache", "out")
    config.require_metric(metric_names("image"), "train-teacher")


def run_train_teacher(config: TeacherConfig, *, resume: bool = False, console=None) -> dict:
    """Everything ``comoto train-teacher`` does after parsing; returns the trainer's summary. Messages go to
    ``console`` (a rich Console) or stdout."""

    check_teacher_config(config)
    say = console.print if console is not None else print
    out = Path(config.out)
    if not resume and (out / LAST_CHECKPOINT).exists():
        raise UsageError(f"{out} already holds a training run ({LAST_CHECKPOINT}); pass --resume to continue it "
                         "or choose another --out")
    cache = SliceCache(config.cache)
    if cache.modality != "mammo":
        raise UsageError(f"{config.cache}: a '{cache.modality}' cache; the teacher trains on a mammography cache "
                         "(`comoto preprocess mammo`)")
    image_size = (cache.image_height, cache.image_width)
    slices = config.model.input_slices  # a mammogram is one slice: its channels repeat it
    train_set = DetectionDataset(cache, "train", augment=config.augment, seed=config.seed, input_slices=slices)
    val_set = DetectionDataset(cache, "val", input_slices=slices)
    if len(train_set) == 0:
        raise UsageError(f"{config.cache}: the train split has no images")
    if len(val_set) == 0:
        raise UsageError(f"{config.cache}: the val split has no images (preprocess with split.val_fraction > 0)")

    env = distributed.init_distributed()
    try:
        seed_everything(config.seed, config.deterministic)
        model_config, choice = resolve_distill_feature(config.model, [(cache, cache.slices_in_split("train"))])
        model = build_detector(model_config, image_size)
        model.geometry = cache.geometry
        metadata = {
            "kind": "teacher",
            "modality": "mammo",
            "cache": str(config.cache),
            "cache_config_hash": str(cache.attrs.get("config_hash", "")),
            "impa": config.impa,
            "distill_feature_choice": choice,
        }
        if env.is_main:
            say(f"train-teacher: {len(train_set)} training images ({train_set.num_with_lesions()} with lesions), "
                f"{len(val_set)} validation images, {image_size[0]}x{image_size[1]}, "
                f"ImPA {'on' if config.impa else 'off'}, device {env.device}"
                + (f", {env.world_size} processes" if env.enabled else ""))
            if choice is not None:
                say(describe_choice(choice))
        summary = train(
            config, model=model, train_set=train_set, val_fn=make_val_fn(val_set, batch_size=config.val_batch_size,
                                                                    num_workers=config.num_workers),
            run_dir=out, extra_loss=make_impa_loss(config, image_size) if config.impa else None,
            resume=resume, metadata=metadata, dist_env=env, console=console,
        )
    finally:
        distributed.cleanup(env)
    if env.is_main:
        best = summary["best_value"]
        say(f"best {summary['best_metric']} = {best if best is None else round(best, 4)} "
            f"(epoch {summary['best_epoch']}); checkpoints in {out}")
    return summary
