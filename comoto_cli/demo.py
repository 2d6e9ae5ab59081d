"""`make demo`: the whole method on synthetic data, as a newcomer would type it.

synth -> preprocess dbt + mammo -> train-teacher (ImPA) -> distill (LsKD) -> evaluate --froc.
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
          "--split", "test", "--froc", "--out", str(root / "evaluation")])
    print(f"\nDemo finished in {(time.perf_counter() - started) / 60:.1f} min.")
    print(f"FROC curve: {root / 'evaluation' / 'froc.png'}; metrics: {root / 'evaluation' / 'metrics.json'}")


if __name__ == "__main__":
    main(*sys.argv[1:2])
