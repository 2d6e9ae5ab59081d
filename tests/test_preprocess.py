"""`comoto preprocess`: resizing, patient split, slice selection, box geometry, crash safety and reuse.

Most tests run the pipeline in-process (workers=1) on a fake dataset (numpy volumes behind monkeypatched
readers) so they take milliseconds; the synthetic-data tests at the end run the real readers on `comoto synth`
output, with worker processes.
"""

from __future__ import annotations

import json
from pathlib import Path

import h5py
import numpy as np
import pytest

from comoto_cli.cache.h5cache import SliceCache
from comoto_cli.config import PreprocessConfig, SplitConfig
from comoto_cli.data.splits import assign_splits
from comoto_cli.errors import InputDataError, UsageError
from comoto_cli.preprocess.pipeline import preprocess, preprocess_config_hash
from comoto_cli.preprocess.summary import cache_content_hash, cache_summary
from comoto_cli.transforms.geometry import cache_to_official
from comoto_cli.transforms.resize import resize_area


def _config(**kwargs) -> PreprocessConfig:
    base = {"image_height": 32, "image_width": 24, "workers": 1}
    base.update(kwargs)
    return PreprocessConfig(**base)


# ---------------------------------------------------------------------------------------------- resize
def test_resize_area_equals_torch_area_on_integer_ratios_and_keeps_the_mean():
    import torch

    rng = np.random.default_rng(1)
    images = rng.random((2, 48, 36)).astype(np.float32)
    ours = resize_area(images, 12, 9)
    reference = torch.nn.functional.interpolate(torch.from_numpy(images)[None], size=(12, 9), mode="area")[0]
    np.testing.assert_allclose(ours, reference.numpy(), atol=1e-6)
    odd = resize_area(images, 29, 17)  # non-integer ratios: exact area weights, mean and range preserved
    assert odd.shape == (2, 29, 17)
    np.testing.assert_allclose(odd.mean(axis=(1, 2)), images.mean(axis=(1, 2)), rtol=1e-5)
    assert odd.min() >= images.min() - 1e-6 and odd.max() <= images.max() + 1e-6
    # A bright block stays where the box geometry (scale = N / n) says it is.
    block = np.zeros((100, 80), np.float32)
    block[20:40, 30:50] = 1.0
    small = resize_area(block, 50, 32)
    ys, xs = np.nonzero(small > 0.99)
    assert (ys.min(), ys.max() + 1, xs.min(), xs.max() + 1) == (10, 20, 12, 20)


# ---------------------------------------------------------------------------------------------- splits
def test_split_is_patient_level_deterministic_and_order_independent():
    patients = [f"P{i:03d}" for i in range(40)]
    config = SplitConfig(val_fraction=0.2, test_fraction=0.1, seed=3)
    first = assign_splits(patients, config)
    shuffled = assign_splits(list(reversed(patients)), config)
    assert first == shuffled
    counts = {name: sum(1 for s in first.values() if s == name) for name in ("train", "val", "test")}
    assert counts == {"train": 28, "val": 8, "test": 4}
    other_seed = assign_splits(patients, SplitConfig(val_fraction=0.2, test_fraction=0.1, seed=4))
    assert other_seed != first
    # Three patients and small fractions: every split still gets one.
    tiny = assign_splits(["a", "b", "c"], SplitConfig(val_fraction=0.05, test_fraction=0.05))
    assert sorted(tiny.values()) == ["test", "train", "val"]


def test_dataset_split_respected_and_val_carved_from_training():
    patients = [f"P{i:02d}" for i in range(20)]
    given = {p: ("test" if i < 5 else "training") for i, p in enumerate(patients)}
    result = assign_splits(patients, SplitConfig(val_fraction=0.2, test_fraction=0.3), given)
    assert all(result[p] == "test" for p in patients[:5])
    assert all(result[p] in ("train", "val") for p in patients[5:])
    assert sum(1 for s in result.values() if s == "val") == 4
    ignored = assign_splits(patients, SplitConfig(val_fraction=0.2, test_fraction=0.3, respect_dataset_split=False),
                            given)
    assert [result[p] for p in patients[:5]] != [ignored[p] for p in patients[:5]] or \
        sum(1 for s in ignored.values() if s == "test") == 6


