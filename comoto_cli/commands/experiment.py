"""Placeholder until this subcommand lands (work in progress)."""

from comoto_cli.errors import UsageError


def experiment() -> None:
    """Not implemented yet."""
    raise UsageError("'experiment' is not implemented yet")
