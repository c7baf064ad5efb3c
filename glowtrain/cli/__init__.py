"""The `glowtrain` command line. Only this package imports typer: `commands` (the commands), `process` (how a
command's process speaks and ends), `job` (`fit --nproc`)."""

from glowtrain.cli.commands import app, main

__all__ = ["app", "main"]
