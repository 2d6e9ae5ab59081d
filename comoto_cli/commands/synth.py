"""Placeholder until this subcommand lands (work in progress)."""

from comoto_cli.errors import UsageError


def synth() -> None:
    """Not implemented yet."""
    raise UsageError("'synth' is not implemented yet")
