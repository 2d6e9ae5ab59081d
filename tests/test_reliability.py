"""Issue 7, reliability, end to end through the `comoto` command:

1. a bad-input corpus (`tests/bad_inputs.py`): each case exits non-zero (2 for usage/config), prints exactly one
   stderr line naming the file and the row or field, no traceback, and leaves nothing behind;
2. property tests of the box geometry (resize and flips round-trip back to the official frame);
3. `preprocess` killed with SIGKILL at several seeded points, then rerun: the same cache content;
4. an unwritable or full output folder: a clear error and nothing partial;
5. determinism: the same seed gives a byte-identical metrics.json.

The library-level checks of the same inputs live in test_readers / test_sources / test_config / test_checkpoint /
test_dbtex / test_volume_nms; this file checks what the user sees.
"""

from __future__ import annotations

import errno
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from comoto_cli.cli import main
from comoto_cli.transforms.geometry import (
    cache_to_official,
    hflip_boxes,
    official_to_cache,
    vflip_boxes,
    xywh_to_xyxy,
    xyxy_to_xywh,
)
from tests.bad_inputs import CASES, Context, dbt_copy, mammo_copy, truncate, vindr_dicom
from tests.conftest import TINY_CACHE_SIZE, TINY_TRAIN


def _tree(folder: Path) -> dict[str, tuple[int, int]]:
    """Every path below ``folder`` with its size and mtime: what a failed command must leave unchanged."""
    if not folder.exists():
        return {}
    return {str(p.relative_to(folder)): (p.lstat().st_size, p.lstat().st_mtime_ns) for p in folder.rglob("*")}


def _run_cli(argv: list[str], capsys) -> tuple[int, str]:
    capsys.readouterr()
    with pytest.raises(SystemExit) as info:
        main([str(a) for a in argv])
    return info.value.code, capsys.readouterr().err


# ---------------------------------------------------------------------------------------------- 1. bad inputs
@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_bad_input_is_one_line_and_leaves_nothing(case, tmp_path, tiny_synth, tiny_caches, tiny_teacher, capsys,
                                                  monkeypatch):
    monkeypatch.delenv("COMOTO_DEBUG", raising=False)
    ctx = Context(tmp=tmp_path, synth=tiny_synth, caches=tiny_caches, teacher=tiny_teacher, train_config=TINY_TRAIN)
    built = case.build(ctx)
    before = _tree(tmp_path)
    code, err = _run_cli(built.argv, capsys)
    assert code == case.exit_code, err
    assert "Traceback" not in err
    lines = err.strip().splitlines()
    assert len(lines) == 1, err  # click's own usage errors (a wrongly typed flag) included
    for needle in built.needles:
        assert needle in lines[0], f"{needle!r} not in {lines[0]!r}"
    after = _tree(tmp_path)
    changed = {name for name in set(after) | set(before) if after.get(name) != before.get(name)}
    # The only thing a failure may leave is preprocess's documented resume folder OUT.parts/ holding volumes
    # decoded before the bad one (a rerun after the fix reuses them); never OUT itself or a temporary file.
    resumable = {name for name in changed if name == "out" or (name.startswith("out" + os.sep) and ".parts" in name)}
    if resumable:
        parts_files = [tmp_path / name for name in resumable if (tmp_path / name).is_file()]
        assert parts_files and all(p.name.endswith(".part.h5") or p.name == "lock" for p in parts_files), resumable
        assert any(p.name.endswith(".part.h5") for p in parts_files)
    assert not changed - resumable, f"the failed command left or changed files: {sorted(changed - resumable)}"
    assert not [p for p in tmp_path.rglob("*") if p.name.endswith(".tmp")]


