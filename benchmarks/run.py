"""`make bench`: every benchmark in one run, written to benchmarks/results.json and benchmarks/results.md.

Each result is a ratio of two timings measured in the same run on the same machine (absolute times on shared
machines are noise). Data: `comoto synth` (size via --size) preprocessed once into a DBT and a mammography cache.
"""

from __future__ import annotations

import argparse
import os
import platform
import tempfile
import time
from pathlib import Path

MODEL = {"backbone": "resnet18", "width": [16, 32, 64, 128], "fpn_channels": 32, "returned_layers": [2, 3, 4],
         "anchor_base_sizes": [16.0, 16.0]}


def machine() -> dict:
    import torch

    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {"cpu": cpu, "cores": os.cpu_count(), "torch_threads": torch.get_num_threads(),
            "python": platform.python_version(), "torch": torch.__version__,
            "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
            "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())}


def _markdown(results: dict) -> str:
    m = results["machine"]
    p, t, d, i, s = (results[k] for k in ("preprocess", "train_step", "distill", "inference", "scorer"))
    lines = [
        f"Benchmarks, {m['date']}: {m['cpu']}, {m['cores']} cores, torch {m['torch']} ({m['torch_threads']} threads)"
        + (f", GPU {m['cuda']}" if m["cuda"] else ", no GPU") + ".",
        "",
        "| what | measured | ratio |",
        "|---|---|---|",
        f"| preprocess vs bare pydicom decode (same {p['volumes']} volumes) | {p['preprocess_seconds']:.2f} s vs "
        f"{p['bare_decode_seconds']:.2f} s | {p['preprocess_over_bare_decode']:.2f}x |",
        f"| cache loader vs what training consumes | {d['loader_slices_per_s']:.0f} vs "
        f"{d['training_consumes_slices_per_s']:.0f} slices/s | {d['loader_over_consumption']:.1f}x |",
        f"| training step (batch {t['batch_size']}): data / forward+backward / rest | "
        f"{t['data_seconds_per_step']:.3f} / {t['forward_backward_seconds_per_step']:.3f} / "
        f"{t['rest_seconds_per_step']:.3f} s | {t['fraction_data']:.0%} / {t['fraction_forward_backward']:.0%} / "
        f"{t['fraction_rest']:.0%} |",
        f"| LsKD step vs DBT-only step | {d['lesion_step_s']:.3f} vs {d['none_step_s']:.3f} s | "
        f"{d['lesion_over_none']:.2f}x |",
        f"| LsKD step vs (DBT-only step + teacher forward) | {d['lesion_step_s']:.3f} vs "
        f"{d['none_step_s'] + d['teacher_forward_s']:.3f} s | {d['lesion_over_none_plus_teacher']:.2f}x |",
        f"| volume inference vs bare network forward (per volume) | {i['volume_s']:.3f} vs {i['bare_forward_s']:.3f} s"
        f" | {i['ratio']:.2f}x |",
        f"| DBTex scorer, {s['volumes']} volumes / {s['predictions']} predictions | {s['score_s']:.3f} s | "
        f"{s['volumes_per_s']:.0f} volumes/s |",
    ]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results.json"))
    parser.add_argument("--size", default="tiny", choices=["tiny", "demo", "bench"])
    parser.add_argument("--workdir", type=Path, default=None)
    arguments = parser.parse_args()

    from benchmarks import bench_distill, bench_inference, bench_preprocess, bench_scorer, bench_train
    from comoto_cli.config import PreprocessConfig
    from comoto_cli.preprocess.pipeline import preprocess
    from comoto_cli.utils.atomic import write_json_atomic, write_text_atomic

    with tempfile.TemporaryDirectory() as scratch:
        work = arguments.workdir or Path(scratch)
        print("bench: preprocess vs bare decode", flush=True)
        results = {"machine": machine()}
        results["preprocess"] = bench_preprocess.run(work / "preprocess", size=arguments.size, image_height=256,
                                                     image_width=192)
        data = work / "preprocess" / "synthetic"
        caches = {"dbt": work / "dbt.h5", "mammo": work / "mammo.h5"}
        split = {"val_fraction": 0.25, "test_fraction": 0.25}
        for modality, cache in caches.items():
            preprocess(data / modality, cache, PreprocessConfig(modality=modality, image_height=256, image_width=192,
                                                                lesion_slice_offset=1, split=split), progress=False)
        print("bench: training step", flush=True)
        results["train_step"] = bench_train.run(caches["mammo"], model=MODEL)
        print("bench: distillation overhead and loader", flush=True)
        results["distill"] = bench_distill.run(caches["dbt"], caches["mammo"], MODEL)
        print("bench: volume inference vs bare forward", flush=True)
        results["inference"] = bench_inference.run(image_size=(256, 192), slices=32, model=MODEL, logit_bias=-2.0)
        print("bench: scorer", flush=True)
        results["scorer"] = bench_scorer.run()
    write_json_atomic(arguments.out, results)
    summary = _markdown(results)
    write_text_atomic(arguments.out.with_suffix(".md"), summary)
    print(summary)
    print(f"wrote {arguments.out} and {arguments.out.with_suffix('.md')}")


if __name__ == "__main__":
    main()
