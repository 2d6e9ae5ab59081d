"""The DBTex teams' inference staples, measured on a finished `comoto experiment` (e.g. `make reproduce`):

- horizontal-flip test-time augmentation: every student evaluated again with ``inference.flip_tta`` (kept in its
  run folder as ``evaluation-flip/``), compared with its plain evaluation, paired by seed and patient;
- ensembles: the seeds' plain predictions of each method and ratio fused (weighted box fusion,
  :func:`comoto_cli.inference.ensemble.fuse_predictions`), compared with each single seed on the same patients.

Every comparison is a paired difference in mean sensitivity with its paired patient-bootstrap 95 % interval
(:func:`comoto_cli.metrics.dbtex.paired_difference`). Writes OUT.json and OUT.md.

    python -m benchmarks.staples runs/experiment-synthetic/experiment.json --out benchmarks/reproduction/staples
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from comoto_cli.config import ExperimentConfig
from comoto_cli.data.tables import read_dbtex_predictions
from comoto_cli.evaluation.evaluate_checkpoint import evaluate_checkpoint
from comoto_cli.experiment import cache_paths, evaluation_config, ground_truth, method_label, run_folder
from comoto_cli.inference.ensemble import fuse_predictions
from comoto_cli.metrics.dbtex import DbtexTables, paired_difference


def _flip_predictions(config: ExperimentConfig, run: Path, dbt_cache: Path, seed: int) -> Path:
    out = run / "evaluation-flip"
    if not (out / "predictions.csv").exists():
        plain = evaluation_config(config, run, dbt_cache, seed)
        flipped = plain.model_copy(update={"out": out, "bootstrap": 0,
                                           "inference": plain.inference.model_copy(update={"flip_tta": True})})
        evaluate_checkpoint(flipped, progress=False)
    return out / "predictions.csv"


def _row(kind: str, method: str, ratio: float, result, seeds: int) -> dict:
    return {"staple": kind, "method": method, "label": method_label(method), "train_ratio": ratio, "seeds": seeds,
            "difference": result.mean, "ci95_low": result.low, "ci95_high": result.high,
            "half_width": result.half_width, "resolved": result.resolved, "per_seed": list(result.per_seed)}


def measure(config: ExperimentConfig, bootstrap: int) -> list[dict]:
    dbt_cache, _ = cache_paths(config)
    boxes, labels = ground_truth(config, dbt_cache)

    def tables(paths):
        return [DbtexTables(predictions=read_dbtex_predictions(p), boxes=boxes, labels=labels) for p in paths]

    rows = []
    for ratio in config.train_ratios:
        for method in config.methods:
            runs = [run_folder(config, method, ratio, seed) for seed in config.seeds]
            plain = tables([run / "evaluation" / "predictions.csv" for run in runs])
            flipped = tables([_flip_predictions(config, run, dbt_cache, seed) for run, seed in zip(runs, config.seeds)])
            rows.append(_row("flip TTA minus plain", method, ratio, paired_difference(flipped, plain, bootstrap, 0),
                             len(runs)))
            fused = fuse_predictions([t.predictions for t in plain], max_boxes=config.inference.max_boxes_per_volume)
            ensemble = [DbtexTables(predictions=fused, boxes=boxes, labels=labels)] * len(plain)
            rows.append(_row(f"{len(runs)}-seed ensemble (WBF) minus single seed", method, ratio,
                             paired_difference(ensemble, plain, bootstrap, 0), len(runs)))
    return rows


def markdown(rows: list[dict], config: ExperimentConfig, bootstrap: int, minutes: float) -> str:
    lines = [f"Inference staples on `{config.out}` ({config.split} split), {time.strftime('%Y-%m-%d')}, "
             f"{minutes:.0f} min: paired difference in mean sensitivity (mean over {len(config.seeds)} seeds) with a "
             f"95 % paired patient-bootstrap interval ({bootstrap} resamples). Resolved: the interval excludes 0.", "",
             *paired_table(rows, ("staple", "staple"), ("per seed", "per_seed"))]
    return "\n".join(lines) + "\n"


def paired_table(rows: list[dict], first: tuple[str, str], last: tuple[str, str]) -> list[str]:
    """Markdown lines of paired differences: ``first`` and ``last`` are (column title, row key) of the first column
    and of the list of single differences shown last."""
    lines = [f"| {first[0]} | train ratio | method | difference | 95 % CI (paired) | resolved | {last[0]} |",
             "|---|---|---|---|---|---|---|"]
    for row in rows:
        singles = " / ".join(f"{d:+.3f}" for d in row[last[1]])
        lines.append(f"| {row[first[1]]} | {row['train_ratio']:g} | {row['label']} | {row['difference']:+.3f} | "
                     f"{row['ci95_low']:+.3f} to {row['ci95_high']:+.3f} | {'yes' if row['resolved'] else 'no'} | "
                     f"{singles} |")
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("experiment", type=Path, help="the experiment.json a finished `comoto experiment` wrote")
    parser.add_argument("--out", type=Path, required=True, help="OUT.json and OUT.md are written")
    parser.add_argument("--bootstrap", type=int, default=1000)
    args = parser.parse_args()
    config = ExperimentConfig.model_validate(json.loads(args.experiment.read_text()))
    started = time.perf_counter()
    rows = measure(config, args.bootstrap)
    minutes = (time.perf_counter() - started) / 60
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.with_suffix(".json").write_text(json.dumps(rows, indent=1))
    args.out.with_suffix(".md").write_text(markdown(rows, config, args.bootstrap, minutes))
    print(args.out.with_suffix(".md").read_text())


if __name__ == "__main__":
    main()
