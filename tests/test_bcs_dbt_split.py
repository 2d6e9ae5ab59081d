"""BCS-DBT's own train / validation / test split: its per-split CSVs, found in ROOT by the release's file names or
given with SPLIT=PATH flags, tag every volume with its split, and the cache keeps that split whatever the fractions."""

from __future__ import annotations

import csv
import shutil
from pathlib import Path

import pytest

from comoto_cli.cache.h5cache import SliceCache
from comoto_cli.config import PreprocessConfig, SplitConfig, load_config
from comoto_cli.data.adapters.bcs_dbt import discover_bcs_dbt
from comoto_cli.data.sources import find_split_csvs
from comoto_cli.data.splits import assign_splits
from comoto_cli.errors import InputDataError, UsageError
from comoto_cli.preprocess.pipeline import preprocess
from comoto_cli.utils.split_names import split_csvs, split_of_file_name
from tests.bad_inputs import write_rows
from tests.conftest import TINY_CACHE_SIZE

# The tiny synthetic set has 5 patients (8 volumes); lesions in P1, P3, P4. The official split, by patient:
OFFICIAL = {"DBT-P00001": "train", "DBT-P00002": "train", "DBT-P00003": "validation", "DBT-P00005": "validation",
            "DBT-P00004": "test"}
CACHE_SPLIT = {"train": "train", "validation": "val", "test": "test"}
KINDS = ("file-paths", "labels", "boxes")


def _rows(path: Path) -> tuple[list[str], list[list[str]]]:
    with open(path, newline="", encoding="utf-8") as handle:
        rows = list(csv.reader(handle))
    return rows[0], rows[1:]


