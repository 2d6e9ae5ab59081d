"""Volume inference next to the bare network forward over the same slices.

``run()`` builds a detector, makes a random volume at the model's size and times, per volume:

- ``bare_forward_s``: ``model.detector.network(images)`` alone (backbone + FPN + heads), batch by batch;
- ``volume_s``: :func:`comoto_cli.inference.volume.volume_predictions` (forward, the batch-wise
  post-processing of ``model.predict``, volume NMS, mapping to the official frame);
- ``volume_monai_s``: the same with MONAI's own post-processing (``monai_detections``) instead, for reference.

``ratio`` = volume_s / bare_forward_s (goal: about 1.3 or less). Each is the best of ``repeats`` interleaved
runs after a warm-up. ``logit_bias`` sets the classification bias: None keeps the untrained prior (almost no
anchor passes the score threshold), a value such as -2.0 makes every anchor a candidate -- the worst case for
post-processing (top-k of each level full, NMS on thousands of boxes), closer to a trained model's output.

    python benchmarks/bench_inference.py [--height 512 --width 256 --slices 32 --batch-size 16 --device cpu]
"""

from __future__ import annotations

import argparse
import json
import time

TINY_MODEL = {"backbone": "resnet18", "width": [8, 16, 32, 64], "fpn_channels": 16,
              "anchor_base_sizes": [16.0, 16.0]}


def _synchronize(device) -> None:
    import torch

    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def run(image_size: tuple[int, int] = (256, 128), slices: int = 32, batch_size: int = 16, repeats: int = 3,
        model: dict | None = None, logit_bias: float | None = None, device: str | None = None,
        threads: int | None = None, seed: int = 0) -> dict:
    import numpy as np
    import torch

    from comoto_cli.config import InferenceConfig, ModelConfig
    from comoto_cli.inference.volume import detections_to_dbtex, volume_predictions
    from comoto_cli.networks.detector import build_detector, monai_detections

    if threads:
        torch.set_num_threads(threads)
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    torch.manual_seed(seed)
    config = ModelConfig(**(model if model is not None else TINY_MODEL))
    detector = build_detector(config, image_size).to(device).eval()
    if logit_bias is not None:
        head = detector.detector.network.classification_head
        last = [m for m in head.modules() if isinstance(m, torch.nn.Conv2d)][-1]
        last.bias.data.fill_(float(logit_bias))
    volume = torch.from_numpy(np.random.default_rng(seed).random((slices, *image_size), dtype=np.float32)).to(device)
    inference = InferenceConfig(batch_size=batch_size)

    def bare() -> None:
        with torch.no_grad():
            for start in range(0, slices, batch_size):
                detector.detector.network(volume[start:start + batch_size, None])
        _synchronize(device)

    def fast() -> dict:
        rows = volume_predictions(detector, volume, scale_y=1.0, scale_x=1.0, config=inference, device=device)
        _synchronize(device)
        return rows

    def monai() -> dict:
        indices, boxes, scores = [], [], []
        for start in range(0, slices, batch_size):
            for offset, output in enumerate(monai_detections(detector, volume[start:start + batch_size, None])):
                indices.append(np.full(len(output["scores"]), start + offset))
                boxes.append(output["boxes"].cpu().numpy().reshape(-1, 4))
                scores.append(output["scores"].cpu().numpy())
        detections = {"slice_index": np.concatenate(indices).astype(np.int64), "boxes": np.concatenate(boxes),
                      "scores": np.concatenate(scores)}
        rows = detections_to_dbtex(detections, scale_y=1.0, scale_x=1.0, num_slices=slices, config=inference)
        _synchronize(device)
        return rows

    timings: dict[str, list[float]] = {"bare": [], "fast": [], "monai": []}
    outputs = {"fast": fast(), "monai": monai()}
    bare()
    for _ in range(repeats):
        for name, function in (("bare", bare), ("fast", fast), ("monai", monai)):
            started = time.perf_counter()
            function()
            timings[name].append(time.perf_counter() - started)
    best = {name: min(values) for name, values in timings.items()}
    same = (len(outputs["fast"]["Score"]) == len(outputs["monai"]["Score"])
            and bool(np.allclose(np.sort(outputs["fast"]["Score"]), np.sort(outputs["monai"]["Score"]))))
    return {
        "device": str(device) if device.type != "cuda" else torch.cuda.get_device_name(device),
        "threads": torch.get_num_threads(),
        "image_size": list(image_size), "slices": slices, "batch_size": batch_size,
        "model": config.backbone + (" tiny" if model is None else ""), "logit_bias": logit_bias,
        "detections_per_volume": len(outputs["fast"]["Score"]),
        "bare_forward_s": best["bare"], "volume_s": best["fast"], "volume_monai_s": best["monai"],
        "ratio": best["fast"] / best["bare"], "ratio_monai": best["monai"] / best["bare"],
        "fast_equals_monai": same,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--height", type=int, default=256)
    parser.add_argument("--width", type=int, default=128)
    parser.add_argument("--slices", type=int, default=32)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--device", default=None)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--resnet50", action="store_true", help="the default-size ResNet-50 model, not the tiny one")
    args = parser.parse_args()
    model = {"backbone": "resnet50"} if args.resnet50 else None
    results = [run((args.height, args.width), args.slices, args.batch_size, args.repeats, model=model,
                   logit_bias=bias, device=args.device, threads=args.threads) for bias in (None, -2.0)]
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
