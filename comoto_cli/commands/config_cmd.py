"""``comoto config show|schema|write-schemas``: the effective config of a command and its JSON Schema."""

from __future__ import annotations

import json
from pathlib import Path

import typer

from comoto_cli.commands.common import CONFIG_OPTION_HELP, console
from comoto_cli.config import COMMAND_MODELS, json_schema, load_config
from comoto_cli.errors import UsageError

app = typer.Typer(help="Show configs and their JSON Schemas.", no_args_is_help=True)


def _model_for(command: str):
    try:
        return COMMAND_MODELS[command]
    except KeyError:
        raise UsageError(f"unknown command {command!r}; one of: {', '.join(COMMAND_MODELS)}") from None


@app.command("show")
def show(
    command: str = typer.Argument(..., help=f"One of: {', '.join(COMMAND_MODELS)}."),
    config: Path | None = typer.Option(None, "--config", "-c", help=CONFIG_OPTION_HELP),
) -> None:
    """Print the effective config of COMMAND (defaults, then --config) as JSON."""
    model = load_config(_model_for(command), config)
    console.print_json(model.model_dump_json())


@app.command("schema")
def schema(command: str = typer.Argument(..., help=f"One of: {', '.join(COMMAND_MODELS)}.")) -> None:
    """Print the JSON Schema of COMMAND's config."""
    console.print_json(json.dumps(json_schema(_model_for(command))))


def schema_files() -> dict[str, str]:
    """File name -> JSON text of every command's schema (``make schemas`` writes them; a test compares)."""
    return {f"{name}.schema.json": json.dumps(json_schema(model), indent=2, sort_keys=True) + "\n"
            for name, model in COMMAND_MODELS.items()}


@app.command("write-schemas")
def write_schemas(folder: Path = typer.Argument(Path("schemas"), help="Output folder.")) -> None:
    """Write every command's JSON Schema into FOLDER (what ``make schemas`` runs)."""
    from comoto_cli.utils.atomic import write_text_atomic

    for name, text in schema_files().items():
        write_text_atomic(folder / name, text)
        console.print(f"wrote {folder / name}")
