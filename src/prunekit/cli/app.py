"""The typer app every command module registers on, its consoles, and option parsing they share.

Every user error ends as one line `error: ...` on stderr with exit status 2 (`prunekit.cli.main`).
"""

from __future__ import annotations

from typing import Any

import typer
from rich.console import Console

from prunekit.errors import PrunekitError

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="Post-training pruning of LLMs, with measurements you can trust.")
out = Console(highlight=False)
err = Console(stderr=True, highlight=False)

DEFAULT_MODEL = "smollm2-135m"


def parse_options(pairs: list[str] | None) -> dict[str, Any]:
    """`--option key=value` pairs; values parsed as YAML scalars (0.01, true, 64)."""
    import yaml

    options: dict[str, Any] = {}
    for pair in pairs or []:
        if "=" not in pair:
            raise PrunekitError(f"--option {pair!r} is not key=value (e.g. --option percdamp=0.05)")
        key, value = pair.split("=", 1)
        options[key.strip()] = yaml.safe_load(value)
    return options


def structured_options(structure: str | None, metric: str | None, tasks: list[str] | None) -> dict[str, Any]:
    """`--structure`, `--metric` and `--task NAME=SOURCE` as options of the structured methods."""
    options: dict[str, Any] = {}
    if structure is not None:
        options["structure"] = structure
    if metric is not None:
        options["metric"] = metric
    if tasks:
        parsed: dict[str, str] = {}
        for pair in tasks:
            name, sep, source = pair.partition("=")
            if not sep or not name.strip() or not source.strip():
                raise PrunekitError(f"--task {pair!r} is not NAME=SOURCE (e.g. --task code=prompts/code.jsonl)")
            if name.strip() in parsed:
                raise PrunekitError(f"--task {name.strip()!r} is given twice")
            parsed[name.strip()] = source.strip()
        options["tasks"] = parsed
    return options
