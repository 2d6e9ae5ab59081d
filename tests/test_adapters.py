"""Dataset adapters: the registry, the choice of adapter from the config, and the JSON-lines manifest (the example of
a dataset added as one module plus its registration), down to the cache it makes."""

from __future__ import annotations

import ast
import csv
import json
import shutil
from pathlib import Path
from typing import ClassVar

import h5py
import numpy as np
import pytest

from comoto_cli.config import PreprocessConfig, config_json, load_config
from comoto_cli.data.adapters import PixelSource, VolumeAdapter, adapter_for, base, get_adapter, register, registered
from comoto_cli.data.adapters.jsonl import read_jsonl
from comoto_cli.data.sources import ImageRecord, LesionBox
from comoto_cli.errors import InputDataError, UsageError
from comoto_cli.preprocess.pipeline import preprocess

SMALL = {"image_height": 64, "image_width": 48, "workers": 1, "split": {"val_fraction": 0.25, "test_fraction": 0.25}}


# ---------------------------------------------------------------------------------------------- registry
def test_the_built_in_adapters_are_registered_and_chosen_as_before():
    assert {"bcs-dbt", "vindr", "manifest", "jsonl"} <= set(registered())
    assert adapter_for(PreprocessConfig(modality="dbt")).name == "bcs-dbt"
    assert adapter_for(PreprocessConfig(modality="mammo")).name == "vindr"
    assert adapter_for(PreprocessConfig(modality="mammo", manifest_csv="m.csv")).name == "manifest"
    assert adapter_for(PreprocessConfig(modality="mammo", dataset="jsonl")).name == "jsonl"


@pytest.mark.parametrize("settings, needle", [
    ({"modality": "mammo", "dataset": "no-such-set"}, "dataset: unknown dataset 'no-such-set'; registered: bcs-dbt"),
    ({"modality": "dbt", "dataset": "jsonl"}, "comoto preprocess mammo"),
    ({"modality": "mammo", "dataset": "vindr", "inputs": {"manifest": "a.jsonl"}}, "takes no input named manifest"),
])
def test_a_wrong_dataset_is_a_usage_error(settings, needle):
    with pytest.raises(UsageError) as info:
        adapter_for(PreprocessConfig(**settings))
    assert needle in str(info.value)


def test_dataset_fields_at_their_defaults_leave_the_config_hash_alone():
    """Caches made before the fields existed stay up to date: the canonical JSON has no trace of them."""
    plain = json.loads(config_json(PreprocessConfig()))
    assert "dataset" not in plain and "inputs" not in plain
    chosen = PreprocessConfig(modality="mammo", dataset="jsonl", inputs=["manifest=a.jsonl"])
    assert json.loads(config_json(chosen))["inputs"] == {"manifest": "a.jsonl"}
    with pytest.raises(UsageError) as info:
        load_config(PreprocessConfig, None, {"inputs": ["manifest"]})  # as --input manifest, without '=PATH'
    assert "expected NAME=PATH" in str(info.value)


# ---------------------------------------------------------------------------------------------- JSON lines
def _vindr_as_jsonl(vindr: Path, out: Path) -> None:
    """The VinDr images and boxes of ``vindr`` written as a JSON-lines manifest, one line per image."""
    images: dict[str, dict] = {}
    with open(vindr / "finding_annotations.csv", newline="", encoding="utf-8") as handle:
        for row in csv.DictReader(handle):
            image = images.setdefault(row["image_id"], {
                "path": f"images/{row['study_id']}/{row['image_id']}.dicom", "patient_id": row["study_id"],
                "view": row["laterality"][0].lower() + row["view_position"].lower(), "split": row["split"],
                "boxes": []})
            if row["xmin"]:
                box = {key: float(row[key]) for key in ("xmin", "ymin", "xmax", "ymax")}
                image["boxes"].append({**box, "class": ", ".join(ast.literal_eval(row["finding_categories"]))})
    out.write_text("".join(json.dumps(image) + "\n" for image in images.values()), encoding="utf-8")


def test_jsonl_manifest_makes_the_cache_the_vindr_layout_makes(tiny_synth, tmp_path, capsys):
    root = tmp_path / "mammo"
    shutil.copytree(tiny_synth / "mammo", root)
    _vindr_as_jsonl(root, root / "images.jsonl")
    preprocess(root, tmp_path / "vindr.h5", PreprocessConfig(modality="mammo", **SMALL), progress=False)
    preprocess(root, tmp_path / "jsonl.h5", PreprocessConfig(modality="mammo", dataset="jsonl", **SMALL),
               progress=False)
    with h5py.File(tmp_path / "vindr.h5", "r") as a, h5py.File(tmp_path / "jsonl.h5", "r") as b:
        names: list[str] = []
        a.visit(names.append)
        datasets = [name for name in names if isinstance(a[name], h5py.Dataset)]
        assert datasets and all(np.array_equal(a[name][()], b[name][()]) for name in datasets)
        assert json.loads(b.attrs["config_json"])["dataset"] == "jsonl"
    # The command line: the file given with --input (here a second copy beside the first one, so it must be named).
    shutil.copy(root / "images.jsonl", root / "again.jsonl")
    from comoto_cli.cli import main

    argv = ["preprocess", "mammo", str(root), "--out", str(tmp_path / "cli.h5"), "--dataset", "jsonl", "--image-height",
            "64", "--image-width", "48", "--workers", "1", "--no-progress"]
    with pytest.raises(SystemExit) as info:
        main(argv)
    assert info.value.code == 1 and "several *.jsonl files" in " ".join(capsys.readouterr().err.split())
    with pytest.raises(SystemExit) as info:
        main([*argv, "--input", f"manifest={root / 'again.jsonl'}"])
    assert info.value.code == 0 and (tmp_path / "cli.h5").is_file()


