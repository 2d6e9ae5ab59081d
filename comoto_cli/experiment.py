"""`comoto experiment`: the paper's comparison table on one dataset, resumable run by run.

A method is a registered distillation mode (:mod:`comoto_cli.engine.modes`; by default DBT only ``none``,
mammography pretraining ``pretrain``, image-level KD ``image`` and LsKD ``lesion``, with a teacher trained without
ImPA) or ``MODE+impa``, the mode with a teacher trained with ImPA (``lesion+impa``: LsKD + ImPA, CoMoTo), each at
every train ratio and seed. One teacher per ImPA setting is shared by every run that needs it. Every run's config
is checked before the first one trains. Each student is scored on the held-out split with the DBTex metric; the
table reports, per method and ratio, the mean over seeds of ``mean_sensitivity_positive`` with a 95 % t-interval
over seeds, and the mean of the per-run patient-bootstrap intervals. Outputs: ``results.csv``, ``results.md``,
``results.png`` and ``runs.jsonl`` (one line per run).

Marginal intervals of two methods overlap even when one is better on nearly every patient and seed, because most
of their width is the test set's patients, which both share. So each method is also compared with each of
``paired_baselines`` (DBT only, pretraining): the mean over seeds of the seed-paired difference, and a paired
patient-bootstrap interval (:func:`comoto_cli.metrics.dbtex.paired_difference`: every resample scores both
methods' runs on the same patients). A difference is *resolved* when its interval excludes 0. Outputs:
``paired.csv``, ``paired.png`` and a table in ``results.md``.
"""

from __future__ import annotations

import json
import math
import time
from pathlib import Path

import numpy as np

from comoto_cli.cache.h5cache import SliceCache
from comoto_cli.config import DistillConfig, EvaluateConfig, ExperimentConfig, TeacherConfig
from comoto_cli.data.tables import read_dbtex_predictions
from comoto_cli.engine.diagnostics import describe_choice, resolve_distill_feature
from comoto_cli.engine.distill import check_distill_config, run_distill
from comoto_cli.engine.modes import DistillMode, get_mode
from comoto_cli.engine.teacher import check_teacher_config, run_train_teacher
from comoto_cli.errors import UsageError
from comoto_cli.evaluation.evaluate_checkpoint import dbtex_ground_truth, evaluate_checkpoint
from comoto_cli.metrics.dbtex import DbtexTables, paired_difference
from comoto_cli.networks.backbone import AUTO_FEATURE
from comoto_cli.preprocess.pipeline import preprocess
from comoto_cli.synth import generate_dataset
from comoto_cli.utils.atomic import atomic_path, ensure_writable_dir, write_json_atomic, write_text_atomic
from comoto_cli.utils.csvio import write_csv_atomic

# Two-sided 95 % Student-t quantiles for n - 1 degrees of freedom (n seeds), to avoid a scipy dependency.
_T95 = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 6: 2.447, 7: 2.365, 8: 2.306, 9: 2.262, 10: 2.228}

# The paper's own method, named so in the table.
COMOTO_METHOD = "lesion" + ExperimentConfig.IMPA_SUFFIX


def method_variant(method: str) -> str | None:
    """The variant a method names after ``:`` (ExperimentConfig.variants), or None."""
    return method.partition(ExperimentConfig.VARIANT_SEPARATOR)[2] or None


def method_mode(method: str) -> tuple[DistillMode, bool]:
    """The distillation mode of ``method`` and whether its teacher is trained with ImPA."""
    base = method.partition(ExperimentConfig.VARIANT_SEPARATOR)[0]
    impa = base.endswith(ExperimentConfig.IMPA_SUFFIX)
    mode = get_mode(base.removesuffix(ExperimentConfig.IMPA_SUFFIX))
    if impa and not mode.needs_teacher:
        raise UsageError(f"methods: {method!r}: mode {mode.name} uses no teacher, so none trained with ImPA")
    return mode, impa


def method_label(method: str) -> str:
    """The method's name in the table and the plot: the mode's label, "+ ImPA" for an ImPA teacher, the variant in
    brackets."""
    mode, impa = method_mode(method)
    label = f"{mode.label} + ImPA" if impa else mode.label
    label = f"{label} (CoMoTo)" if method == COMOTO_METHOD else label
    variant = method_variant(method)
    return f"{label} [{variant}]" if variant else label


