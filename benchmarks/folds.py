"""k-fold training measured: the K fold models of each method, ratio and seed (one `comoto experiment` per fold,
``preprocess_dbt.split.folds`` K and ``fold`` k, the same test patients) fused by weighted box fusion
(:func:`comoto_cli.inference.ensemble.fuse_predictions`) and compared with each single fold model on the same test
patients, paired by patient (:func:`comoto_cli.metrics.dbtex.paired_difference`; the mean over seeds and folds of
ensemble minus fold model). Also each fold model minus fold 0's, which shows how much the choice of validation
patients alone moves a model. Writes OUT.json and OUT.md.

    comoto synth runs/folds-data --size demo --domain-gap realistic
    for k in 0 1 2; do comoto experiment configs/experiment-folds-$k.json; done
    python -m benchmarks.folds runs/experiment-folds-{0,1,2}/experiment.json --out benchmarks/reproduction/folds
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from benchmarks.staples import paired_table
from comoto_cli.config import ExperimentConfig
from comoto_cli.data.tables import read_dbtex_predictions
from comoto_cli.experiment import ground_truth, method_label, run_folder
from comoto_cli.inference.ensemble import fuse_predictions
from comoto_cli.metrics.dbtex import DbtexTables, paired_difference


def measure(folds: list[ExperimentConfig], bootstrap: int) -> list[dict]:
    boxes, labels = ground_truth(folds[0])
    for config in folds[1:]:
        other_boxes, other_labels = ground_truth(config)
        if sorted(other_labels["StudyUID"].tolist()) != sorted(labels["StudyUID"].tolist()):
            raise SystemExit(f"{config.out}: another test split than {folds[0].out}; the folds must share it")
    first = folds[0]
    rows = []
    for ratio in first.train_ratios:
        for method in first.methods:
            ensembles, singles, firsts = [], [], []
            for seed in first.seeds:
                runs = [DbtexTables(predictions=read_dbtex_predictions(
                    run_folder(config, method, ratio, seed) / "evaluation" / "predictions.csv"),
                    boxes=boxes, labels=labels) for config in folds]
                fused = fuse_predictions([run.predictions for run in runs],
                                         max_boxes=first.inference.max_boxes_per_volume)
                ensembles += [DbtexTables(predictions=fused, boxes=boxes, labels=labels)] * len(runs)
                singles += runs
                firsts += [runs[0]] * len(runs)
            for kind, a, b in ((f"{len(folds)}-fold ensemble (WBF) minus one fold model", ensembles, singles),
                               ("fold model minus fold 0's", singles, firsts)):
                result = paired_difference(a, b, bootstrap, 0)
                rows.append({"comparison": kind, "method": method, "label": method_label(method),
                             "train_ratio": ratio, "pairs": len(a), "difference": result.mean,
                             "ci95_low": result.low, "ci95_high": result.high, "half_width": result.half_width,
                             "resolved": result.resolved, "per_pair": list(result.per_seed)})
    return rows


def markdown(rows: list[dict], folds: list[ExperimentConfig], bootstrap: int, minutes: float) -> str:
    lines = [f"k-fold training on `{folds[0].out}` ... ({len(folds)} folds, {len(folds[0].seeds)} seeds, "
             f"{folds[0].split} split), {time.strftime('%Y-%m-%d')}, {minutes:.0f} min: paired difference in mean "
             f"sensitivity (mean over seeds x folds) with a 95 % paired patient-bootstrap interval ({bootstrap} "
             "resamples). Resolved: the interval excludes 0. Per pair: seed by seed, fold by fold.", "",
             *paired_table(rows, ("comparison", "comparison"), ("per pair", "per_pair"))]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("experiments", type=Path, nargs="+", help="experiment.json of each fold's finished run")
    parser.add_argument("--out", type=Path, required=True, help="OUT.json and OUT.md are written")
    parser.add_argument("--bootstrap", type=int, default=1000)
    args = parser.parse_args()
    folds = [ExperimentConfig.model_validate(json.loads(path.read_text())) for path in args.experiments]
    started = time.perf_counter()
    rows = measure(folds, args.bootstrap)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.with_suffix(".json").write_text(json.dumps(rows, indent=1))
    args.out.with_suffix(".md").write_text(markdown(rows, folds, args.bootstrap, (time.perf_counter() - started) / 60))
    print(args.out.with_suffix(".md").read_text())


if __name__ == "__main__":
    main()
