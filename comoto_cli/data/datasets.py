"""Torch datasets over the HDF5 slice cache, shared by the teacher (mammography) and the student (DBT).

A sample is a dict ``{"image": (C, H, W) float32 (C = 1, or ``input_slices`` for 2.5-D input: the slice and its
neighbours in order, the slice in the middle), "boxes": (k, 4) float32 xyxy in cache pixels,
"labels": (k,) int64 zeros, "row": int}``; :func:`collate_detection` stacks a list of them into
``{"images": (B, C, H, W), "targets": [{"boxes", "labels"}...], "rows": (B,) int64}``.

Determinism: the augmentation of sample ``i`` in epoch ``e`` is drawn from a generator seeded with
``(seed, e, i)``, not from a process-global RNG. The same sample is therefore augmented the same way whether
it is loaded in the main process or in any DataLoader worker, and a run resumed at an epoch boundary sees the
same data as an uninterrupted one.
"""

from __future__ import annotations

import random
from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, DistributedSampler, default_collate

from comoto_cli.cache import SliceCache
from comoto_cli.config import AugmentConfig
from comoto_cli.errors import InputDataError
from comoto_cli.transforms.geometry import hflip_boxes, vflip_boxes


def augment_sample(image: np.ndarray, boxes: np.ndarray, augment: AugmentConfig,
                   rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Random flips (boxes mirrored with the image) and intensity jitter of an (H, W) or (C, H, W) image in [0, 1]
    (every channel alike).

    Jitter: ``image * c + b`` with contrast ``c`` in ``1 +- j`` and brightness ``b`` in ``+- j``, clipped to
    [0, 1], ``j = augment.intensity_jitter``. Pure given ``rng``.
    """
    height, width = image.shape[-2:]
    # Draw every random number unconditionally so the stream does not depend on which branches fire.
    draws = rng.random(4)
    if draws[0] < augment.horizontal_flip:
        image = image[..., ::-1]
        boxes = hflip_boxes(boxes, width)
    if draws[1] < augment.vertical_flip:
        image = image[..., ::-1, :]
        boxes = vflip_boxes(boxes, height)
    jitter = augment.intensity_jitter
    if jitter > 0:
        contrast = 1.0 + jitter * (2.0 * draws[2] - 1.0)
        brightness = jitter * (2.0 * draws[3] - 1.0)
        image = np.clip(image * contrast + brightness, 0.0, 1.0)
    return np.ascontiguousarray(image, dtype=np.float32), np.ascontiguousarray(boxes, dtype=np.float32)


def augment_params(draws: np.ndarray, augment: AugmentConfig) -> tuple[float, float, float, float]:
    """:func:`augment_sample`'s decisions from its four draws: (horizontal flip, vertical flip, contrast,
    brightness), flips as 1.0 / 0.0."""
    jitter = augment.intensity_jitter
    return (float(draws[0] < augment.horizontal_flip), float(draws[1] < augment.vertical_flip),
            1.0 + jitter * (2.0 * draws[2] - 1.0) if jitter > 0 else 1.0,
            jitter * (2.0 * draws[3] - 1.0) if jitter > 0 else 0.0)


def augmented_boxes(boxes: np.ndarray, params: tuple[float, ...], shape: tuple[int, ...]) -> np.ndarray:
    height, width = shape[-2:]
    if params[0]:
        boxes = hflip_boxes(boxes, width)
    if params[1]:
        boxes = vflip_boxes(boxes, height)
    return np.ascontiguousarray(boxes, dtype=np.float32)


def augment_batch(images: torch.Tensor, params: torch.Tensor) -> torch.Tensor:
    """The pixels of :func:`augment_sample` for a batch on its device: ``images`` (B, C, H, W) in [0, 1], ``params``
    (B, 4) float64 from :func:`augment_params`. The same operations at the same precision in the same order, so the
    same pixels (without jitter the parameters are 1 and 0, which leave an image in [0, 1] as it is)."""
    out = images.clone()
    for index in range(images.shape[0]):
        h_flip, v_flip, contrast, brightness = (float(v) for v in params[index])
        image = out[index]
        if h_flip:
            image = image.flip(-1)
        if v_flip:
            image = image.flip(-2)
        # In float64, as numpy computes a float32 image times a float64 scalar, then rounded back.
        image = (image.double() * contrast + brightness).clamp(0.0, 1.0).to(images.dtype)
        out[index] = image
    return out


class DetectionDataset(Dataset):
    """The 2-D images of one split of a cache, with their lesion boxes.

    ``rows`` restricts the dataset to given rows of ``/slices`` (default: every slice of ``split``);
    ``lesions_only`` keeps the images that have at least one box. ``input_slices`` (odd): each image is the slice
    and its neighbours as channels (2.5-D), clamped at the volume's ends; the cache must store them
    (``preprocess.context_slices``), which is checked here. ``augment=None`` disables augmentation
    (validation). The HDF5 file is opened lazily in each worker process (``SliceCache`` pickles without it).
    """

    def __init__(self, cache: SliceCache | str | Path, split: str = "train", *, augment: AugmentConfig | None = None,
                 seed: int = 0, rows: Sequence[int] | np.ndarray | None = None, lesions_only: bool = False,
                 stored_precision: bool | None = None, input_slices: int = 1):
        self.cache = cache if isinstance(cache, SliceCache) else SliceCache(cache)
        self.split = split
        selected = self.cache.slices_in_split(split) if rows is None else np.asarray(rows, dtype=np.int64)
        if lesions_only:
            selected = selected[self.cache.box_count[selected] > 0]
        self.rows = np.asarray(selected, dtype=np.int64)
        radius = (int(input_slices) - 1) // 2
        self.windows = self.cache.window_rows(self.rows, radius) if radius > 0 else None  # (n, input_slices) rows
        self.augment = augment
        # Resolved here, in the main process: "auto" follows the device training will use (engine.distributed picks
        # CUDA whenever it is available), and loader workers must not probe CUDA themselves.
        self.on_device = augment is not None and (torch.cuda.is_available() if augment.on_device == "auto"
                                                  else bool(augment.on_device))
        # Pixels leave as stored (float16, half the bytes between processes and to the device), widened exactly by
        # move_batch: always when the device augments them, and on request for batches without pixel work (never
        # when the loader augments: that works on float32, as it always has).
        self.stored_precision = self.on_device or (bool(stored_precision) and augment is None)
        self.seed = int(seed)
        self.epoch = 0

    @property
    def image_size(self) -> tuple[int, int]:
        return self.cache.image_height, self.cache.image_width

    def set_epoch(self, epoch: int) -> None:
        """Called by the trainer before each epoch (and before its DataLoader workers are started)."""
        self.epoch = int(epoch)

    def detach_file_handle(self) -> None:
        """In a DataLoader worker: forget an HDF5 handle inherited through ``fork`` (the main process may have
        opened the shared cache, e.g. for validation) so this process opens its own. The inherited one is not
        closed: closing it here could disturb the parent's."""
        self.cache = self.cache.detached()

    def num_with_lesions(self) -> int:
        return int(np.count_nonzero(self.cache.box_count[self.rows] > 0))

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, index: int) -> dict:
        row = int(self.rows[index])
        on_device, stored = self.on_device, self.stored_precision
        try:
            image = self._pixels(row if self.windows is None else self.windows[index], stored)
        except (OSError, KeyError) as exc:
            raise InputDataError(f"cannot read slice {row} ({exc})", path=self.cache.path) from None
        boxes = np.asarray(self.cache.boxes(row), dtype=np.float32).reshape(-1, 4)
        sample = {"labels": torch.zeros(len(boxes), dtype=torch.int64), "row": row}
        if self.augment is not None:
            rng = np.random.default_rng([self.seed, self.epoch, int(index)])
            if on_device:  # the boxes here, the pixels later on the device (augment_batch)
                params = augment_params(rng.random(4), self.augment)
                boxes = augmented_boxes(boxes, params, image.shape)
                sample["augment"] = torch.tensor(params, dtype=torch.float64)
            else:
                image, boxes = augment_sample(image, boxes, self.augment, rng)
        pixels = torch.from_numpy(np.ascontiguousarray(image, dtype=np.float16 if stored else np.float32))
        sample["image"] = pixels if pixels.ndim == 3 else pixels[None]
        sample["boxes"] = torch.from_numpy(boxes.copy())
        return sample

    def _pixels(self, rows: int | np.ndarray, stored: bool) -> np.ndarray:
        """(H, W) for one row, (C, H, W) for a window of rows; a row repeated at a volume's end is read once."""
        read = self.cache.images_f16 if stored else self.cache.image
        if np.ndim(rows) == 0:
            return read(int(rows))
        seen: dict[int, np.ndarray] = {}
        for row in (int(r) for r in rows):
            if row not in seen:
                seen[row] = read(row)
        return np.stack([seen[int(r)] for r in rows])


