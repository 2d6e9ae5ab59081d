"""The ``comoto`` command: thin Typer wrappers that parse, validate and call library functions.

Every command module under ``comoto_cli.commands`` imports its heavy dependencies (torch, monai, h5py) inside
the command body, so ``comoto --help`` stays fast. Errors derived from :class:`ComotoError` print one line and
exit with their code (2 for usage/config errors); other exceptions too, unless ``--debug`` asks for the trace.
"""

from __future__ import annotations

import os
import sys

import typer
from rich.console import Console
from rich.markup import escape

from comoto_cli import __version__
from comoto_cli.commands import (
    cache_cmd,
    config_cmd,
    distill,
    evaluate,
    experiment,
    export,
    fuse,
    predict,
    preprocess,
    synth,
    train_teacher,
)
from comoto_cli.errors import ComotoError

app = typer.Typer(
    name="comoto",
    help="CoMoTo: breast-lesion detection in DBT, distilled from unpaired mammography (Alberb et al., 2024).",
    no_args_is_help=True,
    rich_markup_mode="rich",
    pretty_exceptions_enable=False,
    context_settings={"help_option_names": ["-h", "--help"]},
)

error_console = Console(stderr=True, highlight=False, soft_wrap=True)


def _version(value: bool) -> None:
    if value:
        typer.echo(f"comoto {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    debug: bool = typer.Option(False, "--debug", help="Show full tracebacks on errors.", envvar="COMOTO_DEBUG"),
    version: bool = typer.Option(False, "--version", callback=_version, is_eager=True, help="Print the version."),
) -> None:
    if debug:
        os.environ["COMOTO_DEBUG"] = "1"


app.command("synth")(synth.synth)
app.add_typer(preprocess.app, name="preprocess")
app.command("train-teacher")(train_teacher.train_teacher)
app.command("distill")(distill.distill)
app.command("evaluate")(evaluate.evaluate)
app.command("predict")(predict.predict)
app.command("experiment")(experiment.experiment)
app.command("export")(export.export)
app.command("fuse")(fuse.fuse)
app.add_typer(config_cmd.app, name="config")
app.add_typer(cache_cmd.app, name="cache")


def _debug() -> bool:
    return os.environ.get("COMOTO_DEBUG", "") not in ("", "0") or "--debug" in sys.argv[1:]


def main(argv: list[str] | None = None) -> None:
    """Console entry point: run the app and turn errors into one clear line and an exit code."""
    if not _debug():
        import warnings

        # pydicom warns once per malformed tag; the reader's one-line error already names the file and row.
        warnings.filterwarnings("ignore", category=UserWarning, module="pydicom")
    try:
        app(args=argv, standalone_mode=False, prog_name="comoto")
    except ComotoError as exc:
        if _debug():
            raise
        error_console.print(f"[bold red]error:[/] {escape(str(exc))}", markup=True, highlight=False)
        sys.exit(exc.exit_code)
    except typer.Exit as exc:
        sys.exit(exc.exit_code)
    except typer.Abort:
        error_console.print("[bold red]aborted[/]")
        sys.exit(130)
    except KeyboardInterrupt:
        error_console.print("[bold red]interrupted[/]")
        sys.exit(130)
    except Exception as exc:  # click-style usage errors (typer bundles its own click) and unexpected failures
        if callable(getattr(exc, "format_message", None)) and isinstance(getattr(exc, "exit_code", None), int):
            if type(exc).__name__ == "NoArgsIsHelpError":  # bare `comoto` / `comoto preprocess`: the help is the answer
                exc.show()
                sys.exit(exc.exit_code)
            # One line like every other error, instead of click's Usage/Try/Error block.
            context = getattr(exc, "ctx", None)
            where = getattr(context, "command_path", None) or "comoto"
            error_console.print(f"[bold red]error:[/] {escape(exc.format_message())} (see `{escape(where)} --help`)",
                                markup=True, highlight=False)
            sys.exit(exc.exit_code)
        if _debug():
            raise
        error_console.print(f"[bold red]error:[/] {type(exc).__name__}: {exc} (run with --debug for the traceback)")
        sys.exit(1)
    sys.exit(0)