def same_teacher_baseline(config: ExperimentConfig, method: str) -> str | None:
    """The method that ``method`` is paired with under ``same_teacher_baseline``: that mode from the same teacher,
    for a method that distils or has a variant; None when there is none among the methods."""
    if config.same_teacher_baseline is None:
        return None
    mode, impa = method_mode(method)
    if not mode.needs_teacher or not (mode.needs_teacher_cache or method_variant(method)):
        return None
    baseline = config.same_teacher_baseline + (ExperimentConfig.IMPA_SUFFIX if impa else "")
    return baseline if baseline in config.methods and baseline != method else None


def seed_interval(values: list[float]) -> tuple[float, float, float]:
    """Mean and 95 % t-interval over seeds, clipped to [0, 1] (sensitivities); one seed gives the mean alone."""
    data = np.asarray(values, dtype=np.float64)
    mean = float(data.mean())
    if len(data) < 2:
        return mean, mean, mean
    half = seed_half_width(data)
    return mean, max(0.0, mean - half), min(1.0, mean + half)


def _say(console, text: str) -> None:
    (console.print if console is not None else print)(text)


def cache_paths(config: ExperimentConfig) -> tuple[Path, Path]:
    return config.out / "dbt.h5", config.out / "mammo.h5"


def _prepare_data(config: ExperimentConfig, console) -> tuple[Path, Path]:

    out = config.out
    if config.synth is not None:
        data = out / "data"
        if not (data / "dbt").is_dir():

            _say(console, f"experiment: synthetic dataset ({config.synth.size}, seed {config.synth.seed}) -> {data}")
            generate_dataset(data, config.synth)
        dbt_root, mammo_root = data / "dbt", data / "mammo"
    else:  # the config requires both roots when synth is null
        dbt_root, mammo_root = config.dbt_root, config.mammo_root
    dbt_cache, mammo_cache = cache_paths(config)
    preprocess(dbt_root, dbt_cache, config.preprocess_dbt.model_copy(update={"modality": "dbt"}), console=console)
    preprocess(mammo_root, mammo_cache, config.preprocess_mammo.model_copy(update={"modality": "mammo"}),
               console=console)
    return dbt_cache, mammo_cache


def with_resolved_maps(config: ExperimentConfig, dbt_cache: Path, mammo_cache: Path, console) -> ExperimentConfig:
    """``config`` with ``distill_feature: auto`` of the teacher and the student replaced by one map, chosen once from
    the training lesions of both caches (the student distils on its teacher's map); the choice in
    ``distill_map.json``."""
    teacher, student = config.teacher.model, config.student.model
    if teacher.distill_feature == AUTO_FEATURE:
        caches = [SliceCache(dbt_cache), SliceCache(mammo_cache)]
        try:
            teacher, choice = resolve_distill_feature(teacher, [(c, c.slices_in_split("train")) for c in caches])
        finally:
            for cache in caches:
                cache.close()
        _say(console, f"experiment: {describe_choice(choice)}, over the training lesions of both caches")
        write_json_atomic(config.out / "distill_map.json", choice)
    if student.distill_feature == AUTO_FEATURE:  # a student distils on its teacher's map
        student = student.model_copy(update={"distill_feature": teacher.distill_feature})
    elif "distill_feature" in student.model_fields_set and student.distill_feature != teacher.distill_feature:
        raise UsageError(f"student.model.distill_feature {student.distill_feature!r} is not the teachers' map "
                         f"{teacher.distill_feature!r}; set one map for both, or auto for both")
    return config.model_copy(update={"teacher": config.teacher.model_copy(update={"model": teacher}),
                                     "student": config.student.model_copy(update={"model": student})})


def _teacher_run(config: ExperimentConfig, impa: bool) -> Path:
    return config.out / "teachers" / ("impa" if impa else "plain")


def _teacher_config(config: ExperimentConfig, mammo_cache: Path, impa: bool) -> TeacherConfig:
    return TeacherConfig.model_validate({**config.teacher.model_dump(mode="json"), "cache": str(mammo_cache),
                                         "out": str(_teacher_run(config, impa)), "impa": impa})


