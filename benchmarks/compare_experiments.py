"""Two finished `comoto experiment` runs on the same data, compared method by method: for every method, train ratio
and seed both ran, experiment A's run minus experiment B's, paired by seed and by test patient
(:func:`comoto_cli.metrics.dbtex.paired_difference`). For a setting that changes how every run is made, e.g. the
reference model preset against ours. Both must score the same test split of the same data (checked). Writes OUT.json
and OUT.md.

    python -m benchmarks.compare_experiments runs/experiment-reference-preset/experiment.json \\
        runs/experiment-synthetic/experiment.json --label-a "reference preset" --label-b ours --out OUT
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from comoto_cli.config import ExperimentConfig
from comoto_cli.data.tables import read_dbtex_predictions
from comoto_cli.experiment import ground_truth, method_label, run_folder
from comoto_cli.metrics.dbtex import DbtexTables, paired_difference


def compare(a: ExperimentConfig, b: ExperimentConfig, bootstrap: int) -> list[dict]:
    boxes, labels = ground_truth(a)
    other_boxes, other_labels = ground_truth(b)
    if sorted(labels["StudyUID"].tolist()) != sorted(other_labels["StudyUID"].tolist()) or \
            sorted(boxes["StudyUID"].tolist()) != sorted(other_boxes["StudyUID"].tolist()):
        raise SystemExit("the two experiments do not score the same test volumes and lesions")
    rows = []
    for ratio in [r for r in a.train_ratios if r in b.train_ratios]:
        for method in [m for m in a.methods if m in b.methods]:
            seeds = [s for s in a.seeds if s in b.seeds]

            def tables(config, seeds=seeds, method=method, ratio=ratio):
                return [DbtexTables(predictions=read_dbtex_predictions(
                    run_folder(config, method, ratio, seed) / "evaluation" / "predictions.csv"),
                    boxes=boxes, labels=labels) for seed in seeds]

            result = paired_difference(tables(a), tables(b), bootstrap, 0)
            rows.append({"method": method, "label": method_label(method), "train_ratio": ratio, "seeds": len(seeds),
                         "difference": result.mean, "ci95_low": result.low, "ci95_high": result.high,
                         "half_width": result.half_width, "resolved": result.resolved,
                         "per_seed": list(result.per_seed)})
    return rows


def markdown(rows: list[dict], label_a: str, label_b: str, bootstrap: int) -> str:
    lines = [f"{label_a} minus {label_b}: mean sensitivity, paired by seed and test patient ({bootstrap} resamples), "
             f"{time.strftime('%Y-%m-%d')}. Resolved: the 95 % interval excludes 0.", "",
             "| train ratio | method | difference | 95 % CI (paired) | resolved | per seed |", "|---|---|---|---|---|---|"]
    for row in rows:
        seeds = " / ".join(f"{d:+.3f}" for d in row["per_seed"])
        lines.append(f"| {row['train_ratio']:g} | {row['label']} | {row['difference']:+.3f} | {row['ci95_low']:+.3f} "
                     f"to {row['ci95_high']:+.3f} | {'yes' if row['resolved'] else 'no'} | {seeds} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("a", type=Path, help="experiment.json of experiment A")
    parser.add_argument("b", type=Path, help="experiment.json of experiment B")
    parser.add_argument("--label-a", default="A")
    parser.add_argument("--label-b", default="B")
    parser.add_argument("--out", type=Path, required=True, help="OUT.json and OUT.md are written")
    parser.add_argument("--bootstrap", type=int, default=1000)
    args = parser.parse_args()
    configs = [ExperimentConfig.model_validate(json.loads(path.read_text())) for path in (args.a, args.b)]
    rows = compare(*configs, args.bootstrap)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.with_suffix(".json").write_text(json.dumps(rows, indent=1))
    args.out.with_suffix(".md").write_text(markdown(rows, args.label_a, args.label_b, args.bootstrap))
    print(args.out.with_suffix(".md").read_text())


if __name__ == "__main__":
    main()