def test_on_error_skip_leaves_out_only_the_row_with_a_huge_number(tmp_path, tiny_synth, capsys, monkeypatch):
    """A huge integer in a boxes CSV is refused when the CSV is read (before any decoding), naming the row; with
    --on-error skip only that row's volume is left out and the run finishes."""
    from comoto_cli.cache import SliceCache
    from tests.bad_inputs import DBT_BOXES, DBT_PATHS, SMALL, read_rows, set_cell

    monkeypatch.delenv("COMOTO_DEBUG", raising=False)
    root = dbt_copy(tiny_synth, tmp_path)
    set_cell(root / DBT_BOXES, 2, "VolumeSlices", "99999999999999999999")
    volumes = len(read_rows(root / DBT_PATHS)) - 1
    out = tmp_path / "out" / "dbt.h5"
    code, err = _run_cli(["preprocess", "dbt", root, "--out", out, *SMALL, "--val-fraction", "0.25",
                          "--test-fraction", "0.25", "--on-error", "skip"], capsys)
    assert code == 0, err
    cache = SliceCache(out)
    assert [(Path(s["path"]).name, s["row"]) for s in cache.skipped] == [(DBT_BOXES, 2)]
    assert "VolumeSlices" in cache.skipped[0]["reason"] and "out of range" in cache.skipped[0]["reason"]
    assert len(cache.volumes["patient_id"]) == volumes - 1