def _train_teacher(config: ExperimentConfig, mammo_cache: Path, impa: bool, console) -> Path:

    run = _teacher_run(config, impa)
    if (run / "best.pt").exists() and not (run / "last.pt").exists():
        return run / "best.pt"
    history = run / "metrics.jsonl"
    if history.exists() and len(history.read_text().splitlines()) >= config.teacher.epochs:
        return run / "best.pt"
    teacher = _teacher_config(config, mammo_cache, impa)
    _say(console, f"experiment: teacher {'with' if impa else 'without'} ImPA -> {run}")
    run_train_teacher(teacher, resume=(run / "last.pt").exists())
    return run / "best.pt"


def _run_name(method: str, ratio: float, seed: int) -> str:
    return f"{method.replace('+', '-').replace(ExperimentConfig.VARIANT_SEPARATOR, '_')}_r{ratio:g}_s{seed}"


def run_folder(config: ExperimentConfig, method: str, ratio: float, seed: int) -> Path:
    return config.out / "students" / _run_name(method, ratio, seed)


def _student_config(config: ExperimentConfig, method: str, ratio: float, seed: int, dbt_cache: Path,
                    mammo_cache: Path) -> DistillConfig:
    mode, impa = method_mode(method)
    student = config.student.model_dump(mode="json")
    if mode.init == "teacher" and "distill_feature" not in config.student.model.model_fields_set:
        del student["model"]["distill_feature"]  # left unset, a student distils on its teacher's map
    payload = {**student, "cache": str(dbt_cache),
               "out": str(run_folder(config, method, ratio, seed)), "mode": mode.name,
               "train_ratio": ratio, "seed": seed, "val_inference": config.inference.model_dump(mode="json"),
               **config.variants.get(method_variant(method) or "", {})}
    if mode.needs_teacher:
        payload["teacher"] = str(_teacher_run(config, impa) / "best.pt")
        payload["teacher_cache"] = str(mammo_cache)
    return DistillConfig.model_validate(payload)


def _check_runs(config: ExperimentConfig, dbt_cache: Path, mammo_cache: Path) -> list[bool]:
    """Every run's config as the commands check it, so a bad one stops the experiment before anything trains.
    Returns the ImPA settings of the teachers the methods need, without ImPA first."""
    impa_settings = set()
    for method in config.methods:
        mode, impa = method_mode(method)
        if mode.needs_teacher:
            impa_settings.add(impa)
        for ratio in config.train_ratios:
            for seed in config.seeds:
                check_distill_config(_student_config(config, method, ratio, seed, dbt_cache, mammo_cache))
    for impa in impa_settings:
        check_teacher_config(_teacher_config(config, mammo_cache, impa))
    return sorted(impa_settings)


def _student(config: ExperimentConfig, method: str, ratio: float, seed: int, dbt_cache: Path, mammo_cache: Path,
             console) -> dict:

    student = _student_config(config, method, ratio, seed, dbt_cache, mammo_cache)
    run = student.out
    evaluation = run / "evaluation" / "metrics.json"
    if evaluation.exists():
        return json.loads(evaluation.read_text())
    finished = (run / "metrics.jsonl").exists() and \
        len((run / "metrics.jsonl").read_text().splitlines()) >= student.epochs
    if not finished:
        _say(console, f"experiment: {method_label(method)}, train ratio {ratio:g}, seed {seed} -> {run}")
        run_distill(student, resume=(run / "last.pt").exists(), console=console)
    return evaluate_checkpoint(evaluation_config(config, run, dbt_cache, seed), progress=False)


def evaluation_config(config: ExperimentConfig, run: Path, dbt_cache: Path, seed: int) -> EvaluateConfig:
    """How a finished student is scored: ``config.inference`` (edge slices, volume NMS) with the students'
    validation batch size."""
    return EvaluateConfig(checkpoint=run / "best.pt", cache=dbt_cache, split=config.split, out=run / "evaluation",
                          bootstrap=config.bootstrap, seed=seed,
                          inference=config.inference.model_copy(update={"batch_size": config.student.val_batch_size}))


