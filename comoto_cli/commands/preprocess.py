"""``comoto preprocess dbt|mammo ROOT --out FILE.h5``: DICOM + CSV -> the HDF5 slice cache."""

from __future__ import annotations

from pathlib import Path

import typer

from comoto_cli.commands.common import CONFIG_OPTION_HELP, console, resolve_config

app = typer.Typer(help="DICOM + CSV -> HDF5 slice cache (resized, split by patient).", no_args_is_help=True)

_ROOT_HELP = "Data root (the folder the CSV paths are relative to)."
_OUT_HELP = "Cache file to write (HDF5). Written to a temporary file and renamed when complete."
_SHARD_HELP = ("Process only part K of N of the volumes (1 <= K <= N), e.g. ${SLURM_ARRAY_TASK_ID}/N in an array "
               "job; the split is made over all patients in every part. Join the N files with `comoto cache merge`.")


def _check_shard(value: str | None) -> str | None:
    """Option callback: a wrong K/N is a one-line usage error before any work."""
    if value is None:
        return None
    from comoto_cli.cache.shards import parse_shard
    from comoto_cli.errors import UsageError

    try:
        parse_shard(value)
    except UsageError as exc:
        raise typer.BadParameter(f"expected K/N with 1 <= K <= N (for example 2/8), got {value!r}") from exc
    return value


def _run(modality: str, root: Path, out: Path, config_file: Path | None, progress: bool, shard: str | None = None,
         **flags) -> None:
    from comoto_cli.cache.shards import parse_shard
    from comoto_cli.config import PreprocessConfig
    from comoto_cli.preprocess.pipeline import preprocess
    from comoto_cli.preprocess.summary import cache_summary

    config = resolve_config(PreprocessConfig, config_file, modality=modality, **flags)
    report = preprocess(root, out, config, shard=None if shard is None else parse_shard(shard), progress=progress)
    part = "" if report.get("shard") is None else f" (shard {report['shard']})"
    if report["up_to_date"]:
        console.print(f"{out}{part}: up to date (same config and inputs); nothing to do")
        return
    summary = cache_summary(out)
    unit = "volumes" if modality == "dbt" else "images"
    splits = ", ".join(f"{name} {s['volumes']} {unit} / {s['slices']} slices" for name, s in summary["splits"].items())
    console.print(f"wrote {out}{part} ({summary['file_size_bytes'] / 2**20:.1f} MiB, {config.image_height}x"
                  f"{config.image_width}): {splits or f'no {unit} in this shard'}; {report['computed']} decoded, "
                  f"{report['reused']} reused from an earlier run, {report['seconds']:.1f} s")
    if report.get("boxes_cut"):
        console.print(f"[yellow]note:[/] {report['boxes_cut']} lesion box(es) reach outside the breast region that "
                      f"geometry {config.geometry!r} kept; they are cut to it in the cache (the official boxes used "
                      "for evaluation are unchanged)")
    if report.get("shard") is not None:
        console.print(f"when all {report['shard'].split('/')[1]} shards are done: comoto cache merge OUT.h5 "
                      "SHARD.h5...")
    if report["skipped"]:
        from rich.table import Table

        table = Table(title=f"skipped ({len(report['skipped'])}, kept in the cache attribute skipped_json)")
        for column in ("path", "row", "reason"):
            table.add_column(column, overflow="fold")
        for entry in report["skipped"]:
            table.add_row(str(entry["path"]), "" if entry.get("row") is None else str(entry["row"]),
                          str(entry["reason"]))
        console.print(table)


_FOLD_HELP = ("k-fold cross-validation: fold I of K (1-based) is the val split, the others train; the test split "
              "is the same for every fold of one --split-seed. Replaces --val-fraction.")


def _check_fold(value: str | None) -> str | None:
    if value is None:
        return None
    parts = value.split("/")
    if len(parts) != 2 or not all(p.strip().isdigit() for p in parts) or not 1 <= int(parts[0]) <= int(parts[1]) \
            or int(parts[1]) < 2:
        raise typer.BadParameter(f"{value!r}: give I/K with 1 <= I <= K and K >= 2, e.g. 2/5")
    return value


