"""Placeholder until this subcommand lands (work in progress)."""

from comoto_cli.errors import UsageError


def evaluate() -> None:
    """Not implemented yet."""
    raise UsageError("'evaluate' is not implemented yet")
