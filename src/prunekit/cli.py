"""Command line: `prunekit prune`, `prunekit eval`, `prunekit demo`.

Every user error ends as one line `error: ...` on stderr with exit status 2.
"""

from __future__ import annotations

import json
import sys
import time
from importlib import resources
from pathlib import Path
from typing import Annotated, Any

import click
import typer
from rich.console import Console
from rich.table import Table

from prunekit.errors import PrunekitError

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="Post-training pruning of LLMs, with measurements you can trust.")
out = Console(highlight=False)
err = Console(stderr=True, highlight=False)

DEFAULT_MODEL = "smollm2-135m"


def _parse_options(pairs: list[str] | None) -> dict[str, Any]:
    """`--option key=value` pairs; values parsed as YAML scalars (0.01, true, 64)."""
    import yaml

    options: dict[str, Any] = {}
    for pair in pairs or []:
        if "=" not in pair:
            raise PrunekitError(f"--option {pair!r} is not key=value (e.g. --option percdamp=0.05)")
        key, value = pair.split("=", 1)
        options[key.strip()] = yaml.safe_load(value)
    return options


@app.command()
def prune(
    model: Annotated[str | None, typer.Argument(help="Hub id, local HF folder, .gguf file or alias.")] = None,
    method: Annotated[str | None, typer.Option(help="magnitude, wanda, sparsegpt, ...")] = None,
    sparsity: Annotated[str | None, typer.Option(help="Fraction of weights to prune, in [0, 1).")] = None,
    pattern: Annotated[str | None, typer.Option(help="'unstructured' or N:M, e.g. 2:4.")] = None,
    calib: Annotated[str | None, typer.Option(help="Calibration source (default: self).")] = None,
    nsamples: Annotated[int | None, typer.Option(help="Calibration windows (default 128).")] = None,
    seqlen: Annotated[int | None, typer.Option(help="Tokens per window (default 2048, capped by context).")] = None,
    seed: Annotated[int | None, typer.Option(help="Seed for windows / self-sampling.")] = None,
    config: Annotated[Path | None, typer.Option(help="YAML recipe; flags override it.")] = None,
    out_dir: Annotated[str | None, typer.Option("--out", help="Output folder.")] = None,
    overwrite: Annotated[bool | None, typer.Option("--overwrite", help="Replace an existing --out.")] = None,
    propagate: Annotated[str | None, typer.Option(help="pruned (reference) or dense.")] = None,
    batch_size: Annotated[int | None, typer.Option(help="Calibration rows per forward.")] = None,
    device: Annotated[str | None, typer.Option(help="cpu or cuda.")] = None,
    option: Annotated[list[str] | None, typer.Option(help="Method option key=value (repeatable).")] = None,
    ppl: Annotated[str | None, typer.Option(help="Also report perplexity on SOURCE before and after.")] = None,
    ppl_seqlen: Annotated[int, typer.Option(help="Window length for --ppl.")] = 512,
    trust_remote_code: Annotated[bool, typer.Option(help="Allow model code from the hub.")] = False,
) -> None:
    """Prune MODEL and save an HF folder plus prunekit.json."""
    from prunekit.api import prune as run_prune
    from prunekit.api import versions
    from prunekit.export import check_output_dir, save_model
    from prunekit.methods import build_method
    from prunekit.models import load_model
    from prunekit.pruning import SparsityPlan
    from prunekit.recipe import load_recipe

    from prunekit.pruning.target import check_sparsity

    options = _parse_options(option)
    recipe = load_recipe(config, {
        "model": model, "method": method,
        "sparsity": None if sparsity is None else check_sparsity(sparsity), "pattern": pattern, "calib": calib,
        "nsamples": nsamples, "seqlen": seqlen, "seed": seed, "out": out_dir, "overwrite": overwrite,
        "propagate": propagate, "batch_size": batch_size, "device": device,
    })
    if options:
        recipe.options = {**recipe.options, **options}
    if recipe.out is None:
        raise PrunekitError("no output folder: pass --out DIR (or 'out:' in the recipe)")
    # validate everything cheap before loading anything
    build_method(recipe.method, recipe.options)
    SparsityPlan.build(recipe.sparsity, recipe.pattern, recipe.overrides, recipe.skip)
    check_output_dir(recipe.out, recipe.overwrite)

    started = time.perf_counter()
    loaded = load_model(recipe.model or DEFAULT_MODEL, trust_remote_code=trust_remote_code)
    load_seconds = time.perf_counter() - started
    before = _ppl(loaded, ppl, ppl_seqlen) if ppl else None
    report = run_prune(
        loaded.model, method=recipe.method, sparsity=recipe.sparsity, pattern=recipe.pattern,
        calibration=recipe.calib, tokenizer=loaded.tokenizer, nsamples=recipe.nsamples, seqlen=recipe.seqlen,
        seed=recipe.seed, method_options=recipe.options, overrides=recipe.overrides, skip=recipe.skip,
        propagate=recipe.propagate, batch_size=recipe.batch_size, device=recipe.device,
        prune_head=recipe.prune_head,
    )
    after = _ppl(loaded, ppl, ppl_seqlen) if ppl else None
    manifest = {
        "model": loaded.provenance,
        "recipe": recipe.model_dump(),
        **report.to_dict(),
        "evaluation": {"before": before, "after": after} if ppl else None,
        "load_seconds": load_seconds,
        "versions": versions(),
    }
    t0 = time.perf_counter()
    path = save_model(loaded.model, loaded.tokenizer, recipe.out, manifest, overwrite=recipe.overwrite)
    out.print(f"saved {path} (achieved sparsity {report.overall_sparsity:.4f}, "
              f"prune {report.seconds:.1f}s, save {time.perf_counter() - t0:.1f}s)")
    if ppl:
        _print_table(loaded.provenance.get("spec", ""), recipe.method, recipe.sparsity, recipe.pattern,
                     before, after, report.overall_sparsity)


