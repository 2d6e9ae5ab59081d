"""`make bench-full`: preprocessing and prediction at BCS-DBT size, written to benchmarks/results-full.{json,md}.

Volumes: 64 frames of 2457 x 1996, 12 bits, JPEG 2000 lossless and uncompressed (benchmarks/fullsize_data.py,
generated once into bench_data/full). Every measurement runs in a fresh process, so its peak RSS is that of one
preprocess worker (or one `comoto predict`); times compared with each other are taken in turns (interleaved) and
their medians compared. Not part of `make test`: about 10-15 minutes on 2 cores, most of it JPEG 2000 decoding.

Measured:
- JPEG 2000 decoders through pydicom: seconds per frame in one process, and frames/s with every core decoding;
- preprocess (the real worker: decode, flip, window, resize, compress into its work file) against the bare decode
  of the same frames, for a normal training volume (frame 0 for the flip rule + the kept slices), a lesion
  training volume and a validation/test volume (every frame); peak RSS of each;
- cache bytes per validation/test volume at the default 2048 x 1024;
- `comoto predict` on one volume with the default model (ResNet-50) on CPU: seconds and peak RSS;
- a projection of the whole BCS-DBT (train 19,148 volumes of which about 200 with boxes; val 1,163 and test
  1,721 with every frame) to hours on 2 and on 32 cores.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

from benchmarks.fullsize_data import FRAMES, VolumeSpec, write_fullsize_dataset
from benchmarks.run import machine

# The last one is for `comoto predict`: its peak memory does not depend on the frame count (frames stream through
# the network one batch at a time) and one slice takes about 20 s on 2 cores, so 4 frames give the per-slice time.
SPECS = [VolumeSpec(1, "lcc", True, 30), VolumeSpec(2, "rmlo", True, None), VolumeSpec(3, "lcc", False, None),
         VolumeSpec(4, "lcc", True, None, frames=4)]
BCS_DBT = {"train_normal": 19148 - 200, "train_lesion": 200, "val_test": 1163 + 1721}
HEIGHT, WIDTH = 2048, 1024


def _volume(root: Path, spec: VolumeSpec) -> Path:
    return next((root / "Breast-Cancer-Screening-DBT" / f"DBT-P{spec.patient:05d}").rglob("*.dcm"))


# ---------------------------------------------------------------------------------------------- child side
def _child(kind: str, path: str, view: str, frames: list[int] | None, decoder: str, out: str,
           geometry: str = "stretch") -> dict:
    """One measurement in this (fresh) process: bare decode or the preprocess worker on ``frames``."""
    import pydicom
    from pydicom.pixels import iter_pixels

    from comoto_cli.data.dicom_io import plugin_for
    from comoto_cli.preprocess.pipeline import VolumeTask, process_volume
    from comoto_cli.transforms.resize import resize_area

    # A preprocess worker lives for many volumes: its one-time costs (imports, loading the compiled resize
    # kernels) are paid before the clock starts, so the time is what one more volume costs.
    resize_area(np.zeros((64, 48), np.float32), 32, 16)
    started = time.perf_counter()
    if kind == "decode":
        syntax = pydicom.dcmread(path, stop_before_pixels=True).file_meta.TransferSyntaxUID
        plugin = plugin_for(syntax, decoder)
        wanted = sorted({0, *frames}) if frames is not None else list(range(FRAMES))
        count = sum(1 for _ in iter_pixels(path, indices=wanted, decoding_plugin=plugin))
    else:
        task = VolumeTask(0, "dbt", Path(path), view, Path("bench.csv"), 2, frames, (FRAMES, 2457, 1996), HEIGHT,
                          WIDTH, Path(out), 4, decoder, geometry=geometry)
        result = process_volume(task)
        if "error" in result:
            raise SystemExit(str(result["error"]))
        count = len(frames) if frames is not None else FRAMES
    return {"seconds": time.perf_counter() - started, "frames": count, "peak_rss_mib": _peak_rss_mib()}


def _peak_rss_mib() -> float:
    """This process's own peak RSS (VmHWM). getrusage's ru_maxrss would report the parent's peak when that was
    larger: Linux carries it over fork and exec."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _run_child(*args) -> dict:
    command = [sys.executable, "-m", "benchmarks.full", "--child", json.dumps(list(args))]
    output = subprocess.run(command, check=True, capture_output=True, text=True).stdout
    return json.loads(output.strip().splitlines()[-1])