def summarise(records: list[dict], config: ExperimentConfig) -> list[dict]:
    """One row per (method, ratio): seeds, mean sensitivity and intervals."""
    rows = []
    for ratio in config.train_ratios:
        for method in config.methods:
            chosen = [r for r in records if r["method"] == method and r["train_ratio"] == ratio]
            if not chosen:
                continue
            values = [r["mean_sensitivity_positive"] for r in chosen]
            mean, low, high = seed_interval(values)
            boot = [r.get("mean_sensitivity_positive_ci95") for r in chosen if r.get("mean_sensitivity_positive_ci95")]
            rows.append({
                "method": method, "label": method_label(method), "train_ratio": ratio, "seeds": len(chosen),
                "mean_sensitivity_positive": mean, "seed_ci95_low": low, "seed_ci95_high": high,
                "bootstrap_ci95_low": float(np.mean([b[0] for b in boot])) if boot else None,
                "bootstrap_ci95_high": float(np.mean([b[1] for b in boot])) if boot else None,
                "sensitivity_at_2_fps_all": float(np.mean([r["sensitivity_at_2_fps_all"] for r in chosen])),
            })
    return rows


def _markdown(rows: list[dict], config: ExperimentConfig, seconds: float) -> str:
    lines = [
        f"Mean sensitivity at 1-4 FP per volume (DBTex `mean_sensitivity_positive`) on the {config.split} split; "
        f"mean over {len(config.seeds)} seed(s) with a 95 % t-interval over seeds, and the mean per-run patient "
        f"bootstrap interval. {time.strftime('%Y-%m-%d')}; this invocation took {seconds / 60:.0f} min "
        "(finished runs are reused).",
        "",
        "| method | train ratio | seeds | mean sensitivity | 95 % CI (seeds) | 95 % CI (bootstrap) | sens. @2 FP (all) |",
        "|---|---|---|---|---|---|---|",
    ]
    for row in rows:
        boot = ("n/a" if row["bootstrap_ci95_low"] is None
                else f"{row['bootstrap_ci95_low']:.3f}-{row['bootstrap_ci95_high']:.3f}")
        lines.append(f"| {row['label']} | {row['train_ratio']:g} | {row['seeds']} | "
                     f"{row['mean_sensitivity_positive']:.3f} | {row['seed_ci95_low']:.3f}-{row['seed_ci95_high']:.3f}"
                     f" | {boot} | {row['sensitivity_at_2_fps_all']:.3f} |")
    return "\n".join(lines) + "\n"