# ---------------------------------------------------------------------------------------------- pipeline (fake)
def test_slices_boxes_and_splits_on_fake_data(fake, tmp_path):
    records = fake()
    out = tmp_path / "dbt.h5"
    report = preprocess(fake.root, out, _config(lesion_slice_offset=1, normal_slices_per_volume=2), progress=False)
    assert report["volumes"] == len(records) and not report["up_to_date"]
    cache = SliceCache(out)
    by_key = {(r.patient_id, r.view): r for r in records}
    patient_split: dict[str, str] = {}
    for v in range(cache.num_volumes):
        record = by_key[(cache.volumes["patient_id"][v], cache.volumes["view"][v])]
        split = cache.volumes["split"][v]
        assert patient_split.setdefault(record.patient_id, split) == split  # patient-disjoint
        rows = cache.volume_slice_rows(v)
        stored = list(cache.slice_index[rows])
        if split != "train":
            assert stored == list(range(9))  # volume inference needs every slice, in order
        elif record.boxes:
            c = record.boxes[0].slice
            assert stored == [s for s in (c - 1, c, c + 1) if 0 <= s < 9]
        else:
            assert len(stored) == 2 and len(set(stored)) == 2  # seeded normal slices
        for row, index in zip(range(rows.start, rows.stop), stored):
            boxes = cache.boxes(row)
            expected = [b for b in record.boxes if abs(b.slice - index) <= 1]
            assert len(boxes) == len(expected)
            for box, truth in zip(boxes, expected):
                back = cache_to_official(box[None], cache.volumes["scale_y"][v], cache.volumes["scale_x"][v])[0]
                np.testing.assert_allclose(back, [truth.x, truth.y, truth.width, truth.height], atol=1e-3)
                if index == truth.slice:  # the lesion is bright inside its box on its centre slice
                    x0, y0, x1, y1 = np.round(box).astype(int)
                    image = cache.image(row)
                    assert image[y0 + 1:y1 - 1, x0 + 1:x1 - 1].mean() > image.mean() + 0.2
    assert set(patient_split.values()) == {"train", "val", "test"}
    # The order of CSV rows does not change the split or the content.
    fake(order_seed=5)
    out2 = tmp_path / "dbt2.h5"
    preprocess(fake.root, out2, _config(lesion_slice_offset=1, normal_slices_per_volume=2), progress=False)
    assert cache_content_hash(out2) == cache_content_hash(out)


def test_rerun_is_up_to_date_and_partial_work_is_reused(fake, tmp_path):
    records = fake()
    reference = tmp_path / "reference.h5"
    preprocess(fake.root, reference, _config(), progress=False)
    out = tmp_path / "dbt.h5"
    fake.decoded.clear()
    fake.state["fail_after"] = 5  # "crash" while decoding the 6th volume
    with pytest.raises(RuntimeError, match="simulated crash"):
        preprocess(fake.root, out, _config(), progress=False)
    assert not out.exists()
    assert not list(tmp_path.glob(".dbt.h5.*"))  # no stray temporary cache
    parts = list(Path(f"{out}.parts").glob("*/*.part.h5"))
    assert len(parts) == 5
    fake.state["fail_after"] = None
    fake.decoded.clear()
    report = preprocess(fake.root, out, _config(), progress=False)
    assert report["reused"] == 5 and report["computed"] == len(records) - 5
    assert len(fake.decoded) == len(records) - 5
    assert cache_content_hash(out) == cache_content_hash(reference)
    assert not Path(f"{out}.parts").exists()
    # The worker count changes speed, not content: same hash, so parts and the cache are reused.
    assert preprocess_config_hash(_config(workers=1)) == preprocess_config_hash(_config(workers=3))
    fake.decoded.clear()
    again = preprocess(fake.root, out, _config(), progress=False)
    assert again["up_to_date"] and fake.decoded == []
    # A changed config or a touched input is not up to date.
    assert not preprocess(fake.root, out, _config(image_width=20), progress=False)["up_to_date"]
    np.save(records[0].path, np.load(records[0].path) * 0.5)
    assert not preprocess(fake.root, out, _config(image_width=20), progress=False)["up_to_date"]