def _throughput(path: Path, decoder: str, workers: int, frames_each: int) -> float:
    """Frames per second with ``workers`` processes decoding at once (what preprocess workers see)."""
    command = [sys.executable, "-m", "benchmarks.full", "--child"]
    started = time.perf_counter()
    processes = [subprocess.Popen(command + [json.dumps(["decode", str(path), "lcc",
                                                         list(range(1 + k * frames_each, 1 + (k + 1) * frames_each)),
                                                         decoder, ""])], stdout=subprocess.DEVNULL)
                 for k in range(workers)]
    for process in processes:
        if process.wait() != 0:
            raise SystemExit("decoder throughput run failed")
    return workers * (frames_each + 1) / (time.perf_counter() - started)


# ---------------------------------------------------------------------------------------------- measurements
def bench_decoders(path: Path, rounds: int) -> dict:
    from pydicom.pixels.decoders import JPEG2000LosslessDecoder

    names = [n for n in ("pylibjpeg", "gdcm", "pillow") if n in JPEG2000LosslessDecoder._available]
    single: dict[str, list[float]] = {n: [] for n in names}
    for _ in range(rounds):
        for name in names:  # interleaved
            result = _run_child("decode", str(path), "lcc", [10, 20, 30], name, "")
            single[name].append(result["seconds"] / result["frames"])
    cores = min(os.cpu_count() or 1, 8)
    busy = {name: _throughput(path, name, cores, 3) for name in names}
    return {"seconds_per_frame_one_process": {n: statistics.median(v) for n, v in single.items()},
            "frames_per_second_all_cores": busy, "cores": cores}


def bench_preprocess(root: Path, work: Path, rounds: int) -> dict:
    j2k_lesion, j2k_normal = _volume(root, SPECS[0]), _volume(root, SPECS[1])
    cases = {
        "train_normal": (j2k_normal, "rmlo", [17, 44], rounds),  # normal_slices_per_volume = 2
        "train_lesion": (j2k_lesion, "lcc", [30], rounds),  # lesion centre slice, offset 0
        "val_test": (j2k_lesion, "lcc", None, 2),  # every frame: about 1.5 minutes a run here
    }
    results = {}
    for name, (path, view, frames, repeats) in cases.items():
        bare, prep, rss = [], [], []
        for _ in range(repeats):
            bare.append(_run_child("decode", str(path), view, frames, "auto", "")["seconds"])
            result = _run_child("preprocess", str(path), view, frames, "auto", str(work / f"{name}.part.h5"))
            prep.append(result["seconds"])
            rss.append(result["peak_rss_mib"])
        results[name] = {"frames_decoded": FRAMES if frames is None else len({0, *frames}),
                         "frames_kept": FRAMES if frames is None else len(frames),
                         "bare_decode_s": statistics.median(bare), "preprocess_s": statistics.median(prep),
                         "ratio": statistics.median(prep) / statistics.median(bare), "peak_rss_mib": max(rss),
                         "runs": repeats}
    results["cache_bytes_per_val_test_volume"] = (work / "val_test.part.h5").stat().st_size
    raw = _volume(root, SPECS[2])
    result = _run_child("preprocess", str(raw), "lcc", None, "auto", str(work / "raw.part.h5"))
    results["uncompressed_val_test"] = {"preprocess_s": result["seconds"], "peak_rss_mib": result["peak_rss_mib"]}
    all_frames = results["val_test"]["bare_decode_s"]
    results["train_normal"]["all_frames_decode_over_preprocess"] = all_frames / results["train_normal"]["preprocess_s"]
    return results