def _touch(path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"x")
    return path


GOOD = [{"path": "a.dcm", "patient_id": "p1", "view": "LCC", "split": "validation",
         "boxes": [{"xmin": 1, "ymin": 2, "xmax": 11, "ymax": 22, "class": "mass"}]},
        {"path": "b.dcm", "patient_id": "p2"}]


@pytest.mark.parametrize("line, needle", [
    ("{not json", "not a JSON object"),
    ('["c.dcm"]', "not a JSON object but list"),
    ({"path": "c.dcm"}, "patient_id is missing"),
    ({"path": "c.dcm", "patient_id": "p3", "box": []}, "unknown key(s) 'box'"),
    ({"path": "c.dcm", "patient_id": "p3", "view": "ap"}, "view 'ap'"),
    ({"path": "c.dcm", "patient_id": "p3", "split": "dev"}, "split 'dev'"),
    ({"path": "c.dcm", "patient_id": "p3", "boxes": [{"xmin": 5, "ymin": 1, "xmax": 5, "ymax": 4}]}, "inverted"),
    ({"path": "c.dcm", "patient_id": "p3", "boxes": [{"xmin": True, "ymin": 1, "xmax": 5, "ymax": 4}]}, "number"),
    ({"path": "c.dcm", "patient_id": "p3", "boxes": [{"xmin": 1, "ymin": 1, "xmax": 1e300, "ymax": 4}]}, "range"),
    ({"path": "../c.dcm", "patient_id": "p3"}, "'..'"),
    ({"path": "missing.dcm", "patient_id": "p3"}, "not found"),
    ({"path": "a.dcm", "patient_id": "p1"}, "listed twice (also on line 1)"),
])
def test_jsonl_bad_lines_name_file_and_line_or_are_skipped(tmp_path, line, needle):
    root = tmp_path / "root"
    for name in ("a.dcm", "b.dcm", "c.dcm"):
        _touch(root / name)
    manifest = tmp_path / "images.jsonl"
    lines = [json.dumps(item) for item in GOOD] + ["", line if isinstance(line, str) else json.dumps(line)]
    manifest.write_text("\n".join(lines) + "\n", encoding="utf-8")
    with pytest.raises(InputDataError) as info:
        read_jsonl(root, manifest)
    assert f"{manifest}, row 4" in str(info.value) and needle in str(info.value)
    skipped: list[dict] = []
    records = read_jsonl(root, manifest, skipped=skipped)
    kept = ["b.dcm"] if needle.startswith("listed twice") else ["a.dcm", "b.dcm"]  # a duplicate: both go
    assert [r.source for r in records] == kept and [s["row"] for s in skipped] == [4]


def test_jsonl_records(tmp_path):
    for name in ("a.dcm", "b.dcm"):
        _touch(tmp_path / name)
    manifest = tmp_path / "images.jsonl"
    manifest.write_text("\n".join(json.dumps(item) for item in GOOD), encoding="utf-8")
    first, second = read_jsonl(tmp_path, manifest)
    assert (first.source, first.patient_id, first.study_uid, first.view, first.split, first.label, first.row) == (
        "a.dcm", "p1", "p1", "lcc", "val", "lesion", 1)
    box = first.boxes[0]
    assert (box.slice, box.x, box.y, box.width, box.height, box.cls, box.csv, box.row) == (
        0, 1.0, 2.0, 10.0, 20.0, "mass", manifest, 1)
    assert (second.view, second.split, second.label, second.boxes) == ("", None, "normal", [])
    assert first.path == (tmp_path / "a.dcm").resolve()


# ---------------------------------------------------------------------------------------------- a new dataset
@pytest.fixture
def registration_ends_with_the_test():
    with base._REGISTRY.restored():
        yield


def test_a_dataset_is_one_adapter_class_plus_its_registration(tmp_path, monkeypatch,
                                                              registration_ends_with_the_test):
    """An adapter written outside the package (numpy volumes listed by file name) runs through the unchanged
    pipeline once registered."""

    @register
    class NumpyVolumes(VolumeAdapter):
        name: ClassVar[str] = "npy-volumes"

        def discover(self, root, config, skipped):
            return [ImageRecord(patient_id=path.stem, study_uid=path.stem, view="lcc", path=path, source=path.name,
                                label="cancer", csv=root / "list.txt", row=1,
                                boxes=[LesionBox(2, 3.0, 4.0, 5.0, 6.0, "mass", root / "list.txt", 1)])
                    for path in sorted(Path(root).glob("*.npy"))]

        def read_header(self, path, config):
            return tuple(np.load(path, mmap_mode="r").shape)

        def open_pixels(self, path, *, view, csv, row, slices, decoder, accept_modality):
            pixels = np.load(path)
            wanted = range(len(pixels)) if slices is None else sorted(set(slices))
            return PixelSource(pixels.shape, False, ((i, pixels[i]) for i in wanted))

    for index in range(4):
        np.save(tmp_path / f"P{index}.npy", np.random.default_rng(index).random((5, 20, 16), dtype=np.float32))
    assert get_adapter("npy-volumes").volumes
    report = preprocess(tmp_path, tmp_path / "out.h5", PreprocessConfig(dataset="npy-volumes", **SMALL),
                        progress=False)
    assert report["volumes"] == 4 and report["skipped"] == []