def test_bad_box_fails_without_output_or_is_skipped(fake, tmp_path):
    records = fake()
    bad = next(r for r in records if r.boxes).boxes[0]
    bad.x = 40.0  # 40 + 13 > 44 columns: outside the image
    out = tmp_path / "dbt.h5"
    with pytest.raises(InputDataError) as info:
        preprocess(fake.root, out, _config(), progress=False)
    assert str(bad.csv) in str(info.value) and f"row {bad.row}" in str(info.value)
    assert "outside" in str(info.value)
    assert not out.exists() and not Path(f"{out}.parts").exists() and not list(tmp_path.glob(".dbt.h5.*"))
    bad.slice = 99  # now also out of range; skip mode leaves the volume out and records why
    report = preprocess(fake.root, out, _config(on_error="skip"), progress=False)
    assert report["volumes"] == len(records) - 1
    with h5py.File(out, "r") as handle:
        skipped = json.loads(handle.attrs["skipped_json"])
    assert skipped == report["skipped"] and len(skipped) == 1
    assert skipped[0]["path"] == str(bad.csv) and skipped[0]["row"] == bad.row
    assert cache_summary(out)["skipped"] == 1


def test_cli_exit_codes_and_cache_info(fake, tmp_path, capsys):
    from comoto_cli.cli import main

    fake()
    out = tmp_path / "dbt.h5"
    base = ["preprocess", "dbt", str(fake.root), "--out", str(out), "--image-height", "32", "--image-width", "24",
            "--workers", "1", "--no-progress"]
    with pytest.raises(SystemExit) as info:
        main(base + ["--on-error", "maybe"])
    assert info.value.code == 2 and not out.exists()
    with pytest.raises(SystemExit) as info:
        main(base + ["--val-fraction", "0.3", "--split-seed", "7"])
    assert info.value.code == 0 and out.exists()
    config = json.loads(SliceCache(out).attrs["config_json"])
    assert config["split"]["val_fraction"] == 0.3 and config["split"]["seed"] == 7 and config["modality"] == "dbt"
    with pytest.raises(SystemExit) as info:
        main(base + ["--val-fraction", "0.3", "--split-seed", "7"])
    assert info.value.code == 0 and "up to date" in " ".join(capsys.readouterr().out.split())  # lines wrap
    with pytest.raises(SystemExit) as info:
        main(["cache", "info", str(out), "--json"])
    assert info.value.code == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary == cache_summary(out)
    assert summary["modality"] == "dbt" and summary["total"]["volumes"] == 12 and summary["total"]["patients"] == 6
    with pytest.raises(SystemExit) as info:
        main(["cache", "info", str(out)])
    assert info.value.code == 0 and "train" in capsys.readouterr().out
    with pytest.raises(SystemExit) as info:
        main(["cache", "info", str(tmp_path / "missing.h5")])
    assert info.value.code == 1
    with pytest.raises(SystemExit) as info:
        main(["preprocess", "dbt", str(tmp_path / "nowhere"), "--out", str(tmp_path / "x.h5"), "--no-progress"])
    assert info.value.code == 1 and not (tmp_path / "x.h5").exists()


# ---------------------------------------------------------------------------------------------- synthetic data
SIZE = {"image_height": 128, "image_width": 64}


@pytest.fixture(scope="module")
def synthetic(tmp_path_factory):
    """`comoto synth --size tiny` once, preprocessed into a DBT and a mammography cache (worker processes)."""
    from comoto_cli.config import SynthConfig
    from comoto_cli.synth import generate_dataset

    folder = tmp_path_factory.mktemp("synthetic")
    generate_dataset(folder / "data", SynthConfig(size="tiny", seed=0), progress=False)
    dbt_config = PreprocessConfig(modality="dbt", lesion_slice_offset=1, normal_slices_per_volume=2, workers=2,
                                  **SIZE)
    mammo_config = PreprocessConfig(modality="mammo", workers=2, **SIZE)
    preprocess(folder / "data" / "dbt", folder / "dbt.h5", dbt_config, progress=False)
    preprocess(folder / "data" / "mammo", folder / "mammo.h5", mammo_config, progress=False)
    truth = json.loads((folder / "data" / "truth.json").read_text())
    return {"folder": folder, "truth": truth, "dbt_config": dbt_config, "mammo_config": mammo_config}