def bench_predict(root: Path, work: Path, input_slices: int = 1) -> dict:
    """`comoto predict` with the default model (random weights: the speed and memory do not depend on them), or
    with it taking ``input_slices`` slices (2.5-D)."""
    import torch

    from comoto_cli.config import ModelConfig
    from comoto_cli.networks.checkpoint import save_checkpoint
    from comoto_cli.networks.detector import build_detector

    checkpoint = work / ("default.pt" if input_slices == 1 else f"default-{input_slices}-slices.pt")
    if not checkpoint.is_file():
        torch.manual_seed(0)
        config = ModelConfig(input_slices=input_slices)
        model = build_detector(config, (HEIGHT, WIDTH))
        save_checkpoint(checkpoint, model_state=model.state_dict(), model_config=config,
                        image_size=(HEIGHT, WIDTH), metadata={"note": "bench-full: untrained default model"})
    volume = _volume(root, SPECS[3])
    predict = ["import sys; from comoto_cli.cli import main; main(sys.argv[1:])", "predict", str(volume),
               "--checkpoint", str(checkpoint), "--out", str(work / "predictions.csv")]
    # Run through a wrapper process so the peak RSS read is that of `comoto predict` alone.
    # VmHWM read by the process itself at exit: getrusage would report a larger parent's peak (see _peak_rss_mib).
    probe = ("import atexit, json; from benchmarks.full import _peak_rss_mib; "
             "atexit.register(lambda: print(json.dumps({'peak_rss_mib': _peak_rss_mib()})))")
    predict[0] = probe + "; " + predict[0]
    started = time.perf_counter()
    output = subprocess.run([sys.executable, "-c", *predict], check=True, capture_output=True, text=True)
    seconds = time.perf_counter() - started
    peak = json.loads(output.stdout.strip().splitlines()[-1])["peak_rss_mib"]
    slices = SPECS[3].frames
    return {"seconds_measured": seconds, "slices_measured": slices, "seconds_per_slice": seconds / slices,
            "seconds_per_64_slice_volume": seconds / slices * FRAMES, "peak_rss_mib": peak,
            "threads": torch.get_num_threads()}


# A ResNet-50 RetinaNet training step at 2048 x 1024, batch 8, took 0.25-0.40 s on an H100 / H200 in the project's
# GPU checks; the faster one is what the loader must keep up with.
GPU_STEP_SECONDS, GPU_STEP_BATCH = 0.25, 8


def _loader_cache(work: Path, compression_level: int) -> Path:
    """Three copies of the validation/test volume's 64 slices as training slices, at ``compression_level`` (4: the
    default gzip; 0: stored uncompressed)."""
    import h5py

    from comoto_cli.cache.h5cache import CacheWriter, StoredSlices, VolumeRecord

    cache = work / ("loader.h5" if compression_level == 4 else f"loader-level{compression_level}.h5")
    if cache.is_file():
        return cache
    with h5py.File(work / "val_test.part.h5", "r") as part:
        images = StoredSlices(part["images"]) if compression_level == 4 else part["images"][()]
        writer = CacheWriter(cache, modality="dbt", image_height=HEIGHT, image_width=WIDTH, config_json="{}",
                             config_hash="bench", compression_level=compression_level)
        for volume in range(3):
            record = VolumeRecord(patient_id=f"P{volume}", study_uid="S", view="lcc", split="train", source="-",
                                  num_slices=FRAMES, original_height=2457, original_width=1996,
                                  scale_y=HEIGHT / 2457, scale_x=WIDTH / 1996,
                                  lesions=[(30, 600.0, 1100.0, 120.0, 120.0)], lesion_classes=["cancer"])
            boxes = [np.array([[500, 900, 600, 1000]], np.float32)] * FRAMES
            writer.add_volume(record, list(range(FRAMES)), images, boxes, [np.array([0])] * FRAMES)
        writer.close()
    return cache


def bench_loader(work: Path, rounds: int) -> dict:
    """Training loader (cache read, inflate, augmentation, collation) at 2048 x 1024, batch 8, with no worker and
    with one worker per core, against what a GPU step consumes; the default gzip cache and an uncompressed one."""
    from comoto_cli.config import AugmentConfig
    from comoto_cli.data.datasets import DetectionDataset, make_loader, make_sampler
    from comoto_cli.utils.system import usable_cores

    caches = {4: _loader_cache(work, 4), 0: _loader_cache(work, 0)}
    cores = usable_cores()
    # (workers, augmentation on the device, compression level): with on_device the loader leaves the pixels to the
    # GPU, whose share of the work is not measured here (no GPU on the bench machine).
    variants = [(0, False, 4), (cores, False, 4), (cores, True, 4), (cores, True, 0)]
    rates: dict[tuple, list[float]] = {variant: [] for variant in variants}
    for _ in range(rounds):
        for workers, on_device, level in variants:  # interleaved
            dataset = DetectionDataset(caches[level], "train", augment=AugmentConfig(on_device=on_device), seed=0)
            loader = make_loader(dataset, batch_size=8, sampler=make_sampler(dataset, seed=0), num_workers=workers)
            batches = iter(loader)
            next(batches)  # worker start-up and first reads are not the steady state
            started, count = time.perf_counter(), 0
            for batch in batches:
                count += len(batch["rows"])
            rates[(workers, on_device, level)].append(count / (time.perf_counter() - started))
    gpu_needs = GPU_STEP_BATCH / GPU_STEP_SECONDS
    best = statistics.median(rates[(cores, False, 4)])
    device = statistics.median(rates[(cores, True, 4)])
    raw = statistics.median(rates[(cores, True, 0)])
    lskd = {name: statistics.median(values) for name, values in lskd_loaders(caches, cores, rounds).items()}
    return {"slices_per_s_main_process": statistics.median(rates[(0, False, 4)]), "workers": cores,
            "slices_per_s_workers": best, "slices_per_s_per_worker": best / cores,
            "gpu_step_consumes_slices_per_s": gpu_needs, "over_gpu_step": best / gpu_needs,
            "over_gpu_step_lskd": best / (2 * gpu_needs),
            "slices_per_s_workers_augment_on_device": device, "over_gpu_step_augment_on_device": device / gpu_needs,
            "slices_per_s_workers_augment_on_device_uncompressed": raw,
            "over_gpu_step_augment_on_device_uncompressed": raw / gpu_needs,
            "cache_bytes_per_slice": {str(level): path.stat().st_size / (3 * FRAMES) for level, path in caches.items()},
            "lskd_slices_per_s": lskd, "lskd_over_gpu_step": {k: v / (2 * gpu_needs) for k, v in lskd.items()}}