def test_real_command_prints_one_line_without_library_warnings_and_debug_the_trace(tmp_path, tiny_synth):
    """From the console command with worker processes: pydicom's warnings about a torn file do not add lines
    to the one-line error; --debug shows the traceback."""
    root = mammo_copy(tiny_synth, tmp_path)
    truncate(vindr_dicom(root, 2), 0.3)
    argv = ["preprocess", "mammo", str(root), "--out", str(tmp_path / "out" / "mammo.h5"), "--workers", "2",
            "--image-height", "32", "--image-width", "32", "--no-progress"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    env.pop("COMOTO_DEBUG", None)
    plain = subprocess.run([sys.executable, "-m", "comoto_cli", *argv], capture_output=True, text=True, env=env,
                           check=False)
    assert plain.returncode == 1
    assert len(plain.stderr.strip().splitlines()) == 1, plain.stderr
    assert "Traceback" not in plain.stderr and "row 2" in plain.stderr
    assert not (tmp_path / "out" / "mammo.h5").exists()
    debug = subprocess.run([sys.executable, "-m", "comoto_cli", "--debug", *argv], capture_output=True, text=True,
                           env=env, check=False)
    assert debug.returncode == 1 and "Traceback" in debug.stderr


# ---------------------------------------------------------------------------------------------- 2. geometry
SIZES = st.integers(8, 4096)


@st.composite
def official_boxes(draw):
    """Full-resolution image size, cache size and xywh boxes inside the image (official frame)."""
    rows, cols = draw(SIZES), draw(SIZES)
    height, width = draw(st.integers(8, 2048)), draw(st.integers(8, 2048))
    n = draw(st.integers(1, 6))
    boxes = []
    for _ in range(n):
        x = draw(st.floats(0, cols - 1, allow_nan=False))
        y = draw(st.floats(0, rows - 1, allow_nan=False))
        w = draw(st.floats(0.5, max(cols - x, 0.5), allow_nan=False))
        h = draw(st.floats(0.5, max(rows - y, 0.5), allow_nan=False))
        boxes.append([x, y, w, h])
    return rows, cols, height, width, np.array(boxes)


@settings(max_examples=150, deadline=None)
@given(official_boxes())
def test_resize_round_trips_to_the_official_frame(case):
    rows, cols, height, width, xywh = case
    scale_y, scale_x = height / rows, width / cols
    cache = official_to_cache(xywh, scale_y, scale_x)
    assert np.all(cache[:, 2:] > cache[:, :2])  # positive size survives the resize
    assert np.all(cache >= 0) and np.all(cache[:, [0, 2]] <= width * (1 + 1e-9))
    assert np.all(cache[:, [1, 3]] <= height * (1 + 1e-9))
    np.testing.assert_allclose(cache_to_official(cache, scale_y, scale_x), xywh, rtol=1e-9, atol=1e-9)
    np.testing.assert_allclose(xyxy_to_xywh(xywh_to_xyxy(xywh)), xywh, rtol=1e-12, atol=1e-9)


@settings(max_examples=150, deadline=None)
@given(official_boxes(), st.sampled_from(["hflip", "vflip", "both"]))
def test_flips_are_self_inverse_and_commute_with_the_resize(case, flip):
    """Augmentation flips in the cache frame, alone and both together (a 180-degree rotation): applied twice they
    give the box back, and flipping before or after the resize maps to the same official-frame box."""
    rows, cols, height, width, xywh = case
    scale_y, scale_x = height / rows, width / cols
    apply = {
        "hflip": lambda b, h, w: hflip_boxes(b, w),
        "vflip": lambda b, h, w: vflip_boxes(b, h),
        "both": lambda b, h, w: vflip_boxes(hflip_boxes(b, w), h),
    }[flip]
    cache = official_to_cache(xywh, scale_y, scale_x)
    flipped = apply(cache, height, width)
    assert np.all(flipped[:, 2:] >= flipped[:, :2])
    np.testing.assert_allclose(apply(flipped, height, width), cache, rtol=1e-9, atol=1e-9)
    official_flipped = apply(xywh_to_xyxy(xywh), rows, cols)
    np.testing.assert_allclose(cache_to_official(flipped, scale_y, scale_x), xyxy_to_xywh(official_flipped),
                               rtol=1e-9, atol=1e-6)


@settings(max_examples=80, deadline=None)
@given(st.integers(2, 24), st.integers(2, 24), st.data())
def test_box_flips_match_the_image_flips(rows, cols, data):
    """A box's pixel mask, flipped with the image, is the mask of the flipped box (integer boxes)."""
    x0, x1 = sorted(data.draw(st.lists(st.integers(0, cols), min_size=2, max_size=2, unique=True)))
    y0, y1 = sorted(data.draw(st.lists(st.integers(0, rows), min_size=2, max_size=2, unique=True)))
    box = np.array([[x0, y0, x1, y1]])

    def mask(b):
        m = np.zeros((rows, cols), bool)
        bx0, by0, bx1, by1 = (int(v) for v in b[0])
        m[by0:by1, bx0:bx1] = True
        return m

    np.testing.assert_array_equal(mask(hflip_boxes(box, cols)), mask(box)[:, ::-1])
    np.testing.assert_array_equal(mask(vflip_boxes(box, rows)), mask(box)[::-1, :])
    np.testing.assert_array_equal(mask(vflip_boxes(hflip_boxes(box, cols), rows)), np.rot90(mask(box), 2))


# ---------------------------------------------------------------------------------------------- 3. kill -9
KILL_POINTS = [(0, 0.0), (1, 0.05), (3, 0.0), (5, 0.02), ("all", 0.0)]  # (parts written first, then seconds)


@pytest.mark.parametrize("parts_before_kill,extra_delay", KILL_POINTS, ids=[f"{p}-parts+{d}s" for p, d in KILL_POINTS])
def test_preprocess_killed_at_any_point_then_rerun_gives_the_same_cache(parts_before_kill, extra_delay, tmp_path,
                                                                         tiny_synth, tiny_caches):
    """SIGKILL the whole process group (workers too) once N volumes are decoded (N = 0: still starting up;
    'all': while the HDF5 file is written or renamed), rerun: the same content as the uninterrupted cache."""
    from comoto_cli.config import PreprocessConfig
    from comoto_cli.preprocess.pipeline import preprocess
    from comoto_cli.preprocess.summary import cache_content_hash

    out = tmp_path / "dbt.h5"
    command = [sys.executable, "-m", "comoto_cli", "preprocess", "dbt", str(tiny_synth / "dbt"), "--out", str(out),
               "--image-height", "128", "--image-width", "128", "--val-fraction", "0.25", "--test-fraction", "0.25",
               "--workers", "2", "--no-progress"]
    volumes = len((tiny_synth / "dbt" / "BCS-DBT-file-paths-train-v2.csv").read_text().strip().splitlines()) - 1
    wanted = volumes if parts_before_kill == "all" else parts_before_kill
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                               env={**os.environ, "OMP_NUM_THREADS": "1"}, start_new_session=True)
    deadline = time.monotonic() + 60
    while (len(list(Path(f"{out}.parts").glob("*/*.part.h5"))) < wanted and process.poll() is None
           and time.monotonic() < deadline):
        time.sleep(0.002)
    time.sleep(extra_delay)
    finished = process.poll() is not None
    if not finished:
        os.killpg(process.pid, signal.SIGKILL)  # its own session: the workers die with it
    process.wait()
    if parts_before_kill != "all":  # the last point may race the end of the run; the others are real kills
        assert not finished and not out.exists()
    split = {"val_fraction": 0.25, "test_fraction": 0.25}
    config = PreprocessConfig(modality="dbt", workers=1, split=split, **TINY_CACHE_SIZE)
    report = preprocess(tiny_synth / "dbt", out, config, progress=False)
    assert report["volumes"] == volumes
    assert cache_content_hash(out) == cache_content_hash(tiny_caches["dbt"])
    assert not Path(f"{out}.parts").exists() and not list(tmp_path.glob(".dbt.h5.*"))


