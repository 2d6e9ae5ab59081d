"""How peaked is the target LsKD asks the student to match? For a trained teacher and its mammography cache: on
every map the distillation can read (the last ResNet stage and each FPN level), the entropy of softmax(points / T)
over the P lesion points (divided by log P, mean over channels; 1.0 is flat) at several temperatures, for single
images and for the batch mean LsKD takes (batches of ``--batch`` lesion images), with the features' scale: the mean
|feature| and the median spread (max - min) of a channel over a lesion's points. The spread against T is what makes
the target flat or peaked: softmax(x / T) is near uniform while the spread is well below T. Writes OUT.json and
OUT.md.

    python -m benchmarks.lskd_target runs/experiment-lowdata/teachers/impa/best.pt runs/experiment-lowdata/mammo.h5 \\
        --out benchmarks/reproduction/lskd_target
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np
import torch

from comoto_cli.cache import SliceCache
from comoto_cli.engine.diagnostics import entropy_ratio, map_facts, training_boxes
from comoto_cli.losses import has_boxes, lesion_points
from comoto_cli.networks.backbone import distill_candidates
from comoto_cli.networks.checkpoint import load_detector
from comoto_cli.utils.atomic import write_json_atomic, write_text_atomic


def lesion_images(cache: SliceCache) -> list[int]:
    return [int(row) for row in cache.slices_in_split("train") if len(cache.boxes(int(row)))]


def measure(teacher: Path, cache_path: Path, temperatures: list[float], batch: int, points: int) -> list[dict]:
    model, _ = load_detector(teacher, map_location="cpu")
    model.eval()
    cache = SliceCache(cache_path)
    size = (cache.image_height, cache.image_width)
    rows = lesion_images(cache)
    collected: dict[str, list[torch.Tensor]] = {}
    with torch.no_grad():
        for start in range(0, len(rows), batch):
            chunk = rows[start:start + batch]
            images = torch.stack([torch.from_numpy(np.asarray(cache.image(r), dtype=np.float32)) for r in chunk])
            boxes = [torch.as_tensor(cache.boxes(r), dtype=torch.float32) for r in chunk]
            for name, features in model.backbone.feature_maps(images[:, None]).items():
                found = lesion_points(features.float(), boxes, size, points)[has_boxes(boxes)]
                collected.setdefault(name, []).append(found)  # (b, C, P)
    strides = dict(distill_candidates(model.config))
    results = []
    for name, chunks in collected.items():
        single = torch.cat(chunks)  # (N, C, P): one image's points each
        means = torch.stack([chunk.mean(dim=0) for chunk in chunks if len(chunk)])  # (batches, C, P): LsKD's target
        facts = map_facts(name, strides[name], size, training_boxes(cache, np.array(rows)), points)
        row = {"map": name, "stride": strides[name], "map_shape": facts["map_shape"],
               "cells_per_lesion_median": facts["cells_per_lesion_median"],
               "cells_per_axis_median": facts["cells_per_axis_median"], "images": int(len(single)),
               "mean_abs_feature": float(single.abs().mean()),
               "zero_share": float((single == 0).float().mean()),
               "spread_single_median": float((single.amax(-1) - single.amin(-1)).median()),
               "spread_batch_median": float((means.amax(-1) - means.amin(-1)).median())}
        for temperature in temperatures:
            row[f"entropy_single_T{temperature:g}"] = float(np.mean([entropy_ratio(p, temperature) for p in single]))
            row[f"entropy_batch_T{temperature:g}"] = float(np.mean([entropy_ratio(p, temperature) for p in means]))
        results.append(row)
    return results


def markdown(results: list[dict], temperatures: list[float], teacher: Path, batch: int) -> str:
    lines = [f"Teacher {teacher}, {results[0]['images']} training lesion images, batch mean over {batch} (LsKD's "
             f"target); {time.strftime('%Y-%m-%d')}. Entropy over the points / log P (1.0 = flat), single image / "
             "batch mean.", "",
             "| map | stride | map | cells of a lesion's points | cells per axis | mean abs feature | zeros | "
             "spread single | spread batch | " + " | ".join(f"T = {t:g}" for t in temperatures) + " |",
             "|---|---|---|---|---|---|---|---|---|" + "---|" * len(temperatures)]
    for row in results:
        entropies = " | ".join(f"{row[f'entropy_single_T{t:g}']:.3f} / {row[f'entropy_batch_T{t:g}']:.3f}"
                               for t in temperatures)
        lines.append(f"| {row['map']} | {row['stride']} | {row['map_shape'][0]}x{row['map_shape'][1]} | "
                     f"{row['cells_per_lesion_median']:g} | {row['cells_per_axis_median']:.2f} | "
                     f"{row['mean_abs_feature']:.3f} | {row['zero_share']:.2f} | {row['spread_single_median']:.3f} | "
                     f"{row['spread_batch_median']:.3f} | {entropies} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("teacher", type=Path)
    parser.add_argument("cache", type=Path)
    parser.add_argument("--out", type=Path, required=True, help="OUT.json and OUT.md")
    parser.add_argument("--temperatures", type=float, nargs="+", default=[4.0, 1.0, 0.25, 0.05])
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--points", type=int, default=9)
    args = parser.parse_args()
    results = measure(args.teacher, args.cache, args.temperatures, args.batch, args.points)
    write_json_atomic(args.out.with_suffix(".json"), results)
    write_text_atomic(args.out.with_suffix(".md"), markdown(results, args.temperatures, args.teacher, args.batch))
    print(args.out.with_suffix(".md").read_text())


if __name__ == "__main__":
    main()