def collate_detection(samples: list[dict]) -> dict:
    """List of samples -> ``{"images": (B, C, H, W), "targets": [{"boxes", "labels"}], "rows": (B,)}``, plus
    ``"augment"`` (B, 4) when the samples' pixels are to be augmented on the device."""
    batch = {
        # default_collate stacks straight into shared memory inside a loader worker: one copy of the pixels fewer
        "images": default_collate([s["image"] for s in samples]),
        "targets": [{"boxes": s["boxes"], "labels": s["labels"]} for s in samples],
        "rows": torch.tensor([s["row"] for s in samples], dtype=torch.int64),
    }
    if "augment" in samples[0]:
        batch["augment"] = torch.stack([s["augment"] for s in samples])
    return batch


def move_batch(batch: dict, device: torch.device) -> dict:
    """Batch onto ``device`` (non_blocking; pinned memory makes that asynchronous on CUDA), float32, its pixels
    augmented there when the loader left that to the device (``augment.on_device``)."""
    images = batch["images"].to(device, non_blocking=True)
    if images.dtype == torch.float16:  # stored precision (DetectionDataset.stored_precision): widened exactly
        images = images.float()
    if "augment" in batch:
        images = augment_batch(images, batch["augment"])
    return {
        "images": images,
        "targets": [{k: v.to(device, non_blocking=True) for k, v in t.items()} for t in batch["targets"]],
        "rows": batch["rows"],
    }


