"""``comoto cache info CACHE``: what a slice cache holds; ``comoto cache merge OUT SHARD...``: join shards."""

from __future__ import annotations

import json
from pathlib import Path

import typer

from comoto_cli.commands.common import console

app = typer.Typer(help="Inspect slice caches made by `comoto preprocess`.", no_args_is_help=True)


@app.command("info")
def info(
    cache: Path = typer.Argument(..., help="HDF5 cache made by `comoto preprocess`."),
    as_json: bool = typer.Option(False, "--json", help="Print the summary as JSON."),
) -> None:
    """Modality, format, config hash, image size, and per split: volumes, patients, slices, lesions, boxes."""
    from comoto_cli.preprocess.summary import cache_summary

    summary = cache_summary(cache)
    if as_json:
        typer.echo(json.dumps(summary, indent=2))
        return
    from rich.table import Table

    unit = "volumes" if summary["modality"] == "dbt" else "images"
    console.print(f"[bold]{summary['path']}[/]: {summary['modality']} cache, format {summary['format_version']}, "
                  f"config {summary['config_hash']}, images {summary['image_height']}x{summary['image_width']} "
                  f"({summary['geometry']}), "
                  f"{summary['file_size_bytes'] / 2**20:.1f} MiB, {summary['skipped']} skipped input(s)")
    table = Table()
    columns = [(unit, "volumes"), ("patients", "patients"), ("slices", "slices"),
               ("with boxes", "slices_with_boxes"), ("boxes", "boxes"), ("lesions", "lesions"),
               (f"{unit} with lesions", "volumes_with_lesions")]
    if summary["total"]["context_slices"]:  # caches made for 2.5-D input (preprocess.context_slices)
        columns.insert(3, ("of them context", "context_slices"))
    table.add_column("split")
    for title, _ in columns:
        table.add_column(title, justify="right")
    for name, counts in [*summary["splits"].items(), ("total", summary["total"])]:
        table.add_row(name, *(str(counts[key]) for _, key in columns))
    console.print(table)


@app.command("merge")
def merge(
    out: Path = typer.Argument(..., help="Cache file to write (HDF5; written to a temporary file, then renamed)."),
    shards: list[Path] = typer.Argument(..., help="All N shard files of one `comoto preprocess ... --shard K/N` run."),
    no_progress: bool = typer.Option(False, "--no-progress", help="No progress bar."),
) -> None:
    """Join the shards of `comoto preprocess dbt|mammo ... --shard K/N` (each K once) into one cache, the same
    content as a single run (image chunks copied as stored, not recompressed)."""
    from comoto_cli.preprocess.merge import merge_caches
    from comoto_cli.preprocess.summary import cache_summary

    report = merge_caches(out, shards, progress=not no_progress)
    summary = cache_summary(out)
    unit = "volumes" if summary["modality"] == "dbt" else "images"
    splits = ", ".join(f"{name} {s['volumes']} {unit} / {s['slices']} slices" for name, s in summary["splits"].items())
    console.print(f"wrote {out} ({summary['file_size_bytes'] / 2**20:.1f} MiB) from {report['shards']} shards: "
                  f"{splits}; {summary['skipped']} skipped input(s), {report['seconds']:.1f} s")
    if not report["fingerprint"]:
        console.print("note: the shards' input fingerprints differ (inputs touched between the runs?); the merged "
                      "cache has none, so `comoto preprocess` into it would not report \"up to date\"")