# ---------------------------------------------------------------------------------------------- 4. unwritable / full
def _unwritable_commands(ctx_tmp: Path, synth: Path, caches: dict, teacher: Path) -> dict[str, list[str]]:
    blocker = ctx_tmp / "a-file"  # a regular file where a folder is needed: unwritable even for root
    blocker.write_text("x")
    config = ctx_tmp / "train.json"
    config.write_text(__import__("json").dumps(TINY_TRAIN))
    return {
        "preprocess": ["preprocess", "dbt", str(synth / "dbt"), "--out", str(blocker / "dbt.h5"),
                       "--image-height", "32", "--image-width", "32", "--workers", "1", "--no-progress"],
        "synth": ["synth", str(blocker / "data")],
        "evaluate": ["evaluate", "--checkpoint", str(teacher), "--cache", str(caches["dbt"]), "--out",
                     str(blocker / "eval"), "--bootstrap", "10"],
        "train-teacher": ["train-teacher", "--cache", str(caches["mammo"]), "--out", str(blocker / "run"),
                          "--config", str(config)],
        "distill": ["distill", "--cache", str(caches["dbt"]), "--teacher", str(teacher), "--teacher-cache",
                    str(caches["mammo"]), "--out", str(blocker / "run"), "--config", str(config)],
        "predict": ["predict", "--checkpoint", str(teacher), str(synth / "dbt"), "--out", str(blocker / "p.csv")],
    }


@pytest.mark.parametrize("command", ["preprocess", "synth", "evaluate", "train-teacher", "distill", "predict"])
def test_unwritable_output_folder_is_one_clear_line(command, tmp_path, tiny_synth, tiny_caches, tiny_teacher,
                                                    capsys, monkeypatch):
    monkeypatch.delenv("COMOTO_DEBUG", raising=False)
    argv = _unwritable_commands(tmp_path, tiny_synth, tiny_caches, tiny_teacher)[command]
    before = _tree(tmp_path)
    code, err = _run_cli(argv, capsys)
    lines = err.strip().splitlines()
    assert code == 1 and len(lines) == 1 and "Traceback" not in err, err
    assert "a-file" in lines[0] and "not a folder" in lines[0], lines[0]
    assert _tree(tmp_path) == before


def _no_space(*args, **kwargs):
    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


def test_full_disk_while_writing_the_cache_leaves_nothing(tmp_path, tiny_synth, capsys, monkeypatch):
    from comoto_cli.cache import h5cache

    root = dbt_copy(tiny_synth, tmp_path)
    monkeypatch.setattr(h5cache.CacheWriter, "add_volume", _no_space)
    out = tmp_path / "out" / "dbt.h5"
    code, err = _run_cli(["preprocess", "dbt", root, "--out", out, "--image-height", "32", "--image-width", "32",
                          "--workers", "1", "--no-progress"], capsys)
    assert code == 1 and len(err.strip().splitlines()) == 1, err
    assert "No space left on device" in err and str(out) in err
    assert not out.exists() and not list(out.parent.glob(".dbt.h5.*"))


