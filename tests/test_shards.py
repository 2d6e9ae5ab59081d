"""`comoto preprocess ... --shard K/N` and `comoto cache merge`: N shards merged hold exactly what one run writes
(the same `cache_content_hash`), a bad set of shards is refused with one line, and a killed shard resumes."""

from __future__ import annotations

import json
from pathlib import Path

import h5py
import pytest

from comoto_cli.cache.shards import parse_shard
from comoto_cli.cli import main
from comoto_cli.config import PreprocessConfig
from comoto_cli.errors import UsageError
from comoto_cli.preprocess.merge import merge_caches
from comoto_cli.preprocess.pipeline import preprocess
from comoto_cli.preprocess.summary import cache_content_hash


def _config(**kwargs) -> PreprocessConfig:
    return PreprocessConfig(**{"image_height": 32, "image_width": 24, "workers": 1, **kwargs})

SIZE = {"image_height": 32, "image_width": 32}
SPLIT = {"val_fraction": 0.25, "test_fraction": 0.25}


def _shards(root: Path, folder: Path, config: PreprocessConfig, count: int) -> list[Path]:
    paths = []
    for index in range(1, count + 1):
        path = folder / f"shard{index}.h5"
        report = preprocess(root, path, config, shard=(index, count), progress=False)
        assert report["shard"] == f"{index}/{count}" and not report["up_to_date"]
        paths.append(path)
    return paths


def _run_cli(argv: list, capsys) -> tuple[int, str]:
    capsys.readouterr()
    with pytest.raises(SystemExit) as info:
        main([str(a) for a in argv])
    return info.value.code, capsys.readouterr().err


# ---------------------------------------------------------------------------------------------- fake data
def test_shards_then_merge_equal_one_run_with_skipped_inputs_and_empty_shards(fake, tmp_path):
    records = fake()
    bad = next(r for r in records if r.boxes).boxes[0]
    bad.x = 40.0  # outside the image: skipped while planning, listed by every shard
    broken = next(r for r in records if not r.boxes).path  # fails while decoding: listed by its shard only
    fake.state["unreadable"].add(Path(broken))
    config = _config(on_error="skip", lesion_slice_offset=1)
    single = tmp_path / "single.h5"
    report = preprocess(fake.root, single, config, progress=False)
    assert len(report["skipped"]) == 2 and report["volumes"] == len(records) - 2
    expected = cache_content_hash(single)
    for count in (1, 3, 16):  # 16 > 12 volumes: some shards hold nothing
        folder = tmp_path / f"n{count}"
        paths = _shards(fake.root, folder, config, count)
        with h5py.File(paths[-1], "r") as handle:
            assert handle.attrs["shard"] == f"{count}/{count}" and "plan_index" in handle["shard"]
        merged = folder / "merged.h5"
        result = merge_caches(merged, list(reversed(paths)), progress=False)
        assert result["volumes"] == len(records) - 2 and result["fingerprint"]
        assert cache_content_hash(merged) == expected, count
        with h5py.File(merged, "r") as handle:
            assert "shard" not in handle.attrs and "shard" not in handle
            assert json.loads(handle.attrs["skipped_json"]) == report["skipped"]
        # The merged cache is what a single run into that path would have written: it is up to date.
        assert preprocess(fake.root, merged, config, progress=False)["up_to_date"]
    # Speed-only settings may differ between shards (nodes of another size): still the single run's content.
    other_node = tmp_path / "n3" / "shard2-gdcm.h5"
    preprocess(fake.root, other_node, config.model_copy(update={"decoder": "gdcm"}), shard=(2, 3), progress=False)
    mixed = tmp_path / "mixed.h5"
    merge_caches(mixed, [tmp_path / "n3" / "shard1.h5", other_node, tmp_path / "n3" / "shard3.h5"], progress=False)
    assert cache_content_hash(mixed) == expected
    # A shard is up to date only as that shard: not as another one, nor as a full cache.
    shard_file = tmp_path / "n3" / "shard2.h5"
    fake.decoded.clear()
    assert preprocess(fake.root, shard_file, config, shard=(2, 3), progress=False)["up_to_date"]
    assert fake.decoded == []
    assert not preprocess(fake.root, shard_file, config, shard=(1, 3), progress=False)["up_to_date"]
    assert not preprocess(fake.root, single, config, shard=(1, 1), progress=False)["up_to_date"]