def _plot(path: Path, rows: list[dict], records: list[dict], config: ExperimentConfig) -> None:
    """Bars: mean over seeds with its 95 % interval; dots: the single seeds (with 3 seeds the spread says more
    than the interval)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt


    figure, axis = plt.subplots(figsize=(8, 5))
    width = 0.8 / max(len(config.methods), 1)
    for index, method in enumerate(config.methods):
        chosen = [r for r in rows if r["method"] == method]
        offset = (index - (len(config.methods) - 1) / 2) * width
        x = np.array([config.train_ratios.index(r["train_ratio"]) for r in chosen]) + offset
        mean = np.array([r["mean_sensitivity_positive"] for r in chosen])
        error = np.array([[m - r["seed_ci95_low"] for m, r in zip(mean, chosen)],
                          [r["seed_ci95_high"] - m for m, r in zip(mean, chosen)]])
        axis.bar(x, mean, width, yerr=np.clip(error, 0, None), capsize=3, label=method_label(method))
        runs = [r for r in records if r["method"] == method]
        axis.scatter([config.train_ratios.index(r["train_ratio"]) + offset for r in runs],
                     [r["mean_sensitivity_positive"] for r in runs], s=10, color="black", zorder=3,
                     label="single seed" if index == 0 else None)
    axis.set_xticks(range(len(config.train_ratios)), [f"train ratio {r:g}" for r in config.train_ratios])
    axis.set_ylabel("mean sensitivity (1-4 FP / volume)")
    axis.set_ylim(0, 1)
    axis.legend(fontsize=8, loc="upper center", bbox_to_anchor=(0.5, -0.1), ncol=3, frameon=False)
    axis.set_title("CoMoTo vs baselines (DBTex metric, 95 % CI over seeds)")
    figure.tight_layout()
    with atomic_path(path) as temporary:
        figure.savefig(temporary, format="png", dpi=120)
    plt.close(figure)


# ---------------------------------------------------------------------------------------------- paired comparison
def _run_tables(config: ExperimentConfig, method: str, ratio: float, seeds: list[int],
                truth: tuple[dict, dict]) -> list[DbtexTables]:
    boxes, labels = truth
    runs = [run_folder(config, method, ratio, seed) / "evaluation" / "predictions.csv" for seed in seeds]
    return [DbtexTables(predictions=read_dbtex_predictions(path), boxes=boxes, labels=labels) for path in runs]


def ground_truth(config: ExperimentConfig, dbt_cache: Path | None = None) -> tuple[dict, dict]:
    """The scorer's boxes and labels tables of the experiment's evaluation split, from its DBT cache."""
    cache = SliceCache(dbt_cache or cache_paths(config)[0])
    try:
        return dbtex_ground_truth(cache, config.split)
    finally:
        cache.close()


def paired_comparisons(config: ExperimentConfig, dbt_cache: Path) -> list[dict]:
    """Each method minus each paired baseline, per train ratio, from the runs' saved predictions."""
    truth = ground_truth(config, dbt_cache)
    patients = len(np.unique(truth[1]["PatientID"].astype(str)))
    rows = []
    for ratio in config.train_ratios:
        tables = {m: _run_tables(config, m, ratio, config.seeds, truth) for m in config.methods}
        for method, baseline in comparisons(config):
            result = paired_difference(tables[method], tables[baseline], config.paired_bootstrap, seed=0)
            rows.append({"train_ratio": ratio, "method": method, "label": method_label(method),
                         "baseline": baseline, "baseline_label": method_label(baseline), "seeds": len(config.seeds),
                         "difference": result.mean, "ci95_low": result.low, "ci95_high": result.high,
                         "half_width": result.half_width, "resolved": result.resolved,
                         "two_level_low": result.two_level_low, "two_level_high": result.two_level_high,
                         "two_level_half_width": result.two_level_half_width,
                         "two_level_resolved": result.two_level_resolved,
                         "per_seed": " / ".join(f"{d:+.3f}" for d in result.per_seed),
                         "seed_half_width": seed_half_width(result.per_seed),
                         "combined_half_width": combined_half_width(result.half_width,
                                                                    seed_half_width(result.per_seed)),
                         "test_patients": patients,
                         "patients_for_goal": patients_for_half_width(result.half_width, patients,
                                                                      config.power_goal),
                         "resamples": result.resamples})
    return rows


def comparisons(config: ExperimentConfig) -> list[tuple[str, str]]:
    """(method, baseline) pairs: each method against each of ``paired_baselines`` (a baseline against an earlier
    one only), then each against its same-teacher baseline; each pair once."""
    baselines = [b for b in config.paired_baselines if b in config.methods]
    pairs = [(method, baseline) for baseline in baselines for method in config.methods
             if method not in (baseline, *baselines[:baselines.index(baseline)])]
    pairs += [(method, same_teacher_baseline(config, method)) for method in config.methods
              if same_teacher_baseline(config, method) is not None]
    return list(dict.fromkeys(pairs))


def last_diagnostics(run: Path) -> dict | None:
    """The ``distill_diagnostics`` of a student run's last epoch line (None for a run from before them)."""
    lines = (run / "metrics.jsonl").read_text().splitlines() if (run / "metrics.jsonl").exists() else []
    return json.loads(lines[-1]).get("distill_diagnostics") if lines else None


DIAGNOSTIC_COLUMNS = {"cells_per_axis_median": "lesion cells per axis (DBT)",
                      "teacher_cells_per_axis_median": "lesion cells per axis (mammography)",
                      "teacher_entropy_ratio": "teacher target entropy / flat", "kd_to_detection": "KD / detection",
                      "lesion_step_share": "steps with lesion points", "student_drift": "student drift"}


