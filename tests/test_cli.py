"""The `comoto` entry point: usage errors exit 2 with click's message, library errors print one line, unexpected
failures print one line unless --debug, and `--help` / `--version` work for every command."""

from __future__ import annotations

import subprocess
import sys

import pytest

from comoto_cli import __version__
from comoto_cli.cli import app, main

COMMANDS = ["synth", "preprocess dbt", "preprocess mammo", "train-teacher", "distill", "evaluate", "predict",
            "experiment", "export", "fuse", "config show", "cache info"]


def _exit_code(arguments: list[str]) -> int:
    with pytest.raises(SystemExit) as info:
        main(arguments)
    return info.value.code


@pytest.mark.parametrize("command", COMMANDS)
def test_every_command_has_help(command, capsys):
    assert _exit_code([*command.split(), "--help"]) == 0
    assert "Usage" in capsys.readouterr().out


def test_version(capsys):
    assert _exit_code(["--version"]) == 0
    assert __version__ in capsys.readouterr().out


def test_usage_errors_exit_2_with_one_line(capsys):
    assert _exit_code(["preprocess", "dbt"]) == 2
    err = capsys.readouterr().err
    assert err.strip().splitlines() == ["error: Missing argument 'root'. (see `comoto preprocess dbt --help`)"]
    assert _exit_code(["no-such-command"]) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and "No such command" in err
    assert _exit_code(["synth", "out", "--seed", "abc"]) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and "'--seed'" in err


def test_bare_group_still_prints_its_help(capsys):
    assert _exit_code(["preprocess"]) == 2
    captured = capsys.readouterr()
    assert "Usage" in captured.out + captured.err and "error:" not in captured.err


def test_library_error_is_one_line_and_debug_shows_the_trace(tmp_path):
    missing = tmp_path / "missing.h5"
    command = [sys.executable, "-m", "comoto_cli", "cache", "info", str(missing)]
    plain = subprocess.run(command, capture_output=True, text=True)
    assert plain.returncode == 1
    assert plain.stderr.strip().count("\n") == 0 and str(missing) in plain.stderr
    assert "Traceback" not in plain.stderr
    debug = subprocess.run([sys.executable, "-m", "comoto_cli", "--debug", *command[3:]], capture_output=True,
                           text=True)
    assert debug.returncode != 0 and "Traceback" in debug.stderr


def test_unexpected_exception_is_one_line(monkeypatch, capsys):
    def explode(*args, **kwargs):
        raise RuntimeError("boom")

    monkeypatch.setattr("comoto_cli.commands.config_cmd.load_config", explode)
    monkeypatch.delenv("COMOTO_DEBUG", raising=False)
    assert _exit_code(["config", "show", "synth"]) == 1
    err = capsys.readouterr().err.strip()
    assert err == "error: RuntimeError: boom (run with --debug for the traceback)"
    assert app.info.name == "comoto"


@pytest.mark.parametrize("arguments, expected", [
    (["predict", "x.dcm", "--out", "p.csv"], "missing checkpoint (--checkpoint), needed by predict: detector checkpoint"),
    (["predict", "x.dcm", "--checkpoint", "best.pt"], "missing out (--out), needed by predict: output file"),
    (["evaluate", "--checkpoint", "best.pt", "--out", "e"], "missing cache (--cache), needed by evaluate --checkpoint"),
])
def test_a_missing_required_input_is_named_once_with_its_flag(arguments, expected, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as info:
        main(arguments)
    err = capsys.readouterr().err.strip()
    assert info.value.code == 2 and len(err.splitlines()) == 1 and expected in err, err