def _core_and_ring(image: np.ndarray, box: np.ndarray) -> tuple[float, float]:
    """Mean in the central half of a cache-frame box and in a ring of half the box size around it."""
    x0, y0, x1, y1 = box
    w, h = x1 - x0, y1 - y0
    rows, cols = image.shape
    cx0, cx1 = int(np.floor(x0 + w / 4)), int(np.ceil(x1 - w / 4))
    cy0, cy1 = int(np.floor(y0 + h / 4)), int(np.ceil(y1 - h / 4))
    ox0, ox1 = max(int(np.floor(x0 - w / 2)), 0), min(int(np.ceil(x1 + w / 2)), cols)
    oy0, oy1 = max(int(np.floor(y0 - h / 2)), 0), min(int(np.ceil(y1 + h / 2)), rows)
    ring = np.ones((oy1 - oy0, ox1 - ox0), bool)
    ring[max(int(y0) - oy0, 0):int(np.ceil(y1)) - oy0, max(int(x0) - ox0, 0):int(np.ceil(x1)) - ox0] = False
    return float(image[cy0:cy1, cx0:cx1].mean()), float(image[oy0:oy1, ox0:ox1][ring].mean())


def _csv_boxes(table, keys: list[str], coords: list[str]) -> dict[tuple, list[list[float]]]:
    out: dict[tuple, list[list[float]]] = {}
    for i in range(len(table)):
        if not table.columns[coords[0]][i]:
            continue
        out.setdefault(tuple(table.columns[k][i] for k in keys), []).append(
            [float(table.columns[c][i]) for c in coords])
    return out


def test_synthetic_dbt_boxes_lie_on_lesions(synthetic):
    from comoto_cli.utils.csvio import read_csv

    cache = SliceCache(synthetic["folder"] / "dbt.h5")
    truth = synthetic["truth"]["dbt"]
    table = read_csv(synthetic["folder"] / "data" / "dbt" / "BCS-DBT-boxes-train-v2.csv",
                     ["PatientID", "StudyUID", "View", "X", "Y", "Width", "Height"])
    csv_boxes = _csv_boxes(table, ["PatientID", "StudyUID", "View"], ["X", "Y", "Width", "Height"])
    assert cache.num_volumes == len(truth)
    checked_rotated = checked_train = 0
    split_of_patient: dict[str, str] = {}
    for v in range(cache.num_volumes):
        key = (cache.volumes["patient_id"][v], cache.volumes["study_uid"][v], cache.volumes["view"][v])
        volume_truth = truth["/".join(key)]
        assert bool(cache.volumes["flipped"][v]) == volume_truth["rotated"]  # the official flip rule applied
        split = cache.volumes["split"][v]
        assert split_of_patient.setdefault(key[0], split) == split
        rows = cache.volume_slice_rows(v)
        if split != "train":
            assert list(cache.slice_index[rows]) == list(range(volume_truth["slices"]))
        scale_y, scale_x = cache.volumes["scale_y"][v], cache.volumes["scale_x"][v]
        # Stored lesions mapped back to the official frame are the CSV's boxes.
        own = cache.lesions["volume"] == v
        lesions = np.stack([cache.lesions[name][own] for name in ("x", "y", "width", "height")], axis=1)
        np.testing.assert_allclose(sorted(lesions.tolist()), sorted(csv_boxes.get(key, [])), atol=1e-3)
        for row in range(rows.start, rows.stop):
            index = int(cache.slice_index[row])
            image = cache.image(row)
            boxes = cache.boxes(row)
            lesion_rows = cache.box_lesion[cache.box_start[row]:cache.box_start[row] + cache.box_count[row]]
            expected = [les for les in volume_truth["lesions"] if abs(les["slice"] - index) <= 1]
            assert len(boxes) == len(expected)
            for box, lesion_row in zip(boxes, lesion_rows):
                official = cache_to_official(box[None], scale_y, scale_x)[0]
                x, y, w, h = official
                match = [les for les in expected if np.allclose(les["box"], [x, y, x + w, y + h], atol=1e-3)]
                assert len(match) == 1, (key, index, official)
                lesion = match[0]
                assert cache.lesions["slice"][lesion_row] == lesion["slice"]
                cx, cy = lesion["x"] * scale_x, lesion["y"] * scale_y
                assert box[0] <= cx <= box[2] and box[1] <= cy <= box[3], (key, index)
                if index == lesion["slice"]:
                    core, ring = _core_and_ring(image, box)
                    assert core > ring, (key, index, core, ring)
                    checked_rotated += volume_truth["rotated"]
                    checked_train += split == "train"
    assert checked_rotated > 0 and checked_train > 0


