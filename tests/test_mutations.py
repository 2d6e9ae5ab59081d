"""Seeded mutations of the synthetic DICOMs and CSVs through the real `comoto preprocess` command.

Each case copies a small dataset (one BCS-DBT patient: two volumes, one of them JPEG 2000; two mammograms in a
manifest, one of them JPEG 2000), changes one thing drawn from a seeded generator (a DICOM header tag, a few header
bytes, a nested sequence's length, the file cut short, compressed pixel bytes, one CSV cell) and runs the command in
this process. The promise checked: exit 0 with a cache, or exit 1 with exactly one line on stderr (file descriptor
2, so whatever a C decoder prints counts) that names the changed file, no traceback, no numpy warning, and no
output left behind. The whole file runs in well under 30 s on 2 cores.
"""

from __future__ import annotations

import os
import random
import struct
import warnings
from dataclasses import dataclass
from pathlib import Path

import pydicom
import pytest

from comoto_cli.cli import main
from tests.bad_inputs import DBT_BOXES, DBT_LABELS, DBT_PATHS, read_rows, write_rows

SEED = 20240611
CASES_PER_KIND = 6
SMALL = ["--image-height", "32", "--image-width", "32", "--workers", "1", "--no-progress"]

# Tag -> values to try (as DICOM text or numbers, by the tag's VR).
TAG_VALUES = {
    "Rows": [0, 1, 7, 65535],
    "Columns": [0, 3, 65535],
    "NumberOfFrames": ["0", "-1", "99999999", "abc", "2"],
    "BitsAllocated": [0, 1, 8, 12, 64],
    "BitsStored": [0, 8, 17, 64],
    "PixelRepresentation": [1, 2],
    "SamplesPerPixel": [0, 3],
    "PhotometricInterpretation": ["", "RGB", "PALETTE COLOR", "MONOCHROME1"],
    "WindowCenter": ["1e308", "-1e308", "NaN", "inf", "abc"],
    "WindowWidth": ["0", "-5", "1e-300", "1e308", "NaN"],
    "RescaleSlope": ["1e308", "-1e308", "0", "NaN", "1e-320"],
    "RescaleIntercept": ["1e308", "-inf", "abc"],
    "SOPClassUID": ["1.2.840.10008.5.1.4.1.1.2", "1.2.840.10008.5.1.4.1.1.7", "1.2.3.4"],
    "Modality": ["", "CT", "RG", "OT"],
}
CSV_VALUES = ["99999999999999999999999", "1e308", "-1e300", "-1", "0", "0.5", "nan", "inf", "", "x", "1e-320",
              "30000", "7"]
DBT_NUMERIC = {DBT_BOXES: ["Slice", "X", "Y", "Width", "Height", "VolumeSlices"],
               DBT_LABELS: ["Normal", "Actionable", "Benign", "Cancer"]}
MANIFEST_NUMERIC = ["xmin", "ymin", "xmax", "ymax"]


@dataclass(frozen=True)
class Mutation:
    modality: str  # dbt | mammo
    kind: str  # tag | bytes | sequence | truncate | pixels | csv
    target: int  # which file (0 or 1) / which CSV row
    detail: tuple

    @property
    def name(self) -> str:
        return f"{self.modality}-{self.kind}-{self.target}-" + "-".join(str(d)[:14] for d in self.detail)


def _mutations() -> list[Mutation]:
    rng = random.Random(SEED)
    out: list[Mutation] = []
    for modality in ("dbt", "mammo"):
        # The synthetic mammograms' headers hold no sequence: twice the tag changes instead.
        kinds = ("tag", "bytes", "sequence", "truncate", "pixels", "csv") if modality == "dbt" else (
            "tag", "tag", "bytes", "truncate", "pixels", "csv")
        for kind in kinds:
            wanted = len(out) + CASES_PER_KIND
            while len(out) < wanted:
                target = rng.randrange(2)
                if kind == "tag":
                    tag = rng.choice(sorted(TAG_VALUES))
                    detail = (tag, rng.choice(TAG_VALUES[tag]))
                elif kind == "bytes":
                    detail = (rng.randrange(2**32), rng.choice([1, 2, 4, 8]))
                elif kind == "sequence":
                    detail = (rng.randrange(2**32), rng.choice([0, 1, 5, 7, 0xFFFF, 0x7FFFFFFF]))
                elif kind == "truncate":
                    detail = (round(rng.uniform(0.02, 0.995), 3),)
                elif kind == "pixels":
                    detail = (rng.randrange(2**32), rng.choice([1, 16, 256]))
                else:
                    if modality == "dbt":
                        csv_name = rng.choice(sorted(DBT_NUMERIC))
                        column = rng.choice(DBT_NUMERIC[csv_name])
                    else:
                        csv_name, column = "manifest.csv", rng.choice(MANIFEST_NUMERIC)
                    detail = (csv_name, column, rng.choice(CSV_VALUES))
                mutation = Mutation(modality, kind, target, detail)
                if mutation not in out:  # a repeat would test nothing new
                    out.append(mutation)
    return out