def _fold_fields(fold: str | None) -> dict:
    if fold is None:
        return {}
    index, count = (int(p) for p in fold.split("/"))
    return {"split__folds": count, "split__fold": index - 1}


_WORKERS_HELP = "Worker processes (0 = as many as the cores and the free memory allow)."
_CSV_HELP = ("BCS-DBT {what} CSV (default: found in ROOT by its columns). Repeat it with SPLIT=CSV, SPLIT one of "
             "train, validation, test, to keep the dataset's own split, e.g. --{what}-csv train=F1 "
             "--{what}-csv validation=F2; a lone plain CSV has no split of its own.")
_ACCEPT_HELP = ("Read Secondary Capture / generic X-ray images with this Modality (e.g. RG: digitised film) as "
                "mammograms: you vouch that they are. Repeatable. Default: only Modality MG.")
_DATASET_HELP = ("Dataset adapter reading ROOT, by name (comoto_cli.data.adapters): bcs-dbt for dbt; vindr, manifest, "
                 "jsonl, cbis-ddsm, omidb, inbreast for mammo. Default: bcs-dbt for dbt; for mammo manifest with --manifest-csv, "
                 "else vindr.")
_GEOMETRY_HELP = ("How an image fills the cache frame: stretch (default: the whole image, each axis its own scale) or "
                  "breast-crop (the breast's bounding box, one scale for both axes, zero padding).")
_INPUT_HELP = ("An input file of the dataset adapter, e.g. manifest=images.jsonl for --dataset jsonl. Repeatable.")
_DECODER_HELP = ("JPEG 2000 decoder: auto (pylibjpeg-openjpeg: most frames per core), pylibjpeg, gdcm or pillow. "
                 "Speed only: every decoder gives the same pixels.")


@app.command("dbt")
def dbt(
    root: Path = typer.Argument(..., help=_ROOT_HELP),
    out: Path = typer.Option(..., "--out", "-o", help=_OUT_HELP),
    config: Path | None = typer.Option(None, "--config", "-c", help=CONFIG_OPTION_HELP),
    image_height: int | None = typer.Option(None, "--image-height", help="Cache image height (pixels)."),
    image_width: int | None = typer.Option(None, "--image-width", help="Cache image width (pixels)."),
    geometry: str | None = typer.Option(None, "--geometry", metavar="NAME", help=_GEOMETRY_HELP),
    val_fraction: float | None = typer.Option(None, "--val-fraction", help="Fraction of patients for validation."),
    test_fraction: float | None = typer.Option(None, "--test-fraction", help="Fraction of patients for test."),
    split_seed: int | None = typer.Option(None, "--split-seed", help="Seed of the patient split."),
    fold: str | None = typer.Option(None, "--fold", metavar="I/K", callback=_check_fold, help=_FOLD_HELP),
    lesion_slice_offset: int | None = typer.Option(
        None, "--lesion-slice-offset", help="Training slices: lesion centre +- this many neighbours."),
    normal_slices: int | None = typer.Option(
        None, "--normal-slices", help="Training slices drawn from each normal training volume."),
    context_slices: int | None = typer.Option(
        None, "--context-slices", help="Training volumes also store this many neighbours each side of every "
        "training slice, for 2.5-D students (model.input_slices)."),
    workers: int | None = typer.Option(None, "--workers", "-j", help=_WORKERS_HELP),
    decoder: str | None = typer.Option(None, "--decoder", help=_DECODER_HELP),
    on_error: str | None = typer.Option(None, "--on-error", help="fail (default) or skip bad inputs."),
    file_paths_csv: list[str] | None = typer.Option(
        None, "--file-paths-csv", metavar="[SPLIT=]CSV", help=_CSV_HELP.format(what="file-paths")),
    labels_csv: list[str] | None = typer.Option(
        None, "--labels-csv", metavar="[SPLIT=]CSV", help=_CSV_HELP.format(what="labels")),
    boxes_csv: list[str] | None = typer.Option(
        None, "--boxes-csv", metavar="[SPLIT=]CSV", help=_CSV_HELP.format(what="boxes")),
    dataset: str | None = typer.Option(None, "--dataset", metavar="NAME", help=_DATASET_HELP),
    inputs: list[str] | None = typer.Option(None, "--input", metavar="NAME=PATH", help=_INPUT_HELP),
    shard: str | None = typer.Option(None, "--shard", metavar="K/N", help=_SHARD_HELP, callback=_check_shard),
    no_progress: bool = typer.Option(False, "--no-progress", help="No progress bar."),
) -> None:
    """DBT volumes (BCS-DBT layout) -> slice cache: lesion slices for training, every slice for val/test."""
    _run("dbt", root, out, config, not no_progress, shard, image_height=image_height, image_width=image_width,
         geometry=geometry,
         split__val_fraction=val_fraction, split__test_fraction=test_fraction, split__seed=split_seed,
         **_fold_fields(fold), lesion_slice_offset=lesion_slice_offset, normal_slices_per_volume=normal_slices,
         context_slices=context_slices, workers=workers, decoder=decoder,
         on_error=on_error, file_paths_csv=file_paths_csv or None, labels_csv=labels_csv or None,
         boxes_csv=boxes_csv or None, dataset=dataset, inputs=inputs or None)