def _ppl(loaded, source: str, seqlen: int) -> dict[str, Any]:
    from prunekit.evaluation import perplexity

    return perplexity(loaded.model, loaded.tokenizer, source, seqlen=seqlen).to_dict()


def _print_table(model: str, method: str, sparsity: float, pattern: str, before: dict, after: dict,
                 achieved: float) -> None:
    table = Table(title=f"{model}: {method} {pattern if pattern != 'unstructured' else f'{sparsity:.0%}'}")
    for column in ("model", "sparsity", "perplexity", "tokens", "seqlen"):
        table.add_column(column, justify="right")
    table.add_row("dense", "0.0000", f"{before['perplexity']:.3f}", str(before["tokens"]), str(before["seqlen"]))
    table.add_row("pruned", f"{achieved:.4f}", f"{after['perplexity']:.3f}", str(after["tokens"]),
                  str(after["seqlen"]))
    out.print(table)
    out.print(f"[dim]protocol: {before.get('protocol', '')}[/]")


@app.command("eval")
def evaluate(
    model: Annotated[str, typer.Argument(help="Hub id, local HF folder (e.g. a prunekit output), .gguf or alias.")],
    ppl: Annotated[str, typer.Option(help="Perplexity source: wikitext2, c4, ptb, .txt, folder, .jsonl[:field].")],
    seqlen: Annotated[int | None, typer.Option(help="Window length (default 2048, capped by context).")] = None,
    batch_size: Annotated[int, typer.Option(help="Windows per forward.")] = 8,
    bos: Annotated[bool, typer.Option(help="Prepend BOS to every window.")] = False,
    max_windows: Annotated[int | None, typer.Option(help="Evaluate at most this many windows.")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="End with one JSON line.")] = False,
    trust_remote_code: Annotated[bool, typer.Option(help="Allow model code from the hub.")] = False,
) -> None:
    """Perplexity of MODEL under the pinned protocol."""
    from prunekit.data import resolve_seqlen
    from prunekit.evaluation import perplexity
    from prunekit.models import load_model

    loaded = load_model(model, trust_remote_code=trust_remote_code)
    length, note = resolve_seqlen(seqlen, loaded.model.config)
    result = perplexity(loaded.model, loaded.tokenizer, ppl, seqlen=length, batch_size=batch_size, bos=bos,
                        max_windows=max_windows)
    summary = {**result.to_dict(), "model": loaded.provenance, "seqlen_choice": note}
    out.print(f"perplexity {result.perplexity:.4f} over {result.tokens} tokens "
              f"({result.windows} windows of {result.seqlen}, bos={result.bos})")
    if as_json:
        print(json.dumps(summary, default=str))


@app.command()
def demo(
    model: Annotated[str, typer.Argument(help="Model to prune.")] = DEFAULT_MODEL,
    sparsity: Annotated[float, typer.Option(help="Wanda sparsity.")] = 0.5,
    nsamples: Annotated[int, typer.Option(help="Calibration windows sampled from the model itself.")] = 32,
    seqlen: Annotated[int, typer.Option(help="Tokens per calibration and evaluation window.")] = 512,
) -> None:
    """The main job offline: prune the default model with Wanda and print perplexity before and after.

    Calibration: `self` (text sampled from the model, seeded). Evaluation: the 2020-2021 State of the
    Union addresses embedded in the package (public domain).
    """
    from prunekit.api import prune as run_prune
    from prunekit.models import load_model

    text = resources.files("prunekit.data").joinpath("embedded/sotu_2020_2021.txt")
    with resources.as_file(text) as path:
        source = str(path)
        loaded = load_model(model)
        err.print(f"evaluating dense {model} on {path.name} ...")
        before = _ppl(loaded, source, seqlen)
        err.print(f"pruning with wanda at {sparsity:.0%} (calibration: {nsamples} x {seqlen} tokens "
                  "sampled from the model) ...")
        report = run_prune(loaded.model, method="wanda", sparsity=sparsity, calibration="self",
                           tokenizer=loaded.tokenizer, nsamples=nsamples, seqlen=seqlen)
        after = _ppl(loaded, source, seqlen)
    _print_table(model, "wanda", sparsity, "unstructured", before, after, report.overall_sparsity)
    out.print(f"prune time {report.seconds:.1f}s; peak RSS {report.memory['peak_rss_mib']:.0f} MiB")


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


if __name__ == "__main__":
    main()
