"""Placeholder until this subcommand lands (work in progress)."""

from comoto_cli.errors import UsageError


def distill() -> None:
    """Not implemented yet."""
    raise UsageError("'distill' is not implemented yet")