@app.command("mammo")
def mammo(
    root: Path = typer.Argument(..., help=_ROOT_HELP),
    out: Path = typer.Option(..., "--out", "-o", help=_OUT_HELP),
    config: Path | None = typer.Option(None, "--config", "-c", help=CONFIG_OPTION_HELP),
    image_height: int | None = typer.Option(None, "--image-height", help="Cache image height (pixels)."),
    image_width: int | None = typer.Option(None, "--image-width", help="Cache image width (pixels)."),
    geometry: str | None = typer.Option(None, "--geometry", metavar="NAME", help=_GEOMETRY_HELP),
    val_fraction: float | None = typer.Option(None, "--val-fraction", help="Fraction of patients for validation."),
    test_fraction: float | None = typer.Option(
        None, "--test-fraction", help="Fraction of patients for test (unused when the dataset has a test split)."),
    split_seed: int | None = typer.Option(None, "--split-seed", help="Seed of the patient split."),
    fold: str | None = typer.Option(None, "--fold", metavar="I/K", callback=_check_fold, help=_FOLD_HELP),
    workers: int | None = typer.Option(None, "--workers", "-j", help=_WORKERS_HELP),
    decoder: str | None = typer.Option(None, "--decoder", help=_DECODER_HELP),
    on_error: str | None = typer.Option(None, "--on-error", help="fail (default) or skip bad inputs."),
    annotations_csv: Path | None = typer.Option(
        None, "--annotations-csv", help="VinDr-Mammo finding_annotations.csv."),
    manifest_csv: Path | None = typer.Option(
        None, "--manifest-csv", help="Generic manifest: path, patient_id, xmin, ymin, xmax, ymax."),
    accept_modality: list[str] | None = typer.Option(
        None, "--accept-modality", metavar="MODALITY", help=_ACCEPT_HELP),
    dataset: str | None = typer.Option(None, "--dataset", metavar="NAME", help=_DATASET_HELP),
    inputs: list[str] | None = typer.Option(None, "--input", metavar="NAME=PATH", help=_INPUT_HELP),
    shard: str | None = typer.Option(None, "--shard", metavar="K/N", help=_SHARD_HELP, callback=_check_shard),
    no_progress: bool = typer.Option(False, "--no-progress", help="No progress bar."),
) -> None:
    """Mammograms (VinDr-Mammo layout or a generic manifest) -> slice cache: every image, with its boxes."""
    _run("mammo", root, out, config, not no_progress, shard, image_height=image_height, image_width=image_width,
         geometry=geometry,
         split__val_fraction=val_fraction, split__test_fraction=test_fraction, split__seed=split_seed,
         **_fold_fields(fold), workers=workers, decoder=decoder, on_error=on_error, annotations_csv=annotations_csv,
         manifest_csv=manifest_csv,
         accept_modality=accept_modality or None, dataset=dataset, inputs=inputs or None)