MUTATIONS = _mutations()


# ------------------------------------------------------------------------------------------------ datasets
def _dbt_dataset(synth: Path, destination: Path) -> tuple[Path, list[Path]]:
    """BCS-DBT layout (hard links) with two patients that have boxes: one whose volume is uncompressed, one whose
    volume is JPEG 2000; returns the root and those two volumes."""
    source = synth / "dbt"
    paths = read_rows(source / DBT_PATHS)
    column = paths[0].index("descriptive_path")
    with_boxes = {row[0] for row in read_rows(source / DBT_BOXES)[1:]}

    def compressed(row) -> bool:
        return pydicom.dcmread(source / row[column], stop_before_pixels=True).file_meta.TransferSyntaxUID.is_compressed

    chosen = [next(r for r in paths[1:] if r[0] in with_boxes and compressed(r) == packed) for packed in (False, True)]
    patients = {row[0] for row in chosen}
    root = destination / "dbt"
    root.mkdir(parents=True)
    for name in (DBT_PATHS, DBT_LABELS, DBT_BOXES):
        rows = read_rows(source / name)
        write_rows(root / name, [rows[0]] + [r for r in rows[1:] if r[0] in patients])
    for row in read_rows(root / DBT_PATHS)[1:]:
        (root / row[column]).parent.mkdir(parents=True, exist_ok=True)
        os.link(source / row[column], root / row[column])
    return root, [root / row[column] for row in chosen]


def _mammo_dataset(synth: Path, destination: Path) -> tuple[Path, list[Path]]:
    """A manifest of two mammograms (one JPEG 2000, one uncompressed), the first with its VinDr boxes."""
    source = synth / "mammo"
    rows = read_rows(source / "finding_annotations.csv")
    header = rows[0]
    images: dict[str, list[list[str]]] = {}
    for row in rows[1:]:
        images.setdefault(row[header.index("image_id")], []).append(row)

    def location(row) -> str:
        return f"images/{row[header.index('study_id')]}/{row[header.index('image_id')]}.dicom"

    def compressed(rows_of_image) -> bool:
        path = source / location(rows_of_image[0])
        return pydicom.dcmread(path, stop_before_pixels=True).file_meta.TransferSyntaxUID.is_compressed

    boxed = [rows_of_image for rows_of_image in images.values() if rows_of_image[0][header.index("xmin")]]
    first = next(r for r in boxed if compressed(r))
    second = next(r for r in images.values() if not compressed(r))
    root = destination / "mammo"
    table = [["path", "patient_id", "xmin", "ymin", "xmax", "ymax"]]
    files = []
    for index, rows_of_image in enumerate((first, second)):
        relative = location(rows_of_image[0])
        (root / relative).parent.mkdir(parents=True, exist_ok=True)
        os.link(source / relative, root / relative)
        files.append(root / relative)
        for row in rows_of_image:
            box = [row[header.index(c)] for c in ("xmin", "ymin", "xmax", "ymax")] if index == 0 else [""] * 4
            table.append([relative, f"patient{index}", *box])
    write_rows(root / "manifest.csv", table)
    return root, files


# ------------------------------------------------------------------------------------------------ mutations
def _rewrite(path: Path, data: bytes) -> None:
    path.unlink()  # never write through a hard link into the shared dataset
    path.write_bytes(data)


def _pixel_offset(data: bytes) -> int:
    at = data.rfind(b"\xe0\x7f\x10\x00")
    return at if at > 0 else len(data)


def _mutate_tag(path: Path, tag: str, value) -> None:
    """Set ``tag``; a value its VR cannot hold (text in a DS or US element) goes in as raw bytes, as a damaged file
    would carry it."""
    from pydicom.datadict import dictionary_VR, tag_for_keyword
    from pydicom.dataelem import RawDataElement
    from pydicom.tag import Tag

    def raw() -> None:
        number = Tag(tag_for_keyword(tag))
        text = str(value).encode()
        text += b" " * (len(text) % 2)
        ds[number] = RawDataElement(number, dictionary_VR(number), len(text), text, 0, False, True)

    ds = pydicom.dcmread(path)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            setattr(ds, tag, value)
        except (ValueError, TypeError, OverflowError):
            raw()
        if tag == "SOPClassUID":
            ds.file_meta.MediaStorageSOPClassUID = value
        path.unlink()
        try:
            ds.save_as(path, enforce_file_format=True)
        except Exception:  # noqa: BLE001 - pydicom will not encode the value: write it raw
            raw()
            ds.save_as(path, enforce_file_format=True)