def seed_worker(worker_id: int) -> None:
    """DataLoader ``worker_init_fn``: numpy and ``random`` follow the worker's torch seed (itself derived from
    the loader's seeded generator), so nothing in a worker draws from an unseeded global RNG."""
    seed = torch.initial_seed() % 2**32
    np.random.seed(seed)
    random.seed(seed)
    info = torch.utils.data.get_worker_info()
    if info is not None and hasattr(info.dataset, "detach_file_handle"):
        info.dataset.detach_file_handle()


def make_sampler(dataset: Dataset, *, seed: int, shuffle: bool = True, rank: int = 0, world_size: int = 1,
                 drop_last: bool = False) -> DistributedSampler:
    """The seeded sampler of every training loader: the order of epoch ``e`` is a permutation seeded with
    ``seed + e`` (call ``set_epoch``), split across ``world_size`` ranks (1 = the whole permutation).

    ``DistributedSampler`` with explicit rank and world size needs no process group, so one code path serves
    single-process and DDP training.
    """
    return DistributedSampler(dataset, num_replicas=world_size, rank=rank, shuffle=shuffle, seed=seed,
                              drop_last=drop_last)


def make_loader(dataset: Dataset, *, batch_size: int, sampler=None, num_workers: int = 0, seed: int = 0,
                pin_memory: bool = False, shuffle: bool = False) -> DataLoader:
    generator = torch.Generator()
    generator.manual_seed(seed)
    return DataLoader(
        dataset, batch_size=batch_size, sampler=sampler, shuffle=shuffle if sampler is None else False,
        num_workers=num_workers, collate_fn=collate_detection, worker_init_fn=seed_worker, generator=generator,
        pin_memory=pin_memory, persistent_workers=False,
    )


def infinite_batches(dataset: DetectionDataset, *, batch_size: int, seed: int = 0, num_workers: int = 0,
                     start_epoch: int = 0, pin_memory: bool = False) -> Iterator[dict]:
    """Endless collated batches over ``dataset``, reshuffled (and re-augmented) at every pass.

    The distillation step draws its unpaired teacher (mammography) batches from this while iterating over the
    student's own loader. Pass ``k`` uses sampler epoch ``start_epoch + k``; the stream is a function of
    ``seed`` alone. Raises InputDataError if the dataset is empty.
    """
    if len(dataset) == 0:
        raise InputDataError(f"no images in the '{dataset.split}' split", path=dataset.cache.path)
    sampler = make_sampler(dataset, seed=seed, shuffle=True)
    loader = make_loader(dataset, batch_size=batch_size, sampler=sampler, num_workers=num_workers, seed=seed,
                         pin_memory=pin_memory)
    epoch = start_epoch
    while True:
        sampler.set_epoch(epoch)
        if hasattr(dataset, "set_epoch"):
            dataset.set_epoch(epoch)
        yield from loader
        epoch += 1