def test_merge_refuses_a_bad_set_of_shards_with_one_line(fake, tmp_path, capsys, monkeypatch):
    monkeypatch.delenv("COMOTO_DEBUG", raising=False)
    fake()
    paths = _shards(fake.root, tmp_path / "a", _config(), 3)
    other = _shards(fake.root, tmp_path / "b", _config(image_width=20), 3)
    two = _shards(fake.root, tmp_path / "c", _config(), 2)
    full = tmp_path / "full.h5"
    preprocess(fake.root, full, _config(), progress=False)
    out = tmp_path / "out" / "merged.h5"
    cases = [
        ([paths[0], paths[2]], ["2/3 missing"]),
        ([paths[0], paths[1], paths[1], paths[2]], [str(paths[1]), "2/3 given twice"]),
        ([paths[0], other[1], paths[2]], [str(other[1]), "different preprocess config", str(paths[0])]),
        ([paths[0], two[1], paths[2]], [str(two[1]), "different number of shards"]),
        ([paths[0], paths[1], paths[2], full], [str(full), "not a shard"]),
        ([paths[0], paths[1], tmp_path / "missing.h5"], [str(tmp_path / "missing.h5"), "not found"]),
    ]
    for shards, needles in cases:
        code, err = _run_cli(["cache", "merge", out, *shards, "--no-progress"], capsys)
        lines = err.strip().splitlines()
        assert code == 1 and len(lines) == 1 and "Traceback" not in err, err
        for needle in needles:
            assert needle in lines[0], (needle, lines[0])
        assert not out.exists() and not out.parent.exists()
    code, err = _run_cli(["cache", "merge", paths[0], *paths, "--no-progress"], capsys)
    assert code == 2 and "one of the shards" in err and len(err.strip().splitlines()) == 1
    # A wrong --shard is a one-line usage error, before any work; the library says the same.
    for value in ("0/3", "4/3", "3", "a/b", "1/0"):
        code, err = _run_cli(["preprocess", "dbt", fake.root, "--out", tmp_path / "x.h5", "--shard", value,
                              "--no-progress"], capsys)
        assert code == 2 and len(err.strip().splitlines()) == 1 and "--shard" in err, (value, err)
    assert not (tmp_path / "x.h5").exists() and not Path(f"{tmp_path / 'x.h5'}.parts").exists()
    assert parse_shard(" 2/8 ") == (2, 8)
    with pytest.raises(UsageError, match="1 <= K <= N"):
        preprocess(fake.root, tmp_path / "y.h5", _config(), shard=(5, 4), progress=False)


# ---------------------------------------------------------------------------------------------- real tiny data
@pytest.fixture(scope="module")
def single_runs(tiny_synth, tmp_path_factory) -> dict[str, Path]:
    """One ordinary run per modality: what the merged shards must equal."""
    folder = tmp_path_factory.mktemp("single_runs")
    out = {}
    for modality in ("dbt", "mammo"):
        out[modality] = folder / f"{modality}.h5"
        config = PreprocessConfig(modality=modality, workers=1, split=SPLIT, **SIZE)
        preprocess(tiny_synth / modality, out[modality], config, progress=False)
    return out


def test_real_dbt_and_mammo_shards_through_the_cli(tiny_synth, single_runs, tmp_path, capsys):
    for modality, count in (("dbt", 3), ("mammo", 2)):
        shards = []
        for index in range(1, count + 1):
            shards.append(tmp_path / f"{modality}-{index}.h5")
            code, err = _run_cli(["preprocess", modality, tiny_synth / modality, "--out", shards[-1], "--shard",
                                  f"{index}/{count}", "--image-height", 32, "--image-width", 32, "--val-fraction",
                                  0.25, "--test-fraction", 0.25, "--workers", 1, "--no-progress"], capsys)
            assert code == 0, err
        merged = tmp_path / f"{modality}.h5"
        code, err = _run_cli(["cache", "merge", merged, *reversed(shards), "--no-progress"], capsys)
        assert code == 0, err
        assert cache_content_hash(merged) == cache_content_hash(single_runs[modality]), modality


def test_killed_shard_resumes_and_merges_to_the_single_run(tiny_synth, single_runs, tmp_path, kill_after_first_part):
    root = tiny_synth / "dbt"
    out = tmp_path / "shard1.h5"
    kill_after_first_part(["preprocess", "dbt", str(root), "--out", str(out), "--shard", "1/2", "--image-height",
                           "32", "--image-width", "32", "--val-fraction", "0.25", "--test-fraction", "0.25",
                           "--workers", "1", "--no-progress"], out)
    assert not out.exists() and list(Path(f"{out}.parts").glob("*/*.part.h5"))
    config = PreprocessConfig(modality="dbt", workers=1, split=SPLIT, **SIZE)
    report = preprocess(root, out, config, shard=(1, 2), progress=False)
    assert report["reused"] >= 1 and report["computed"] + report["reused"] == report["volumes"]
    assert not Path(f"{out}.parts").exists()
    second = tmp_path / "shard2.h5"
    preprocess(root, second, config, shard=(2, 2), progress=False)
    merged = tmp_path / "merged.h5"
    merge_caches(merged, [out, second], progress=False)
    assert cache_content_hash(merged) == cache_content_hash(single_runs["dbt"])
    assert not list(tmp_path.glob(".*.tmp"))