def lskd_loaders(caches: dict[int, Path], cores: int, rounds: int) -> dict[str, list[float]]:
    """The two loaders of an LsKD step as distill runs them: the augmented DBT batches and the unaugmented teacher
    batches, each with half the workers, drawn in turns; slices of both per second. Variants: everything in float32
    with augmentation in the loader (as before ``augment.on_device``), the GPU defaults (augmentation on the device,
    both loaders passing the stored float16), and the GPU defaults over uncompressed caches."""
    from comoto_cli.config import AugmentConfig
    from comoto_cli.data.datasets import DetectionDataset, infinite_batches

    variants = {"loader_float32": (False, False, 4), "gpu_defaults_float16": (True, True, 4),
                "gpu_defaults_float16_uncompressed": (True, True, 0)}
    rates: dict[str, list[float]] = {name: [] for name in variants}
    workers = max(1, cores // 2)
    for _ in range(rounds):
        for name, (on_device, stored, level) in variants.items():  # interleaved
            student = DetectionDataset(caches[level], "train", augment=AugmentConfig(on_device=on_device), seed=0)
            teacher = DetectionDataset(caches[level], "train", seed=1, stored_precision=stored)
            batches = [infinite_batches(student, batch_size=8, seed=0, num_workers=workers),
                       infinite_batches(teacher, batch_size=8, seed=1, num_workers=workers)]
            for stream in batches:
                next(stream)  # worker start-up
            started, count = time.perf_counter(), 0
            for _ in range(16):
                for stream in batches:
                    count += len(next(stream)["rows"])
            rates[name].append(count / (time.perf_counter() - started))
            for stream in batches:
                stream.close()
    return rates


def bench_input_slices(root: Path, work: Path, rounds: int) -> dict:
    """2.5-D at real size: the preprocess worker on a lesion training volume storing its lesion slice alone or with
    one context slice each side, and `comoto predict` with the default model taking 1 or 3 slices."""
    volume = _volume(root, SPECS[0])
    frames = {"lesion slice": [30], "with context_slices 1": [29, 30, 31]}
    runs: dict[str, list[dict]] = {name: [] for name in frames}
    for _ in range(rounds):
        for name, wanted in frames.items():  # interleaved
            runs[name].append(_run_child("preprocess", str(volume), SPECS[0].view, wanted, "auto",
                                         str(work / "input-slices.part.h5")))
    preprocess = {name: {"seconds": statistics.median(r["seconds"] for r in values),
                         "peak_rss_mib": max(r["peak_rss_mib"] for r in values)} for name, values in runs.items()}
    return {"preprocess_train_lesion": preprocess,
            "predict": {str(slices): bench_predict(root, work, slices) for slices in (1, 3)}}


def bench_geometry(root: Path, work: Path, rounds: int) -> dict:
    """The preprocess worker with ``breast-crop`` against ``stretch`` (one more frame decoded for the breast box, the
    thumbnail and its labelling), on the lesion training volume (1 frame kept) and on a validation volume (every
    frame), fresh processes in turns: seconds and peak RSS, medians."""
    spec = SPECS[0]
    cases = {"train_lesion": [spec.lesion_slice], "val_test": None}
    results: dict = {}
    for name, frames in cases.items():
        runs: dict[str, list[dict]] = {"stretch": [], "breast-crop": []}
        for _ in range(rounds):
            for geometry in runs:  # interleaved
                out = work / f"geometry-{name}-{geometry}.part.h5"
                out.unlink(missing_ok=True)
                runs[geometry].append(_run_child("preprocess", str(_volume(root, spec)), spec.view, frames,
                                                 "pylibjpeg", str(out), geometry))
        results[name] = {geometry: {"seconds": statistics.median(r["seconds"] for r in values),
                                    "peak_rss_mib": statistics.median(r["peak_rss_mib"] for r in values)}
                         for geometry, values in runs.items()}
        results[name]["time_ratio"] = results[name]["breast-crop"]["seconds"] / results[name]["stretch"]["seconds"]
    return results


def projection(pre: dict, decoders: dict, cores_list=(2, 32)) -> dict:
    """Hours for the whole BCS-DBT: per-volume seconds measured in one process, scaled by how much slower a frame
    decodes when every core decodes (measured), divided over the cores."""
    single = decoders["seconds_per_frame_one_process"]["pylibjpeg"]
    contention = (1 / decoders["frames_per_second_all_cores"]["pylibjpeg"]) * decoders["cores"] / single
    seconds = sum(BCS_DBT[name] * pre[name]["preprocess_s"] for name in BCS_DBT) * max(contention, 1.0)
    old = sum(BCS_DBT.values()) * pre["val_test"]["preprocess_s"] * max(contention, 1.0)
    return {"cpu_hours": seconds / 3600, "contention_factor": contention,
            **{f"hours_on_{c}_cores": seconds / 3600 / c for c in cores_list},
            "every_frame_of_every_volume_hours_on_32_cores": old / 3600 / 32}


def _markdown(results: dict) -> str:
    m, d, p, q, pr, ld = (results[k] for k in ("machine", "decoders", "preprocess", "predict", "projection",
                                               "loader"))
    loader_date = f" (measured {results['loader_machine']['date']})" if "loader_machine" in results else ""
    lines = [
        f"Full-size benchmark, {m['date']}: {m['cpu']}, {m['cores']} cores, torch {m['torch']}. Volumes: {FRAMES} x "
        "2457 x 1996, 12 bits, JPEG 2000 lossless; cache 2048 x 1024.",
        "",
        "| decoder | s/frame, one process | frames/s, all cores |",
        "|---|---|---|",
        *[f"| {n} | {s:.3f} | {d['frames_per_second_all_cores'][n]:.2f} |"
          for n, s in d["seconds_per_frame_one_process"].items()],
        "",
        "| volume | frames decoded / kept | bare decode | preprocess | ratio | peak RSS |",
        "|---|---|---|---|---|---|",
    ]
    for name in ("train_normal", "train_lesion", "val_test"):
        r = p[name]
        lines.append(f"| {name} | {r['frames_decoded']} / {r['frames_kept']} | {r['bare_decode_s']:.1f} s | "
                     f"{r['preprocess_s']:.1f} s | {r['ratio']:.2f}x | {r['peak_rss_mib']:.0f} MiB |")
    lines += [
        "",
        f"- A normal training volume costs {p['train_normal']['all_frames_decode_over_preprocess']:.1f}x less than "
        "decoding all its frames.",
        f"- Cache bytes per validation/test volume: {p['cache_bytes_per_val_test_volume'] / 2**20:.0f} MiB "
        f"({FRAMES} slices, float16, gzip + shuffle).",
        f"- Uncompressed volume, every frame: {p['uncompressed_val_test']['preprocess_s']:.1f} s, peak RSS "
        f"{p['uncompressed_val_test']['peak_rss_mib']:.0f} MiB.",
        f"- `comoto predict`, default model (ResNet-50, 2048 x 1024) on CPU ({q['threads']} threads): "
        f"{q['seconds_per_slice']:.1f} s/slice ({q['slices_measured']} slices measured; "
        f"{q['seconds_per_64_slice_volume'] / 60:.0f} min for a {FRAMES}-slice volume), peak RSS "
        f"{q['peak_rss_mib']:.0f} MiB (independent of the slice count: frames stream).",
        f"- Training loader at 2048 x 1024{loader_date}, batch 8 with augmentation: "
        f"{ld['slices_per_s_main_process']:.0f} slices/s "
        f"in the main process, {ld['slices_per_s_workers']:.0f} with {ld['workers']} workers "
        f"({ld['slices_per_s_per_worker']:.0f} per worker); a GPU step (batch 8 in {GPU_STEP_SECONDS} s) consumes "
        f"{ld['gpu_step_consumes_slices_per_s']:.0f}, LsKD twice that: {ld['over_gpu_step']:.1f}x and "
        f"{ld['over_gpu_step_lskd']:.1f}x."
        + (f" With `augment.on_device` (the pixels augmented on the GPU, not measured here): "
           f"{ld['slices_per_s_workers_augment_on_device']:.0f} slices/s with {ld['workers']} workers, "
           f"{ld['over_gpu_step_augment_on_device']:.1f}x a GPU step." if "slices_per_s_workers_augment_on_device"
           in ld else "")
        + (f" From an uncompressed cache (`compression_level: 0`, "
           f"{ld['cache_bytes_per_slice']['0'] / ld['cache_bytes_per_slice']['4']:.1f}x the bytes): "
           f"{ld['slices_per_s_workers_augment_on_device_uncompressed']:.0f} slices/s, "
           f"{ld['over_gpu_step_augment_on_device_uncompressed']:.1f}x." if "cache_bytes_per_slice" in ld else "")
        + (" LsKD's two loaders together (student and teacher batches in turns, half the workers each): "
           + ", ".join(f"{name.replace('_', ' ')} {rate:.0f} slices/s ({ld['lskd_over_gpu_step'][name]:.1f}x the "
                       "two batches of an LsKD step)" for name, rate in ld["lskd_slices_per_s"].items()) + "."
           if "lskd_slices_per_s" in ld else ""),
        f"- Whole BCS-DBT projected: {pr['hours_on_2_cores']:.1f} h on 2 cores, {pr['hours_on_32_cores']:.1f} h on 32 "
        f"cores (decoding every frame of every volume: {pr['every_frame_of_every_volume_hours_on_32_cores']:.1f} h "
        f"on 32 cores; contention factor {pr['contention_factor']:.2f}).",
    ]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results-full.json"))
    parser.add_argument("--data", type=Path, default=Path("bench_data/full"))
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--input-slices-only", action="store_true",
                        help="only 2.5-D against 2-D in preprocess and predict (benchmarks/results-input-slices.json)")
    parser.add_argument("--loader-only", action="store_true",
                        help="only the training loader; its section of an existing results file is replaced")
    parser.add_argument("--geometry-only", action="store_true",
                        help="only breast-crop against stretch in the preprocess worker (benchmarks/results-geometry.json)")
    args = parser.parse_args()
    if args.child is not None:
        print(json.dumps(_child(*json.loads(args.child))))
        return
    started = time.perf_counter()
    root = write_fullsize_dataset(args.data, SPECS)
    work = args.data / "work"
    work.mkdir(exist_ok=True)
    if args.geometry_only:
        result = {"machine": machine(), "geometry": bench_geometry(root, work, args.rounds)}
        Path("benchmarks/results-geometry.json").write_text(json.dumps(result, indent=2) + "\n")
        print(json.dumps(result["geometry"], indent=2))
        return
    if args.input_slices_only:
        result = {"machine": machine(), "input_slices": bench_input_slices(root, work, args.rounds)}
        Path("benchmarks/results-input-slices.json").write_text(json.dumps(result, indent=2) + "\n")
        print(json.dumps(result["input_slices"], indent=2))
        return
    if args.loader_only:
        results = json.loads(args.out.read_text())
        results["loader"] = bench_loader(work, args.rounds)
        results["loader_machine"] = machine()
        args.out.write_text(json.dumps(results, indent=2) + "\n")
        args.out.with_suffix(".md").write_text(_markdown(results))
        print(_markdown(results))
        return
    results = {"machine": machine()}
    results["decoders"] = bench_decoders(_volume(root, SPECS[0]), args.rounds)
    results["preprocess"] = bench_preprocess(root, work, args.rounds)
    results["loader"] = bench_loader(work, args.rounds)
    results["predict"] = bench_predict(root, work)
    results["projection"] = projection(results["preprocess"], results["decoders"])
    results["seconds"] = time.perf_counter() - started
    args.out.write_text(json.dumps(results, indent=2) + "\n")
    args.out.with_suffix(".md").write_text(_markdown(results))
    print(_markdown(results))


if __name__ == "__main__":
    main()