def _write(path: Path, header: list[str], rows: list[list[str]]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    write_rows(path, [header, *rows])
    return path


def _official_csvs(synth_dbt: Path, folder: Path, *, splits=("train", "validation", "test"),
                   kinds=KINDS, prefix: str = "BCS-DBT-", version: str = "-v2") -> dict[tuple[str, str], Path]:
    """The synthetic tables cut by OFFICIAL into the release's per-split files, e.g. BCS-DBT-labels-test-v2.csv."""
    written = {}
    for kind in kinds:
        header, rows = _rows(synth_dbt / f"BCS-DBT-{kind}-train-v2.csv")
        for split in splits:
            mine = [row for row in rows if OFFICIAL[row[0]] == split]
            written[kind, split] = _write(folder / f"{prefix}{kind}-{split}{version}.csv", header, mine)
    return written


@pytest.fixture
def official_root(tiny_synth, tmp_path) -> Path:
    """ROOT as the release lays it out: the DICOM collection folder and the per-split CSVs (no combined ones)."""
    root = tmp_path / "BCS-DBT"
    shutil.copytree(tiny_synth / "dbt" / "Breast-Cancer-Screening-DBT", root / "Breast-Cancer-Screening-DBT")
    _official_csvs(tiny_synth / "dbt", root)
    return root


def _cache_splits(path: Path) -> dict[str, set[str]]:
    cache = SliceCache(path)
    try:
        volumes = cache.volumes
        found: dict[str, set[str]] = {}
        for patient, split in zip(volumes["patient_id"], volumes["split"]):
            found.setdefault(str(patient), set()).add(str(split))
        return found
    finally:
        cache.close()


def _expected() -> dict[str, set[str]]:
    return {patient: {CACHE_SPLIT[split]} for patient, split in OFFICIAL.items()}


def _cli(argv: list, capsys) -> tuple[int, str]:
    """Exit code and stderr (stdout is in ``_cli.out``, its lines joined: the console wraps long paths)."""
    from comoto_cli.cli import main

    with pytest.raises(SystemExit) as info:
        main([str(a) for a in argv])
    captured = capsys.readouterr()
    _cli.out = " ".join(captured.out.split())
    return int(info.value.code or 0), captured.err


# ---------------------------------------------------------------------------------------------- names
@pytest.mark.parametrize("name,split", [
    ("BCS-DBT-file-paths-train-v2.csv", "train"),
    ("BCS-DBT-file-paths-validation-v2.csv", "val"),
    ("BCS-DBT-labels-test-v2.csv", "test"),
    ("BCS-DBT file-paths-train.csv", "train"),
    ("BCS-DBT-boxes-test-v2-PHASE-2-Jan-2024.csv", "test"),
    ("bcs_dbt_labels_VAL.csv", "val"),
    ("BCS-DBT-file-paths-v1.csv", None),
    ("contest-trainee.csv", None),  # words, not substrings
    ("train-test.csv", None),  # two splits: none
])
def test_split_of_file_name(name, split):
    assert split_of_file_name(name) == split


def test_split_csvs_forms():
    assert split_csvs(None) is None and split_csvs([]) is None
    assert split_csvs("a/BCS-DBT-file-paths-train-v2.csv") == Path("a/BCS-DBT-file-paths-train-v2.csv")
    assert split_csvs(["a/BCS-DBT-file-paths-train-v2.csv"]) == Path("a/BCS-DBT-file-paths-train-v2.csv")
    assert split_csvs(["test=t.csv", "Validation=v.csv", "training=a.csv"]) == {
        "train": Path("a.csv"), "val": Path("v.csv"), "test": Path("t.csv")}
    assert list(split_csvs(["x/BCS-DBT-labels-test-v2.csv", "x/BCS-DBT-labels-validation-v2.csv"])) == ["val", "test"]
    assert split_csvs({"validation": "v.csv"}) == {"val": Path("v.csv")}
    assert split_csvs("test=t.csv") == {"test": Path("t.csv")}


@pytest.mark.parametrize("value,needle", [
    (["dev=x.csv"], "unknown split 'dev'"),
    ({"holdout": "x.csv"}, "unknown split 'holdout'"),
    (["train=a.csv", "training=b.csv"], "two CSVs for the train split"),
    (["a.csv", "b.csv"], "'a.csv' carries no split"),
    (["train="], "no path"),
])
def test_bad_split_csvs_are_one_line_naming_the_field(value, needle):
    with pytest.raises(UsageError) as info:
        load_config(PreprocessConfig, None, {"labels_csv": value})
    message = str(info.value)
    assert needle in message and "labels_csv" in message and "\n" not in message


def test_config_keeps_a_plain_path_and_round_trips_splits(tmp_path):
    plain = PreprocessConfig(file_paths_csv="paths.csv")
    assert plain.file_paths_csv == Path("paths.csv")
    assert plain.model_dump(mode="json")["file_paths_csv"] == "paths.csv"  # the config hash of old caches holds
    tagged = PreprocessConfig(file_paths_csv=["validation=v.csv", "train=t.csv"])
    assert tagged.model_dump(mode="json")["file_paths_csv"] == {"train": "t.csv", "val": "v.csv"}
    assert PreprocessConfig.model_validate_json(tagged.model_dump_json()) == tagged
    file = tmp_path / "pre.json"
    file.write_text('{"labels_csv": {"train": "l1.csv", "validation": "l2.csv"}}')
    assert load_config(PreprocessConfig, file).labels_csv == {"train": Path("l1.csv"), "val": Path("l2.csv")}


# ---------------------------------------------------------------------------------------------- splits
def test_assign_splits_keeps_a_three_way_dataset_split():
    given = {"a": "train", "b": "train", "c": "validation", "d": "test", "e": "train", "f": "test"}
    for config in (SplitConfig(val_fraction=0.4, test_fraction=0.4), SplitConfig(val_fraction=0.0, test_fraction=0.0)):
        assert assign_splits(given, config, given, {p: p in "ad" for p in given}) == {
            "a": "train", "b": "train", "c": "val", "d": "test", "e": "train", "f": "test"}
    # Only train + test given (as VinDr-Mammo): validation is carved out of the training patients.
    partial = {p: ("test" if p == "z" else "train") for p in "abcdefghz"}
    result = assign_splits(partial, SplitConfig(val_fraction=0.25, test_fraction=0.25, stratify=False), partial)
    assert result["z"] == "test" and list(result.values()).count("test") == 1
    assert list(result.values()).count("val") == 2  # round(0.25 * 9)


# ---------------------------------------------------------------------------------------------- discovery
def test_discovery_tags_every_volume_with_its_split(official_root):
    found = find_split_csvs(official_root, ["PatientID", "StudyUID", "View", "descriptive_path"],
                            flag="--file-paths-csv")
    assert {s: p.name for s, p in found.items()} == {"train": "BCS-DBT-file-paths-train-v2.csv",
                                                    "val": "BCS-DBT-file-paths-validation-v2.csv",
                                                    "test": "BCS-DBT-file-paths-test-v2.csv"}
    records = discover_bcs_dbt(official_root)
    assert len(records) == 8
    for record in records:
        official = OFFICIAL[record.patient_id]
        assert record.split == CACHE_SPLIT[official]
        assert record.csv.name == f"BCS-DBT-file-paths-{official}-v2.csv"
        assert record.labels_csv.name == f"BCS-DBT-labels-{official}-v2.csv"
        assert all(box.csv.name == f"BCS-DBT-boxes-{official}-v2.csv" for box in record.boxes)
    assert sum(len(r.boxes) for r in records) == 7


def test_older_release_names_and_a_test_split_without_boxes(tiny_synth, tmp_path):
    root = tmp_path / "v1"
    shutil.copytree(tiny_synth / "dbt" / "Breast-Cancer-Screening-DBT", root / "Breast-Cancer-Screening-DBT")
    _official_csvs(tiny_synth / "dbt", root / "csv", prefix="BCS-DBT ", version="")  # 'BCS-DBT labels-test.csv'
    (root / "csv" / "BCS-DBT boxes-test.csv").unlink()
    # The test patient has a benign lesion: with no boxes for the test split that is refused ...
    with pytest.raises(InputDataError) as info:
        discover_bcs_dbt(root)
    assert "test split" in str(info.value) and "--boxes-csv test=PATH" in str(info.value)
    # ... but not when its volumes are normal.
    labels = root / "csv" / "BCS-DBT labels-test.csv"
    header, rows = _rows(labels)
    _write(labels, header, [[*row[:3], "1", "0", "0", "0"] for row in rows])
    records = discover_bcs_dbt(root)
    assert {r.split for r in records} == {"train", "val", "test"}
    assert all(not r.boxes for r in records if r.split == "test")


def test_a_split_without_labels_is_refused_in_one_line(official_root, capsys):
    (official_root / "BCS-DBT-labels-test-v2.csv").unlink()  # the v2 release before its test labels came out
    code, err = _cli(["preprocess", "dbt", official_root, "--out", official_root.parent / "c.h5", "--no-progress"],
                     capsys)
    assert code == 1 and len(err.strip().splitlines()) == 1, err
    assert "BCS-DBT-file-paths-test-v2.csv" in err and "no labels CSV for the test split" in err
    assert "--labels-csv test=PATH" in err


# ---------------------------------------------------------------------------------------------- preprocess
@pytest.mark.parametrize("fractions", [(0.4, 0.4), (0.0, 0.0)])
def test_preprocess_keeps_the_official_split(official_root, tmp_path, fractions):
    out = tmp_path / "dbt.h5"
    config = PreprocessConfig(modality="dbt", workers=1, split={"val_fraction": fractions[0],
                                                                "test_fraction": fractions[1]}, **TINY_CACHE_SIZE)
    report = preprocess(official_root, out, config, progress=False)
    assert report["volumes"] == 8
    assert _cache_splits(out) == _expected()


def test_labels_csv_found_in_root_is_an_input_of_the_cache(official_root, tmp_path):
    out = tmp_path / "dbt.h5"
    config = PreprocessConfig(modality="dbt", workers=1, **TINY_CACHE_SIZE)
    assert preprocess(official_root, out, config, progress=False)["up_to_date"] is False
    assert preprocess(official_root, out, config, progress=False)["up_to_date"] is True
    labels = official_root / "BCS-DBT-labels-train-v2.csv"
    header, rows = _rows(labels)
    assert rows[1][:3] == ["DBT-P00001", "DBT-S00001", "rmlo"]
    _write(labels, header, [rows[0], [*rows[1][:3], "0", "0", "1", "0"], *rows[2:]])  # cancer -> benign
    assert preprocess(official_root, out, config, progress=False)["up_to_date"] is False
    cache = SliceCache(out)
    try:
        labelled = dict(zip(zip(cache.volumes["patient_id"], cache.volumes["view"]), cache.volumes["label"]))
    finally:
        cache.close()
    assert labelled["DBT-P00001", "rmlo"] == "benign"


def test_untagged_duplicate_csv_is_still_refused(official_root, capsys):
    header, rows = _rows(official_root / "BCS-DBT-file-paths-train-v2.csv")
    copy = _write(official_root / "BCS-DBT-file-paths-copy.csv", header, rows)
    code, err = _cli(["preprocess", "dbt", official_root, "--out", official_root.parent / "c.h5", "--no-progress"],
                     capsys)
    assert code == 1 and len(err.strip().splitlines()) == 1, err
    assert "several CSV files" in err and str(copy) in err and "names no split" in err and "--file-paths-csv" in err
    copy.unlink()
    # two CSVs for one split (say v1 next to v2) are ambiguous too
    _write(official_root / "BCS-DBT-file-paths-train.csv", header, rows)
    with pytest.raises(InputDataError) as info:
        discover_bcs_dbt(official_root)
    assert "train split" in str(info.value) and "BCS-DBT-file-paths-train.csv" in str(info.value)


def test_volume_in_two_splits_is_a_bad_row_naming_both_files(official_root, capsys):
    train = official_root / "BCS-DBT-file-paths-train-v2.csv"
    test = official_root / "BCS-DBT-file-paths-test-v2.csv"
    header, rows = _rows(train)
    _, test_rows = _rows(test)
    _write(test, header, [*test_rows, rows[0]])  # P1 lcc also in test
    code, err = _cli(["preprocess", "dbt", official_root, "--out", official_root.parent / "c.h5", "--no-progress"],
                     capsys)
    assert code == 1 and len(err.strip().splitlines()) == 1, err
    assert str(train) in err and str(test) in err and "DBT-P00001" in err and "split" in err
    skipped: list[dict] = []
    records = discover_bcs_dbt(official_root, skipped=skipped)  # skip mode: the volume goes, whichever split
    assert ("DBT-P00001", "lcc") not in {(r.patient_id, r.view) for r in records} and len(records) == 7
    assert [(s["path"], s["row"]) for s in skipped] == [(str(test), len(test_rows) + 2)]


def test_explicit_split_flags_through_the_cli(tiny_synth, tmp_path, capsys):
    root = tiny_synth / "dbt"  # the DICOMs; its own combined CSVs are not read when all three are given
    csvs = _official_csvs(root, tmp_path / "csvs")
    out = tmp_path / "dbt.h5"
    argv = ["preprocess", "dbt", root, "--out", out, "--no-progress", "--workers", "1",
            "--image-height", TINY_CACHE_SIZE["image_height"], "--image-width", TINY_CACHE_SIZE["image_width"],
            "--val-fraction", "0.3", "--test-fraction", "0.3"]
    for kind in KINDS:
        for split in ("train", "validation", "test"):
            argv += [f"--{kind}-csv", f"{split}={csvs[kind, split]}"]
    code, err = _cli(argv, capsys)
    assert code == 0, err
    assert _cache_splits(out) == _expected()
    stored = SliceCache(out)
    try:
        config = stored.preprocess_config()
    finally:
        stored.close()
    assert config["file_paths_csv"] == {CACHE_SPLIT[s]: str(csvs["file-paths", s]) for s in CACHE_SPLIT}
    # The same run again is up to date; editing a labels CSV is a change of input.
    code, _ = _cli(argv, capsys)
    assert code == 0 and "up to date" in _cli.out
    labels = csvs["labels", "validation"]
    header, rows = _rows(labels)
    assert rows[0][:3] == ["DBT-P00003", "DBT-S00003", "lcc"]
    _write(labels, header, [[*rows[0][:3], "0", "0", "1", "0"], *rows[1:]])  # P3 lcc: cancer -> benign
    code, err = _cli(argv, capsys)
    assert code == 0 and "up to date" not in _cli.out, err
    # A bad tag on the command line is one usage line naming the field.
    code, err = _cli(["preprocess", "dbt", root, "--out", out, "--labels-csv", f"valid8ion={labels}"], capsys)
    assert code == 2 and len(err.strip().splitlines()) == 1 and "labels_csv" in err and "valid8ion" in err
