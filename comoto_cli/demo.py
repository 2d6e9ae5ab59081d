"""`make demo`: the whole method on synthetic data, as a newcomer would type it.

synth -> preprocess dbt + mammo -> train-teacher (ImPA) -> distill (LsKD) -> evaluate --froc --report.
Each step is the real `comoto` command (printed before it runs); a finished step is not redone when its output
exists, so an interrupted demo resumes where it stopped.
"""

from __future__ import annotations

import json
import shlex
import subprocess
import sys
import time
from pathlib import Path

CONFIGS = Path(__file__).resolve().parents[1] / "configs"


def _run(arguments: list[str]) -> None:
    command = [sys.executable, "-m", "comoto_cli", *arguments]
    print(f"\n$ comoto {shlex.join(arguments)}", flush=True)
    started = time.perf_counter()
    completed = subprocess.run(command)
    if completed.returncode != 0:
        print(f"demo step failed (exit {completed.returncode}): comoto {shlex.join(arguments)}", file=sys.stderr)
        sys.exit(completed.returncode)
    print(f"  ({time.perf_counter() - started:.0f} s)", flush=True)


def _finished(run: Path) -> bool:
    """A training run is done when metrics.jsonl has a line for every configured epoch (best.pt alone exists from
    epoch 1 on, so it says nothing about completion)."""
    try:
        epochs = json.loads((run / "config.json").read_text())["epochs"]
        return len((run / "metrics.jsonl").read_text().splitlines()) >= epochs
    except (OSError, ValueError, KeyError):
        return False


# What every CPU type the demo has run on gave, with a margin (README, `make demo`): float trajectories differ
# between CPUs, so the printed verdict asks for these, not for one machine's digits.
TEACHER_AT_LEAST, STUDENT_AT_LEAST = 0.3, 0.6


def verdict(teacher_run: Path, student_metrics: Path) -> str:
    """One paragraph: how far the teacher's validation sensitivity rose, how the student scored on the test split,
    and whether both reach what every machine so far has reached."""
    history = [json.loads(line) for line in (teacher_run / "metrics.jsonl").read_text().splitlines()]
    teacher = [line["val"]["mean_sensitivity"] for line in history if line.get("val")]
    metrics = json.loads(student_metrics.read_text())
    student, counts = metrics["mean_sensitivity_positive"], metrics["counts"]
    low, high = metrics.get("mean_sensitivity_positive_ci95") or (float("nan"), float("nan"))
    held = max(teacher) >= TEACHER_AT_LEAST and max(teacher) > teacher[0] and student >= STUDENT_AT_LEAST
    return (f"Teacher (mammography, ImPA): validation mean sensitivity {teacher[0]:.3f} after epoch 1, best "
            f"{max(teacher):.3f}. Student (DBT, LsKD): test mean sensitivity {student:.3f} (95 % CI {low:.2f}-"
            f"{high:.2f}), {counts['lesions_found']} of {counts['boxes']} test lesions among its detections.\n"
            + ("As expected: " if held else "BELOW what every machine so far has given: ")
            + f"teacher best >= {TEACHER_AT_LEAST} and rising, student >= {STUDENT_AT_LEAST}. The exact numbers "
              "differ between CPU types (see the README).")


def main(folder: str = "demo_data") -> None:
    root = Path(folder)
    data, runs = root / "synthetic", root / "runs"
    started = time.perf_counter()
    if not (data / "dbt").is_dir():
        _run(["synth", str(data), "--size", "demo", "--seed", "0"])
    if not (root / "dbt.h5").exists():
        _run(["preprocess", "dbt", str(data / "dbt"), "--out", str(root / "dbt.h5"),
              "--config", str(CONFIGS / "demo-preprocess-dbt.json")])
    if not (root / "mammo.h5").exists():
        _run(["preprocess", "mammo", str(data / "mammo"), "--out", str(root / "mammo.h5"),
              "--config", str(CONFIGS / "demo-preprocess-mammo.json")])
    if not _finished(runs / "teacher"):
        resume = ["--resume"] if (runs / "teacher" / "last.pt").exists() else []
        _run(["train-teacher", "--cache", str(root / "mammo.h5"), "--out", str(runs / "teacher"), "--impa",
              "--config", str(CONFIGS / "demo-teacher.json"), *resume])
    if not _finished(runs / "student"):
        resume = ["--resume"] if (runs / "student" / "last.pt").exists() else []
        _run(["distill", "--cache", str(root / "dbt.h5"), "--teacher", str(runs / "teacher" / "best.pt"),
              "--teacher-cache", str(root / "mammo.h5"), "--out", str(runs / "student"), "--mode", "lesion",
              "--config", str(CONFIGS / "demo-student.json"), *resume])
    _run(["evaluate", "--checkpoint", str(runs / "student" / "best.pt"), "--cache", str(root / "dbt.h5"),
          "--split", "test", "--froc", "--report", "--out", str(root / "evaluation")])
    print(f"\nDemo finished in {(time.perf_counter() - started) / 60:.1f} min.")
    print(verdict(runs / "teacher", root / "evaluation" / "metrics.json"))
    print(f"FROC curve: {root / 'evaluation' / 'froc.png'}; metrics: {root / 'evaluation' / 'metrics.json'}; "
          f"every lesion and the top false positives: {root / 'evaluation' / 'report.html'}")


if __name__ == "__main__":
    main(*sys.argv[1:2])
