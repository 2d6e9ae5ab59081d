"""`comoto cache info` and the content hash, on caches written directly with CacheWriter (milliseconds)."""

from __future__ import annotations

import json

import numpy as np
import pytest

from comoto_cli.cache.h5cache import CacheWriter, VolumeRecord
from comoto_cli.cli import main
from comoto_cli.preprocess.summary import cache_content_hash, cache_summary


def _write(path, *, pixel: float = 0.5, skipped=None, extra_attr: dict | None = None):
    writer = CacheWriter(path, modality="dbt", image_height=8, image_width=4, config_json="{}", config_hash="abc")
    volumes = [("P1", "train", 2, [(1, 1.0, 2.0, 3.0, 4.0)]), ("P1", "train", 1, []),
               ("P2", "val", 3, [(0, 1.0, 1.0, 2.0, 2.0), (2, 0.0, 0.0, 1.0, 1.0)]), ("P3", "test", 3, [])]
    for patient, split, count, lesions in volumes:
        record = VolumeRecord(patient_id=patient, study_uid="S", view="lcc", split=split, source="x.dcm",
                              num_slices=3, original_height=16, original_width=8, scale_y=0.5, scale_x=0.5,
                              lesions=lesions, lesion_classes=["cancer"] * len(lesions))
        images = np.full((count, 8, 4), pixel, np.float32)
        boxes = [np.array([[0, 0, 1, 1]] * len(lesions), np.float32) if i == 0 else np.zeros((0, 4), np.float32)
                 for i in range(count)]
        ids = [np.arange(len(lesions)) if i == 0 else np.zeros(0, np.int64) for i in range(count)]
        writer.add_volume(record, list(range(count)), images, boxes, ids)
    if skipped:
        writer.set_skipped(skipped)
    for key, value in (extra_attr or {}).items():
        writer.file.attrs[key] = value
    writer.close()


def test_summary_counts_per_split(tmp_path):
    path = tmp_path / "c.h5"
    _write(path, skipped=[{"path": "b.csv", "row": 3, "reason": "outside"}])
    summary = cache_summary(path)
    assert summary["modality"] == "dbt" and summary["format_version"] == 1 and summary["config_hash"] == "abc"
    assert (summary["image_height"], summary["image_width"]) == (8, 4) and summary["geometry"] == "stretch"
    assert summary["skipped"] == 1 and summary["file_size_bytes"] == path.stat().st_size
    assert summary["splits"]["train"] == {"volumes": 2, "patients": 1, "slices": 3, "context_slices": 0, "lesions": 1, "boxes": 1,
                                          "slices_with_boxes": 1, "volumes_with_lesions": 1}
    assert summary["splits"]["val"]["lesions"] == 2 and summary["splits"]["val"]["boxes"] == 2
    assert summary["splits"]["test"]["slices"] == 3 and summary["splits"]["test"]["lesions"] == 0
    assert summary["total"]["volumes"] == 4 and summary["total"]["patients"] == 3 and summary["total"]["slices"] == 9


def test_cli_info_json_text_and_errors(tmp_path, capsys):
    path = tmp_path / "c.h5"
    _write(path)
    with pytest.raises(SystemExit) as info:
        main(["cache", "info", str(path), "--json"])
    assert info.value.code == 0
    assert json.loads(capsys.readouterr().out) == cache_summary(path)
    with pytest.raises(SystemExit) as info:
        main(["cache", "info", str(path)])
    text = capsys.readouterr().out
    assert info.value.code == 0 and "abc" in text and "val" in text and "total" in text
    (tmp_path / "junk.h5").write_text("not hdf5")
    for bad in (tmp_path / "missing.h5", tmp_path / "junk.h5"):
        with pytest.raises(SystemExit) as info:
            main(["cache", "info", str(bad)])
        assert info.value.code == 1
        assert str(bad) in capsys.readouterr().err.replace("\n", "")


def test_content_hash_sees_content_not_bytes_or_mtimes(tmp_path):
    _write(tmp_path / "a.h5")
    _write(tmp_path / "b.h5", extra_attr={"input_fingerprint": "different mtimes"})
    _write(tmp_path / "c.h5", pixel=0.25)
    _write(tmp_path / "d.h5", skipped=[{"path": "x", "row": 1, "reason": "r"}])
    _write(tmp_path / "e.h5", extra_attr={"config_json": '{"image_height": 8, "workers": 0}'})
    _write(tmp_path / "f.h5", extra_attr={"config_json": '{"workers": 4, "image_height": 8}'})
    _write(tmp_path / "g.h5", extra_attr={"config_json": '{"image_height": 16, "workers": 0}'})
    digests = {name: cache_content_hash(tmp_path / f"{name}.h5") for name in "abcdefg"}
    assert digests["e"] == digests["f"]  # the worker count is speed, not content
    assert digests["g"] != digests["e"]  # a setting that changes the data is content
    assert digests["a"] == digests["b"]  # the input fingerprint (mtimes) is not content
    assert digests["c"] != digests["a"]  # pixels differ
    assert digests["d"] != digests["a"]  # the skipped list is content
