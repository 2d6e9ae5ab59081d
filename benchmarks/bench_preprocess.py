"""Preprocess throughput next to a bare pydicom decode of the same DICOM files.

``run(tmpdir)`` writes a synthetic dataset (``comoto synth``), times ``comoto preprocess dbt`` on it (decode,
official flip + window, area resize, HDF5 write; all cores) and times ``pydicom.dcmread(f).pixel_array`` on
the same files in one process. The ratio says how much the pipeline costs on top of reading the pixels:
with N cores it can be below 1 (decoding is spread over processes).

    python benchmarks/bench_preprocess.py [tmpdir] [--size tiny|demo|bench]
"""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def _synth(folder: Path, size: str) -> Path:
    if not (folder / "dbt").is_dir():
        subprocess.run([sys.executable, "-m", "comoto_cli", "synth", str(folder), "--size", size], check=True)
    return folder / "dbt"


def run(tmpdir, size: str = "tiny", image_height: int = 512, image_width: int = 256, workers: int = 0) -> dict:
    import pydicom

    from comoto_cli.cache.h5cache import SliceCache
    from comoto_cli.config import PreprocessConfig
    from comoto_cli.preprocess.pipeline import preprocess

    tmpdir = Path(tmpdir)
    root = _synth(tmpdir / "synthetic", size)
    files = sorted(p for p in root.rglob("*.dcm"))
    if not files:
        raise RuntimeError(f"no DICOM files under {root}")

    started = time.perf_counter()
    frames = 0
    for path in files:
        pixels = pydicom.dcmread(path).pixel_array
        frames += pixels.shape[0] if pixels.ndim == 3 else 1
    bare_seconds = time.perf_counter() - started

    out = tmpdir / "bench-dbt.h5"
    config = PreprocessConfig(modality="dbt", image_height=image_height, image_width=image_width, workers=workers,
                              split={"val_fraction": 0.15, "test_fraction": 0.15})
    out.unlink(missing_ok=True)
    started = time.perf_counter()
    report = preprocess(root, out, config, progress=False)
    pipeline_seconds = time.perf_counter() - started
    cache = SliceCache(out)
    stored = int(cache.num_slices)
    return {
        "volumes": len(files),
        "frames_decoded": frames,
        "slices_stored": stored,
        "bare_decode_seconds": round(bare_seconds, 3),
        "bare_decode_volumes_per_s": round(len(files) / bare_seconds, 3),
        "bare_decode_slices_per_s": round(frames / bare_seconds, 2),
        "preprocess_seconds": round(pipeline_seconds, 3),
        "preprocess_volumes_per_s": round(report["volumes"] / pipeline_seconds, 3),
        "preprocess_slices_per_s": round(frames / pipeline_seconds, 2),
        "preprocess_over_bare_decode": round(pipeline_seconds / bare_seconds, 3),
        "workers": workers,
        "cache_size": [image_height, image_width],
    }


if __name__ == "__main__":
    arguments = sys.argv[1:]
    size = "tiny"
    if "--size" in arguments:
        size = arguments[arguments.index("--size") + 1]
        del arguments[arguments.index("--size"):arguments.index("--size") + 2]
    if arguments:
        print(json.dumps(run(arguments[0], size=size), indent=2))
    else:
        with tempfile.TemporaryDirectory() as folder:
            print(json.dumps(run(folder, size=size), indent=2))
