"""Command line: `prunekit prune`, `gradients`, `eval`, `speed`, `demo`, `sweep`, `report`, `safety` and `retrain`.

One module per group of commands, each registering on the shared typer app (app.py); `main` turns every user
error into one line `error: ...` on stderr with exit status 2.
"""

from __future__ import annotations

import sys
from importlib import import_module

import click
import typer

from prunekit.cli.app import app
from prunekit.errors import PrunekitError

__all__ = ["app", "main"]

for _commands in ("prune", "evaluate", "safety", "retrain"):  # each registers its commands on `app`, in this order
    import_module(f"{__name__}.{_commands}")


def main(argv: list[str] | None = None) -> None:
    """Entry point: one-line errors with exit status 2 for anything the user got wrong."""
    command = typer.main.get_command(app)
    try:
        command.main(args=argv, prog_name="prunekit", standalone_mode=False)
    except PrunekitError as exc:
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(2)
    except (typer.Exit, click.exceptions.Exit) as exc:
        sys.exit(exc.exit_code)
    except (typer.TyperException, click.ClickException) as exc:  # typer bundles its own click
        if type(exc).__name__.startswith("NoArgsIsHelp"):
            sys.exit(0)
        message = exc.format_message() if hasattr(exc, "format_message") else str(exc)
        print(f"error: {' '.join(message.split())}", file=sys.stderr)
        sys.exit(2)
    except (typer.Abort, click.exceptions.Abort, KeyboardInterrupt):
        print("error: interrupted", file=sys.stderr)
        sys.exit(130)