def test_synthetic_mammo_boxes_lie_on_lesions(synthetic):
    from comoto_cli.utils.csvio import read_csv

    cache = SliceCache(synthetic["folder"] / "mammo.h5")
    truth = synthetic["truth"]["mammo"]
    table = read_csv(synthetic["folder"] / "data" / "mammo" / "finding_annotations.csv",
                     ["image_id", "xmin", "ymin", "xmax", "ymax"])
    csv_boxes = _csv_boxes(table, ["image_id"], ["xmin", "ymin", "xmax", "ymax"])
    assert cache.num_volumes == len(truth) and cache.num_slices == len(truth)  # every image stored
    checked_monochrome1 = 0
    for v in range(cache.num_volumes):
        image_id = Path(cache.volumes["source"][v]).stem
        image_truth = truth[image_id]
        expected_split = "test" if image_truth["split"] == "test" else ("train", "val")
        assert cache.volumes["split"][v] in expected_split  # VinDr's own test split respected
        row = cache.volume_slice_rows(v).start
        boxes = cache.boxes(row)
        assert len(boxes) == len(image_truth["lesions"])
        back = cache_to_official(boxes, cache.volumes["scale_y"][v], cache.volumes["scale_x"][v])
        xyxy = np.concatenate([back[:, :2], back[:, :2] + back[:, 2:]], axis=1)
        np.testing.assert_allclose(sorted(xyxy.tolist()), sorted(csv_boxes.get((image_id,), [])), atol=1e-3)
        image = cache.image(row)
        for box in boxes:
            inside = [les for les in image_truth["lesions"]
                      if box[0] <= les["x"] * cache.volumes["scale_x"][v] <= box[2]
                      and box[1] <= les["y"] * cache.volumes["scale_y"][v] <= box[3]]
            assert inside, (image_id, box)
            core, ring = _core_and_ring(image, box)
            assert core > ring, (image_id, image_truth["photometric"], core, ring)
            checked_monochrome1 += image_truth["photometric"] == "MONOCHROME1"
    assert checked_monochrome1 > 0
    summary = cache_summary(synthetic["folder"] / "mammo.h5")
    assert summary["modality"] == "mammo" and summary["total"]["volumes"] == len(truth)


def test_kill_9_then_rerun_gives_the_same_content(synthetic, tmp_path, kill_after_first_part):
    root = synthetic["folder"] / "data" / "dbt"
    out = tmp_path / "dbt.h5"
    kill_after_first_part(["preprocess", "dbt", str(root), "--out", str(out), "--image-height", "128", "--image-width",
                           "64", "--lesion-slice-offset", "1", "--normal-slices", "2", "--workers", "2",
                           "--no-progress"], out)
    assert not out.exists()
    report = preprocess(root, out, synthetic["dbt_config"], progress=False)
    assert report["reused"] >= 1
    assert cache_content_hash(out) == cache_content_hash(synthetic["folder"] / "dbt.h5")
    assert not Path(f"{out}.parts").exists() and not list(tmp_path.glob(".dbt.h5.*"))


def test_stratified_split_gives_every_split_lesion_patients():
    patients = [f"P{i:02d}" for i in range(12)]
    has_lesion = {p: i < 4 for i, p in enumerate(patients)}  # only 4 of 12 patients have lesions
    for seed in range(10):
        config = SplitConfig(val_fraction=0.25, test_fraction=0.25, seed=seed)
        result = assign_splits(patients, config, None, has_lesion)
        for split in ("train", "val", "test"):
            assert any(has_lesion[p] for p, s in result.items() if s == split), (seed, split)
    plain = assign_splits(patients, SplitConfig(val_fraction=0.25, test_fraction=0.25, stratify=False), None, has_lesion)
    assert sorted(plain.values()).count("val") == 3


