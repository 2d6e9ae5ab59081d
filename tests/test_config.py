"""Config models: validation messages, precedence (defaults <- file <- flags), schemas kept in sync."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from comoto_cli.cli import main
from comoto_cli.commands.config_cmd import schema_files
from comoto_cli.config import (
    COMMAND_MODELS,
    DistillConfig,
    ExperimentConfig,
    PredictConfig,
    TeacherConfig,
    config_hash,
    load_config,
)
from comoto_cli.errors import UsageError

SCHEMA_DIR = Path(__file__).resolve().parents[1] / "schemas"


def test_schemas_folder_is_up_to_date():
    expected = schema_files()
    on_disk = {p.name: p.read_text() for p in SCHEMA_DIR.glob("*.schema.json")}
    stale = sorted(name for name in expected if on_disk.get(name) != expected[name])
    extra = sorted(set(on_disk) - set(expected))
    assert not stale and not extra, f"run `make schemas`: stale {stale}, extra {extra}"


def test_file_then_flags_override_defaults(tmp_path):
    config_file = tmp_path / "teacher.json"
    config_file.write_text(json.dumps({"epochs": 3, "optim": {"lr": 0.01, "name": "adamw"}}))
    config = load_config(TeacherConfig, config_file, {"optim.lr": 0.5, "epochs": None})
    assert config.epochs == 3  # from the file; the flag was not given
    assert config.optim.lr == 0.5  # the flag wins over the file
    assert config.optim.name == "adamw"
    assert config.optim.momentum == 0.9  # default kept inside a partially given section


@pytest.mark.parametrize(
    ("payload", "fragment"),
    [
        ({"optim": {"lr": -1}}, "optim.lr"),
        ({"epochs": "many"}, "epochs"),
        ({"epochs": 2, "learning_rate": 0.1}, "learning_rate: unknown key"),
        ({"model": {"backbone": "vgg16"}}, "model.backbone"),
        ({"model": {"returned_layers": [3, 1]}}, "model.returned_layers"),
    ],
)
def test_invalid_values_name_the_field(tmp_path, payload, fragment):
    config_file = tmp_path / "bad.json"
    config_file.write_text(json.dumps(payload))
    with pytest.raises(UsageError) as info:
        load_config(TeacherConfig, config_file)
    message = str(info.value)
    assert fragment in message and str(config_file) in message
    assert "\n" not in message


@pytest.mark.parametrize(
    ("model", "payload", "fragment"),
    [
        (DistillConfig, {"mode": "magic"}, "mode: Value error, unknown distillation mode 'magic'; registered: lesion, "
                                           "image, pretrain, none"),
        (ExperimentConfig, {"methods": ["none", "magic+impa"]}, "methods: Value error, unknown distillation mode 'magic'"),
        (ExperimentConfig, {"synth": None, "mammo_root": "m"}, "dbt_root: Value error, required when synth is null"),
        (TeacherConfig, {"model": {"backbone": "vgg16"}}, "model.backbone: Value error, unknown backbone 'vgg16'; "
                                                          "registered: resnet18, resnet34, resnet50, resnet101"),
        (PredictConfig, {"format": "xml"}, "format: Value error, unknown output format 'xml'; registered: csv, json"),
    ],
)
def test_names_checked_in_the_models(tmp_path, model, payload, fragment):
    config_file = tmp_path / "bad.json"
    config_file.write_text(json.dumps(payload))
    with pytest.raises(UsageError) as info:
        load_config(model, config_file)
    assert fragment in str(info.value)


def test_required_fields_name_key_flag_and_purpose():
    config = DistillConfig(cache="dbt.h5", mode="pretrain")
    config.require("cache")
    with pytest.raises(UsageError) as info:
        config.require("cache", "out")
    assert str(info.value) == "missing out (--out): run folder: checkpoints, metrics.jsonl, config.json"
    with pytest.raises(UsageError) as info:
        config.require("teacher_cache", needed_by="mode image")
    assert str(info.value).startswith("missing teacher_cache (--teacher-cache), needed by mode image: mammography")
    with pytest.raises(UsageError) as info:
        TeacherConfig(best_metric="accuracy").require_metric(("map", "mar"), "train-teacher")
    assert str(info.value) == ("best_metric: 'accuracy' is not a validation metric of train-teacher; one of: map, "
                               "mar")


def test_unreadable_config_files(tmp_path):
    broken = tmp_path / "broken.json"
    broken.write_text("{not json")
    with pytest.raises(UsageError, match="invalid JSON"):
        load_config(TeacherConfig, broken)
    listing = tmp_path / "list.json"
    listing.write_text("[1, 2]")
    with pytest.raises(UsageError, match="object"):
        load_config(TeacherConfig, listing)
    with pytest.raises(UsageError, match="not found"):
        load_config(TeacherConfig, tmp_path / "missing.json")


def test_hash_tracks_content():
    a = DistillConfig()
    b = DistillConfig(alpha=3.0)
    assert config_hash(a) == config_hash(DistillConfig()) != config_hash(b)


def test_config_show_and_schema_commands(capsys, tmp_path):
    config_file = tmp_path / "d.json"
    config_file.write_text(json.dumps({"mode": "image", "train_ratio": 0.1}))
    with pytest.raises(SystemExit) as exit_info:
        main(["config", "show", "distill", "--config", str(config_file)])
    assert exit_info.value.code == 0
    shown = json.loads(capsys.readouterr().out)
    assert shown["mode"] == "image" and shown["train_ratio"] == 0.1 and shown["alpha"] == 2.0
    for command in COMMAND_MODELS:
        with pytest.raises(SystemExit) as exit_info:
            main(["config", "schema", command])
        assert exit_info.value.code == 0
        assert json.loads(capsys.readouterr().out)["type"] == "object"


def test_config_errors_exit_2_with_one_line(capsys, tmp_path):
    config_file = tmp_path / "bad.json"
    config_file.write_text(json.dumps({"optim": {"lr": -0.1}}))
    with pytest.raises(SystemExit) as exit_info:
        main(["config", "show", "train-teacher", "--config", str(config_file)])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error:") and "optim.lr" in err and len(err.splitlines()) == 1
    assert "Traceback" not in err
    with pytest.raises(SystemExit) as exit_info:
        main(["config", "show", "no-such-command"])
    assert exit_info.value.code == 2
