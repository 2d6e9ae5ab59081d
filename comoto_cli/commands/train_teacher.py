"""Placeholder until this subcommand lands (work in progress)."""

from comoto_cli.errors import UsageError


def train_teacher() -> None:
    """Not implemented yet."""
    raise UsageError("'train_teacher' is not implemented yet")