def _mutate_bytes(path: Path, seed: int, count: int) -> None:
    rng = random.Random(seed)
    data = bytearray(path.read_bytes())
    end = _pixel_offset(bytes(data))
    for _ in range(count):
        data[rng.randrange(132 + 12, end)] = rng.randrange(256)  # after the preamble and the meta group length
    _rewrite(path, bytes(data))


def _mutate_sequence(path: Path, seed: int, length: int) -> None:
    data = bytearray(path.read_bytes())
    end = _pixel_offset(bytes(data))
    found = [i for i in range(end) if data[i:i + 4] == b"SQ\x00\x00"]
    if not found:
        pytest.skip("no explicit-VR sequence in this header")
    at = random.Random(seed).choice(found)
    data[at + 4:at + 8] = struct.pack("<I", length)
    _rewrite(path, bytes(data))


def _mutate_pixels(path: Path, seed: int, count: int) -> None:
    rng = random.Random(seed)
    data = bytearray(path.read_bytes())
    start = _pixel_offset(bytes(data)) + 12
    for _ in range(count):
        data[rng.randrange(start, len(data))] = rng.randrange(256)
    _rewrite(path, bytes(data))


def _mutate_csv(root: Path, name: str, column: str, value: str, target: int) -> Path:
    path = root / name
    rows = read_rows(path)
    rows[1 + target % (len(rows) - 1)][rows[0].index(column)] = value
    write_rows(path, rows)
    return path


def _apply(mutation: Mutation, root: Path, files: list[Path]) -> str:
    """Apply ``mutation``; returns the name the error line must carry (the file changed)."""
    if mutation.kind == "csv":
        return _mutate_csv(root, *mutation.detail, mutation.target).name
    path = files[mutation.target]
    if mutation.kind == "tag":
        _mutate_tag(path, *mutation.detail)
    elif mutation.kind == "bytes":
        _mutate_bytes(path, *mutation.detail)
    elif mutation.kind == "sequence":
        _mutate_sequence(path, *mutation.detail)
    elif mutation.kind == "truncate":
        data = path.read_bytes()
        _rewrite(path, data[: int(len(data) * mutation.detail[0])])
    else:
        _mutate_pixels(path, *mutation.detail)
    return path.name


# ------------------------------------------------------------------------------------------------ the test
def _tree(folder: Path) -> set[str]:
    return {str(p.relative_to(folder)) for p in folder.rglob("*")} if folder.exists() else set()


@pytest.mark.parametrize("mutation", MUTATIONS, ids=[m.name for m in MUTATIONS])
def test_mutated_input_is_a_cache_or_one_line(mutation, tmp_path, tiny_synth, capfd, monkeypatch):
    monkeypatch.delenv("COMOTO_DEBUG", raising=False)
    make = _dbt_dataset if mutation.modality == "dbt" else _mammo_dataset
    root, files = make(tiny_synth, tmp_path / "data")
    changed = _apply(mutation, root, files)
    out = tmp_path / "out" / f"{mutation.modality}.h5"
    argv = ["preprocess", mutation.modality, str(root), "--out", str(out), *SMALL]
    if mutation.modality == "mammo":
        argv += ["--manifest-csv", str(root / "manifest.csv")]
    before = _tree(root)
    capfd.readouterr()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", RuntimeWarning)
        with pytest.raises(SystemExit) as info:
            main(argv)
    err = capfd.readouterr().err
    numpy_warnings = [str(w.message) for w in caught if issubclass(w.category, RuntimeWarning)]
    assert not numpy_warnings, numpy_warnings
    assert "Traceback" not in err
    assert _tree(root) == before  # inputs are read, never written
    if info.value.code == 0:
        assert out.is_file()
        return
    lines = err.strip().splitlines()
    assert info.value.code == 1, err
    assert len(lines) == 1, err
    line = lines[0]
    assert line.startswith("error: ") and changed in line, line
    assert "cannot write" not in line and "--debug" not in line, line  # blamed on the input, not on the output
    assert not out.exists()
    leftovers = [p for p in _tree(out.parent) if not p.startswith(f"{out.name}.parts")]
    assert not leftovers, leftovers


def test_the_mutations_are_seeded():
    assert _mutations() == MUTATIONS and len({m.name for m in MUTATIONS}) == len(MUTATIONS)
    assert {m.kind for m in MUTATIONS} == {"tag", "bytes", "sequence", "truncate", "pixels", "csv"}