@pytest.mark.parametrize("failing_write", [1, 2, 3])
def test_full_disk_while_writing_evaluation_outputs_leaves_nothing(failing_write, tmp_path, tiny_synth, capsys,
                                                                   monkeypatch):
    """metrics.json, froc.png and predictions.csv: the disk fills up at the 1st, 2nd or 3rd file."""
    from comoto_cli.utils import atomic

    calls = {"n": 0}
    real_replace = os.replace

    def replace(source, destination):
        calls["n"] += 1
        if calls["n"] == failing_write:
            _no_space()
        return real_replace(source, destination)

    monkeypatch.setattr(atomic.os, "replace", replace)
    argv = _predictions_argv(tmp_path, tiny_synth)
    code, err = _run_cli(argv, capsys)
    assert code == 1 and len(err.strip().splitlines()) == 1, err
    assert "No space left on device" in err
    out = Path(argv[argv.index("--out") + 1])
    assert not out.exists() or not any(out.iterdir()), sorted(p.name for p in out.iterdir())


# ---------------------------------------------------------------------------------------------- 5. determinism
def _predictions_argv(tmp_path: Path, synth: Path, out_name: str = "eval") -> list[str]:
    """A DBTex submission with hits and misses (from the ground truth boxes) and the evaluate command for it."""
    from tests.bad_inputs import DBT_BOXES, DBT_LABELS, read_rows, write_rows

    predictions = tmp_path / "predictions.csv"
    if not predictions.exists():
        rows = read_rows(synth / "dbt" / DBT_BOXES)
        h = rows[0]
        table = [["PatientID", "StudyUID", "View", "X", "Width", "Y", "Height", "Z", "Depth", "Score"]]
        rng = np.random.default_rng(0)
        for i, row in enumerate(rows[1:]):
            shift = 0 if i % 2 == 0 else 150  # every other lesion missed
            table.append([row[h.index("PatientID")], row[h.index("StudyUID")], row[h.index("View")],
                          str(float(row[h.index("X")]) + shift), row[h.index("Width")], row[h.index("Y")],
                          row[h.index("Height")], row[h.index("Slice")], "2", f"{rng.random():.4f}"])
        write_rows(predictions, table)
    return ["evaluate", "--predictions", str(predictions), "--boxes", str(synth / "dbt" / DBT_BOXES), "--labels",
            str(synth / "dbt" / DBT_LABELS), "--out", str(tmp_path / out_name), "--bootstrap", "200"]


def test_same_seed_same_metrics_json_for_a_submission(tmp_path, tiny_synth, capsys):
    outputs = []
    for name, seed in (("a", "3"), ("b", "3"), ("c", "4")):
        code, err = _run_cli([*_predictions_argv(tmp_path, tiny_synth, name), "--seed", seed, "--no-froc"], capsys)
        assert code == 0, err
        outputs.append((tmp_path / name / "metrics.json").read_bytes())
    assert outputs[0] == outputs[1]
    assert outputs[0] != outputs[2]  # the seed does reach the bootstrap: the check above can fail


def test_same_seed_same_metrics_json_for_a_checkpoint(tmp_path, low_threshold_teacher, tiny_caches, capsys):
    import json

    checkpoint = low_threshold_teacher
    config = tmp_path / "eval.json"
    config.write_text(json.dumps({"inference": {"nms_min_score": 0.0}, "bootstrap": 50}))
    outputs = []
    for name in ("a", "b"):
        code, err = _run_cli(["evaluate", "--checkpoint", checkpoint, "--cache", tiny_caches["dbt"], "--split",
                              "val", "--out", tmp_path / name, "--config", config, "--seed", "1", "--no-froc"], capsys)
        assert code == 0, err
        outputs.append((tmp_path / name / "metrics.json").read_bytes())
        assert json.loads(outputs[-1])["counts"]["predictions"] > 0  # real detections were scored
    assert outputs[0] == outputs[1]
    assert (tmp_path / "a" / "predictions.csv").read_bytes() == (tmp_path / "b" / "predictions.csv").read_bytes()
