"""Placeholder until this subcommand lands (work in progress)."""

from comoto_cli.errors import UsageError


def predict() -> None:
    """Not implemented yet."""
    raise UsageError("'predict' is not implemented yet")