@pytest.mark.parametrize("stratify", [True, False])
def test_k_folds_share_test_and_partition_the_rest_into_val_splits(stratify):
    patients = [f"P{i:02d}" for i in range(23)]
    has_lesion = {p: i % 3 == 0 for i, p in enumerate(patients)}
    folds = [assign_splits(patients, SplitConfig(test_fraction=0.2, seed=4, folds=4, fold=k, stratify=stratify),
                           None, has_lesion) for k in range(4)]
    tests = [{p for p, s in result.items() if s == "test"} for result in folds]
    vals = [{p for p, s in result.items() if s == "val"} for result in folds]
    assert all(t == tests[0] for t in tests) and len(tests[0]) == 5
    rest = set(patients) - tests[0]
    assert set().union(*vals) == rest and sum(len(v) for v in vals) == len(rest)  # disjoint, covering
    assert max(len(v) for v in vals) - min(len(v) for v in vals) <= 1
    if stratify:
        assert all(any(has_lesion[p] for p in v) for v in vals)
    with pytest.raises(ValueError, match="fold 4 does not exist"):
        SplitConfig(folds=4, fold=4)
    few = {p: i < 5 for i, p in enumerate(patients)}  # 5 lesion patients, 1 of them to test: 4 left for 5 folds
    with pytest.raises(UsageError, match="use fewer folds"):
        assign_splits(patients, SplitConfig(test_fraction=0.2, folds=5), None, few)
    own_val = {patients[0]: "val"}
    with pytest.raises(UsageError, match="its own val split"):
        assign_splits(patients, SplitConfig(folds=4), own_val, has_lesion)
    ignored = assign_splits(patients, SplitConfig(test_fraction=0.2, seed=4, folds=4, stratify=stratify,
                                                  respect_dataset_split=False), own_val, has_lesion)
    assert ignored == folds[0]  # the dataset's split set aside, fold 0 is as before


def test_fold_flag_reaches_the_split(tiny_synth, tmp_path, capsys):
    from comoto_cli.cli import main

    out = tmp_path / "fold.h5"
    with pytest.raises(SystemExit) as info:
        main(["preprocess", "dbt", str(tiny_synth / "dbt"), "--out", str(out), "--fold", "2/2", "--image-height", "64",
              "--image-width", "48", "--workers", "1", "--no-progress"])
    assert info.value.code == 0, capsys.readouterr().err
    split = SliceCache(out).preprocess_config()["split"]
    assert (split["folds"], split["fold"]) == (2, 1)
    with pytest.raises(SystemExit) as info:
        main(["preprocess", "dbt", str(tmp_path), "--out", str(tmp_path / "x.h5"), "--fold", "6/5"])
    assert info.value.code == 2 and "1 <= I <= K" in capsys.readouterr().err


def _as_old_level_zero(path: Path, name: str) -> None:
    """Rewrite an image dataset as comoto stored level 0 before it meant "uncompressed": gzip at level 0."""
    with h5py.File(path, "a") as handle:
        data = handle[name][()]
        del handle[name]
        handle.create_dataset(name, data=data, chunks=(1, *data.shape[1:]), maxshape=(None, *data.shape[1:]),
                              compression="gzip", compression_opts=0, shuffle=True)


def test_work_and_caches_in_the_old_level_zero_layout_are_decoded_again(fake, tmp_path):
    """Level 0 now stores slices raw: work files and caches of the old gzip-0 layout (same config hash) are not
    copied chunk by chunk into a raw cache; their volumes are decoded again, and the result is a fresh build's."""
    records = fake()
    config = _config(compression_level=0)
    reference = tmp_path / "reference.h5"
    preprocess(fake.root, reference, config, progress=False)
    out = tmp_path / "dbt.h5"
    fake.decoded.clear()
    fake.state["fail_after"] = 3
    with pytest.raises(RuntimeError, match="simulated crash"):
        preprocess(fake.root, out, config, progress=False)
    parts = list(Path(f"{out}.parts").glob("*/*.part.h5"))
    assert len(parts) == 3
    for part in parts:
        _as_old_level_zero(part, "images")
    fake.state["fail_after"] = None
    fake.decoded.clear()
    preprocess(fake.root, out, config, progress=False)
    assert len(fake.decoded) == len(records)  # the old work files were redone, not copied
    assert cache_content_hash(out) == cache_content_hash(reference)
    with h5py.File(out, "r") as handle:
        assert handle["slices/images"].compression is None
    # A finished cache in the old layout: a changed input rebuilds it without copying its slices.
    _as_old_level_zero(out, "slices/images")
    np.save(records[0].path, np.load(records[0].path) * 0.5)
    fresh = tmp_path / "fresh.h5"
    preprocess(fake.root, fresh, config, progress=False)
    fake.decoded.clear()
    preprocess(fake.root, out, config, progress=False)
    assert len(fake.decoded) == len(records)
    assert cache_content_hash(out) == cache_content_hash(fresh)
