"""``comoto evaluate``: the DBTex metric for a submission CSV, or for a checkpoint on a cached split."""

from __future__ import annotations

from pathlib import Path

import typer

from comoto_cli.commands.common import CONFIG_OPTION_HELP, console, resolve_config
from comoto_cli.config import EvaluateConfig
from comoto_cli.errors import UsageError
from comoto_cli.utils.atomic import all_or_nothing


def _copy_atomic(source: Path, destination: Path) -> None:
    import shutil

    from comoto_cli.utils.atomic import atomic_path

    if destination.exists() and destination.resolve() == source.resolve():
        return
    with atomic_path(destination) as temporary:
        shutil.copyfile(source, temporary)


def evaluate(
    checkpoint: Path | None = typer.Option(None, "--checkpoint", help="Model checkpoint (best.pt) to run."),
    cache: Path | None = typer.Option(None, "--cache", help="HDF5 cache holding the split to evaluate on."),
    split: str | None = typer.Option(None, "--split", help="Cache split: train, val or test \\[default: test]."),
    predictions: Path | None = typer.Option(None, "--predictions", help="DBTex submission CSV to score."),
    boxes: Path | None = typer.Option(None, "--boxes", help="Ground-truth boxes CSV (BCS-DBT layout)."),
    labels: Path | None = typer.Option(None, "--labels", help="Volume labels CSV (BCS-DBT layout)."),
    froc: bool | None = typer.Option(None, "--froc/--no-froc", help="Write froc.png \\[default: --froc]."),
    report: bool | None = typer.Option(
        None, "--report/--no-report",
        help="Also write report.html: a card per lesion and the top false positives per view, pictures from "
        "--cache (DBT) \\[default: --no-report]."),
    report_false_positives: int | None = typer.Option(
        None, "--report-false-positives", help="False positives shown per view in report.html \\[default: 2]."),
    out: Path | None = typer.Option(None, "--out", help="Output folder: metrics.json, froc.png, predictions.csv."),
    bootstrap: int | None = typer.Option(
        None, "--bootstrap", help="Patient bootstrap resamples for the 95% interval, 0 = off \\[default: 1000]."
    ),
    seed: int | None = typer.Option(None, "--seed", help="Bootstrap seed \\[default: 0]."),
    volumes: str | None = typer.Option(
        None, "--volumes", help="Volumes counted for false positives: labels (the official DBTex definition) or "
        "boxes-table (as the reference implementation scores: one volume per box row, volumes without a lesion "
        "left out; not the official metric) \\[default: labels]."),
    batch_size: int | None = typer.Option(None, "--batch-size", help="Slices per inference batch (checkpoint)."),
    flip_tta: bool | None = typer.Option(
        None, "--flip-tta/--no-flip-tta", help="Horizontal-flip test-time augmentation (checkpoint, DBT) "
        "\\[default: off]."),
    config: Path | None = typer.Option(None, "--config", "-c", help=CONFIG_OPTION_HELP),
) -> None:
    """Score detections with the DBTex metric (official semantics, vectorised).

    Either [bold]--predictions P.csv --boxes B.csv --labels L.csv --out DIR[/], or
    [bold]--checkpoint best.pt --cache CACHE.h5 --out DIR[/] (runs volume inference on --split first).
    Writes DIR/metrics.json, DIR/froc.png and DIR/predictions.csv; with [bold]--report[/] also DIR/report.html
    (with --predictions, give --cache to show the lesions' slices).
    """
    settings = resolve_config(
        EvaluateConfig,
        config,
        checkpoint=checkpoint,
        cache=cache,
        split=split,
        predictions=predictions,
        boxes=boxes,
        labels=labels,
        froc=froc,
        report=report,
        report_false_positives=report_false_positives,
        out=out,
        bootstrap=bootstrap,
        seed=seed,
        volumes=volumes,
        inference__batch_size=batch_size,
        inference__flip_tta=flip_tta,
    )
    csv_inputs = {"--predictions": settings.predictions, "--boxes": settings.boxes, "--labels": settings.labels}
    model_inputs = {"--checkpoint": settings.checkpoint, "--cache": settings.cache}
    given_csv = [name for name, value in csv_inputs.items() if value is not None]
    given_model = [name for name, value in model_inputs.items() if value is not None]
    if settings.predictions is not None and settings.checkpoint is not None:
        raise UsageError("--predictions cannot be combined with --checkpoint: score a CSV or a model")
    if settings.predictions is not None and settings.cache is not None and not settings.report:
        raise UsageError("--predictions with --cache: the cache only supplies report.html's pictures; add --report "
                         "(or evaluate a model with --checkpoint and --cache)")
    if not given_csv and not given_model:
        raise UsageError("nothing to evaluate: give --predictions, --boxes and --labels, or --checkpoint and --cache")
    if settings.predictions is None and settings.checkpoint is None and given_csv:
        raise UsageError(f"{'/'.join(given_csv)} only apply with --predictions "
                         "(or evaluate a model with --checkpoint and --cache)")
    if settings.predictions is not None and (split is not None or batch_size is not None or flip_tta is not None):
        raise UsageError("--split, --batch-size and --flip-tta apply to --checkpoint evaluation, not to --predictions")
    settings.require("out", needed_by="evaluate")

    if settings.predictions is not None:
        missing = [name for name, value in csv_inputs.items() if value is None]
        if missing:
            raise UsageError(f"--predictions needs {' and '.join(missing)} too")
        with all_or_nothing(settings.out):
            _evaluate_csv(settings)
        return

    settings.require("checkpoint", "cache", needed_by="evaluate --checkpoint")
    from comoto_cli.evaluation.evaluate_checkpoint import evaluate_checkpoint

    with all_or_nothing(settings.out):
        evaluate_checkpoint(settings)


def _evaluate_csv(settings: EvaluateConfig) -> None:
    from comoto_cli.evaluation.html_report import check_report_cache, write_csv_report
    from comoto_cli.metrics.dbtex import counting_volumes, read_dbtex_csvs
    from comoto_cli.metrics.report import write_dbtex_report

    if settings.report and settings.cache is not None:  # a bad picture source fails before the scoring work
        check_report_cache(settings.cache)
    tables = counting_volumes(read_dbtex_csvs(settings.predictions, settings.boxes, settings.labels),
                              settings.volumes)
    out_dir = Path(settings.out)
    inputs = {name: str(getattr(settings, name)) for name in ("predictions", "boxes", "labels")}
    payload = write_dbtex_report(out_dir, tables, settings.bootstrap, settings.seed, froc=settings.froc,
                                 console=console, extra={"inputs": inputs, "volumes_counted": settings.volumes})
    _copy_atomic(Path(settings.predictions), out_dir / "predictions.csv")
    written = ["metrics.json", "froc.png", "predictions.csv"] if settings.froc else ["metrics.json", "predictions.csv"]
    if settings.report:
        if settings.cache is not None:
            inputs["cache"] = str(settings.cache)
        write_csv_report(out_dir, tables, payload, settings.cache, inputs, settings.report_false_positives)
        written.append("report.html")
    console.print(f"wrote {', '.join(str(out_dir / name) for name in written)}")
