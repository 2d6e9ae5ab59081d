"""The demo's closing verdict: read from the runs it made, and worded as a check with a margin, not digits."""

from __future__ import annotations

import json

from comoto_cli.demo import STUDENT_AT_LEAST, TEACHER_AT_LEAST, verdict


def _runs(tmp_path, teacher: list[float], student: float):
    run = tmp_path / "teacher"
    run.mkdir(parents=True)
    lines = [{"epoch": i + 1, "val": {"mean_sensitivity": value}} for i, value in enumerate(teacher)]
    (run / "metrics.jsonl").write_text("".join(json.dumps(line) + "\n" for line in lines))
    metrics = tmp_path / "metrics.json"
    # The layout `comoto evaluate` writes (metrics.report.write_dbtex_report).
    metrics.write_text(json.dumps({"mean_sensitivity_positive": student, "mean_sensitivity_positive_ci95": [0.7, 1.0],
                                   "counts": {"lesions_found": 13, "boxes": 14}}))
    return run, metrics


def test_verdict_reports_the_runs_and_holds_above_the_margin(tmp_path):
    text = verdict(*_runs(tmp_path, [0.05, 0.4, 0.62], 0.857))
    assert "0.050 after epoch 1" in text and "best 0.620" in text and "test mean sensitivity 0.857" in text
    assert "13 of 14 test lesions" in text and text.splitlines()[-1].startswith("As expected")


def test_verdict_says_when_a_run_falls_below_every_machine_so_far(tmp_path):
    weak_student = verdict(*_runs(tmp_path / "a", [0.05, 0.5], STUDENT_AT_LEAST - 0.01))
    weak_teacher = verdict(*_runs(tmp_path / "b", [0.05, TEACHER_AT_LEAST - 0.01], 0.9))
    for text in (weak_student, weak_teacher):
        assert text.splitlines()[-1].startswith("BELOW")