def _diagnostics_markdown(records: list[dict], config: ExperimentConfig) -> str:
    """What distillation saw in each method's runs (docs/design.md, "What distillation sees"): the mean over seeds
    of the last epoch's diagnostics."""
    if not any(r.get("distill_diagnostics") for r in records):
        return ""
    lines = ["", "What distillation saw (last epoch, mean over seeds; `distill_diagnostics` in each run's "
             "metrics.jsonl):", "",
             "| train ratio | method | map | " + " | ".join(DIAGNOSTIC_COLUMNS.values()) + " |",
             "|---|---|---|" + "---|" * len(DIAGNOSTIC_COLUMNS)]
    for ratio in config.train_ratios:
        for method in config.methods:
            reports = [r["distill_diagnostics"] for r in records
                       if r["method"] == method and r["train_ratio"] == ratio and r.get("distill_diagnostics")]
            if not reports:
                continue
            cells = []
            for key in DIAGNOSTIC_COLUMNS:
                values = [r[key] for r in reports if r.get(key) is not None]
                cells.append(f"{np.mean(values):.3g}" if values else "-")
            shape = reports[0]["map_shape"]
            lines.append(f"| {ratio:g} | {method_label(method)} | {reports[0]['map']} {shape[0]}x{shape[1]} "
                         f"(stride {reports[0]['stride']}) | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def seed_half_width(values) -> float:
    """Half-width of the 95 % t-interval over seeds of the per-seed differences: the training-randomness spread the
    patient bootstrap (the seeds averaged) does not show; nan with one seed."""
    data = np.asarray(values, dtype=np.float64)
    if len(data) < 2:
        return float("nan")
    return _T95.get(len(data) - 1, 1.96) * float(data.std(ddof=1)) / math.sqrt(len(data))


def combined_half_width(patient_half_width: float, seed_t_half_width: float) -> float:
    """The two sources added in quadrature, the seeds' part a t-interval: with few seeds a bootstrap over them
    cannot reach past their range (about 0.6 of the t half-width with 5 seeds), this does; the patient half-width
    alone with one seed."""
    if not math.isfinite(seed_t_half_width):
        return patient_half_width
    return math.hypot(patient_half_width, seed_t_half_width)


def patients_for_half_width(half_width: float, patients: int, goal: float) -> int | None:
    """Test patients at which a paired patient-bootstrap half-width measured on ``patients`` would shrink to
    ``goal``, as a standard error does, with 1/sqrt(patients); None when it was not measured."""
    if not math.isfinite(half_width) or patients <= 0:
        return None
    return max(1, math.ceil(patients * (half_width / goal) ** 2))


def _paired_markdown(rows: list[dict], config: ExperimentConfig) -> str:
    if not rows:
        return ""
    lines = [
        "", f"Paired differences in mean sensitivity ({config.split} split): method minus baseline, the mean over "
        f"{len(config.seeds)} seed(s) of the seed-paired difference, with a 95 % paired patient-bootstrap interval "
        f"({config.paired_bootstrap} resamples, each scoring both methods on the same patients). Resolved: the "
        f"interval excludes 0. Power: the test has {rows[0]['test_patients']} patients; 'patients for "
        f"+-{config.power_goal:g}' scales the half-width as 1/sqrt(patients) (a projection, same seeds); 'seed "
        "half-width' is the 95 % t-interval of the per-seed differences, the training randomness the bootstrap does "
        "not hold. 'Seeds x patients' is the two-level bootstrap: each resample draws the seeds and the test patients "
        "with replacement, so its interval holds both sources of variation; it is the headline interval. With few "
        "seeds a bootstrap over them cannot reach past their range, so 'combined' adds the patient half-width and "
        "the seed t half-width in quadrature: the conservative reading.", "",
        f"| train ratio | method | minus | difference | 95 % CI (seeds x patients) | half-width | resolved | "
        f"95 % CI (patients) | per seed | seed half-width | combined half-width | patients for "
        f"+-{config.power_goal:g} |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for row in rows:
        needed = row.get("patients_for_goal")
        lines.append(f"| {row['train_ratio']:g} | {row['label']} | {row['baseline_label']} | {row['difference']:+.3f} | "
                     f"{row['two_level_low']:+.3f} to {row['two_level_high']:+.3f} | "
                     f"{row['two_level_half_width']:.3f} | {'yes' if row['two_level_resolved'] else 'no'} | "
                     f"{row['ci95_low']:+.3f} to {row['ci95_high']:+.3f} | {row['per_seed']} | "
                     f"{row['seed_half_width']:.3f} | {row['combined_half_width']:.3f} | "
                     f"{'-' if needed is None else needed} |")
    return "\n".join(lines) + "\n"


def _plot_paired(path: Path, rows: list[dict], config: ExperimentConfig) -> None:
    """One panel per baseline: each method's difference with its paired interval, one colour per train ratio."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    baselines = list(dict.fromkeys(row["baseline"] for row in rows))
    figure, axes = plt.subplots(1, max(len(baselines), 1), figsize=(6 * max(len(baselines), 1), 4.5), squeeze=False)
    for axis, baseline in zip(axes[0], baselines):
        chosen = [row for row in rows if row["baseline"] == baseline]
        methods = list(dict.fromkeys(row["method"] for row in chosen))
        for index, ratio in enumerate(config.train_ratios):
            mine = [row for row in chosen if row["train_ratio"] == ratio]
            y = np.array([methods.index(row["method"]) for row in mine]) + (index - (len(config.train_ratios) - 1) / 2) * 0.25
            x = np.array([row["difference"] for row in mine])
            error = np.array([[row["difference"] - row["two_level_low"] for row in mine],
                              [row["two_level_high"] - row["difference"] for row in mine]])
            axis.errorbar(x, y, xerr=np.clip(error, 0, None), fmt="o", capsize=3, label=f"train ratio {ratio:g}")
        axis.axvline(0, color="black", linewidth=0.8)
        axis.set_yticks(range(len(methods)), [method_label(m) for m in methods], fontsize=8)
        axis.set_xlabel("difference in mean sensitivity (95 % CI over seeds x patients)")
        axis.set_title(f"minus {method_label(baseline)}", fontsize=10)
        axis.grid(True, axis="x", alpha=0.3)
        axis.legend(fontsize=8)
    figure.tight_layout()
    with atomic_path(path) as temporary:
        figure.savefig(temporary, format="png", dpi=120)
    plt.close(figure)


def run_experiment(config: ExperimentConfig, console=None) -> list[dict]:
    """Run (or finish) every run of the experiment and write the results table; returns its rows."""

    started = time.perf_counter()
    teachers = _check_runs(config, *cache_paths(config))
    ensure_writable_dir(config.out)
    write_json_atomic(config.out / "experiment.json", config.model_dump(mode="json"))
    dbt_cache, mammo_cache = _prepare_data(config, console)
    config = with_resolved_maps(config, dbt_cache, mammo_cache, console)
    for impa in teachers:
        _train_teacher(config, mammo_cache, impa=impa, console=console)
    records = []
    for ratio in config.train_ratios:
        for seed in config.seeds:
            for method in config.methods:
                metrics = _student(config, method, ratio, seed, dbt_cache, mammo_cache, console)
                records.append({"method": method, "train_ratio": ratio, "seed": seed, **metrics,
                                "distill_diagnostics": last_diagnostics(run_folder(config, method, ratio, seed))})
    write_text_atomic(config.out / "runs.jsonl", "".join(json.dumps(r, default=str) + "\n" for r in records))
    rows = summarise(records, config)
    columns = list(rows[0]) if rows else []
    write_csv_atomic(config.out / "results.csv", columns, [[row[c] for c in columns] for row in rows])
    paired = paired_comparisons(config, dbt_cache) if config.paired_bootstrap > 0 else []
    if paired:
        columns = list(paired[0])
        write_csv_atomic(config.out / "paired.csv", columns, [[row[c] for c in columns] for row in paired])
        _plot_paired(config.out / "paired.png", paired, config)
    write_text_atomic(config.out / "results.md",
                      _markdown(rows, config, time.perf_counter() - started) + _paired_markdown(paired, config)
                      + _diagnostics_markdown(records, config))
    _plot(config.out / "results.png", rows, records, config)
    _say(console, (config.out / "results.md").read_text())
    _say(console, f"results: {config.out / 'results.md'}, {config.out / 'results.csv'}, {config.out / 'results.png'}")
    return rows
