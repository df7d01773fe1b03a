"""`prunekit prune` (streamed or in memory, with torchrun detected), `prunekit gradients` and `prunekit demo`."""

from __future__ import annotations

import json
import time
from importlib import resources
from pathlib import Path
from typing import Annotated, Any

import torch
import typer
from rich.table import Table

from prunekit.cli.app import DEFAULT_MODEL, app, err, out, parse_options, structured_options
from prunekit.errors import PrunekitError


@app.command()
def prune(
    model: Annotated[str | None, typer.Argument(help="Hub id, local HF folder, .gguf file or alias.")] = None,
    method: Annotated[str | None, typer.Option(help="magnitude, wanda, sparsegpt, ...")] = None,
    refine: Annotated[str | None, typer.Option(help="Refine the method's masks: dsnot.")] = None,
    sparsity: Annotated[str | None, typer.Option(help="Fraction of weights to prune, in [0, 1).")] = None,
    pattern: Annotated[str | None, typer.Option(help="'unstructured' or N:M, e.g. 2:4.")] = None,
    calib: Annotated[str | None, typer.Option(help="Calibration source (default: self).")] = None,
    nsamples: Annotated[int | None, typer.Option(help="Calibration windows (default 128).")] = None,
    seqlen: Annotated[int | None, typer.Option(help="Tokens per window (default 2048, capped by context).")] = None,
    seed: Annotated[int | None, typer.Option(help="Seed for windows / self-sampling.")] = None,
    config: Annotated[Path | None, typer.Option(help="YAML recipe; flags override it.")] = None,
    out_dir: Annotated[str | None, typer.Option("--out", help="Output folder.")] = None,
    overwrite: Annotated[bool | None, typer.Option("--overwrite", help="Replace an existing prunekit --out.")] = None,
    resume: Annotated[bool, typer.Option("--resume", help="Continue the interrupted run of this --out "
                                                          "(the same command continues it anyway).")] = False,
    propagate: Annotated[str | None, typer.Option(help="pruned (reference) or dense.")] = None,
    batch_size: Annotated[int | None, typer.Option(help="Calibration rows per forward.")] = None,
    device: Annotated[str | None, typer.Option(help="cpu, cuda, cuda:N or auto.")] = None,
    prune_head: Annotated[bool | None, typer.Option(
        "--prune-head", help="Also prune the LM head (magnitude only; refused when tied to the embeddings).")] = None,
    sparsity_allocation: Annotated[str | None, typer.Option(
        help="Per-block sparsities around the target: owl (options owl.m, owl.lam).")] = None,
    stream: Annotated[bool | None, typer.Option("--stream/--no-stream", help="Block by block from disk (default "
                                                "for models on disk) or the whole model in memory.")] = None,
    dtype: Annotated[str | None, typer.Option(help="Output dtype: float32, bfloat16, float16 (default: the "
                                                   "checkpoint's).")] = None,
    compute_dtype: Annotated[str | None, typer.Option(help="dtype blocks are computed in: float32 (default), "
                                                           "bfloat16, float16 (GPU).")] = None,
    activations_dtype: Annotated[str | None, typer.Option(help="dtype of the calibration activations kept "
                                                               "between blocks (default: the model's).")] = None,
    max_memory: Annotated[str | None, typer.Option(help="Memory limit, e.g. 3GB: activations beyond it spill to "
                                                        "disk; below one block's need is an error.")] = None,
    option: Annotated[list[str] | None, typer.Option(help="Method option key=value (repeatable).")] = None,
    structure: Annotated[str | None, typer.Option(help="Structured methods: UL-UM, UL-MM, AL-MM, AL-AM.")] = None,
    metric: Annotated[str | None, typer.Option(help="flap/seap score: IFV, WIFV or WIFN.")] = None,
    task: Annotated[list[str] | None, typer.Option(help="seap task NAME=SOURCE (repeatable).")] = None,
    ppl: Annotated[str | None, typer.Option(help="Also report perplexity on SOURCE before and after.")] = None,
    ppl_seqlen: Annotated[int, typer.Option(help="Window length for --ppl.")] = 512,
    trust_remote_code: Annotated[bool, typer.Option(help="Allow model code from the hub.")] = False,
) -> None:
    """Prune MODEL and save an HF folder plus prunekit.json (streamed block by block, resumable)."""
    from prunekit.adapters.ssm import split_ssm_parts
    from prunekit.checks import check_device, check_positive
    from prunekit.files import check_output_dir
    from prunekit.methods import build_method
    from prunekit.pruning import SparsityPlan
    from prunekit.pruning.owl import split_allocation_options
    from prunekit.pruning.target import check_sparsity
    from prunekit.recipe import load_recipe
    from prunekit.streaming.budget import parse_size
    from prunekit.streaming.prune import check_compute_dtype, parse_dtype

    options = {**parse_options(option), **structured_options(structure, metric, task)}
    recipe = load_recipe(config, {
        "model": model, "method": method, "refine": refine, "sparsity_allocation": sparsity_allocation,
        "sparsity": None if sparsity is None else check_sparsity(sparsity), "pattern": pattern, "calib": calib,
        "nsamples": nsamples, "seqlen": seqlen, "seed": seed, "out": out_dir, "overwrite": overwrite,
        "propagate": propagate, "batch_size": batch_size, "device": device, "prune_head": prune_head,
        "stream": stream, "dtype": dtype, "compute_dtype": compute_dtype, "activations_dtype": activations_dtype,
        "max_memory": max_memory,
    })
    if options:
        recipe.options = {**recipe.options, **options}
    if recipe.out is None:
        raise PrunekitError("no output folder: pass --out DIR (or 'out:' in the recipe)")
    # validate everything cheap before loading anything
    check_positive({"--batch-size": recipe.batch_size, "--nsamples": recipe.nsamples, "--seqlen": recipe.seqlen,
                    "--ppl-seqlen": ppl_seqlen})
    device = check_device(recipe.device)
    method_options, _allocation = split_allocation_options(recipe.sparsity_allocation, recipe.options)
    method_options, _parts = split_ssm_parts(method_options)
    build_method(recipe.method, method_options, refine=recipe.refine)
    SparsityPlan.build(recipe.sparsity, recipe.pattern, recipe.overrides, recipe.skip)
    parse_dtype(recipe.dtype, "--dtype")
    check_compute_dtype(parse_dtype(recipe.compute_dtype, "--compute-dtype"), torch.device(device))
    parse_dtype(recipe.activations_dtype, "--activations-dtype")
    limit = parse_size(recipe.max_memory)
    check_output_dir(recipe.out, recipe.overwrite)
    spec = recipe.model or DEFAULT_MODEL
    if recipe.stream is False or (recipe.stream is None and _in_memory_only(spec)):
        if resume or limit is not None:
            raise PrunekitError("--resume and --max-memory need the streamed engine (drop --no-stream)")
        return _prune_in_memory(recipe, spec, ppl, ppl_seqlen, trust_remote_code)
    _prune_streamed(recipe, spec, limit, resume, ppl, ppl_seqlen, trust_remote_code)


def _in_memory_only(spec: str) -> bool:
    """A structurally pruned folder has per-layer sizes: it is re-pruned in memory."""
    from prunekit.structured.io import structured_spec

    return structured_spec(Path(spec).expanduser()) is not None


def _prune_streamed(recipe, spec: str, limit: int | None, resume: bool, ppl: str | None, ppl_seqlen: int,
                    trust_remote_code: bool) -> None:
    from prunekit import distributed
    from prunekit.checks import check_device
    from prunekit.streaming import StreamRequest, prune_files

    request = StreamRequest(
        spec=spec, out=recipe.out, method=recipe.method, refine=recipe.refine,
        sparsity_allocation=recipe.sparsity_allocation, options=recipe.options, sparsity=recipe.sparsity,
        pattern=recipe.pattern, overrides=recipe.overrides, skip=recipe.skip, calib=recipe.calib,
        nsamples=recipe.nsamples, seqlen=recipe.seqlen, seed=recipe.seed, propagate=recipe.propagate,
        batch_size=recipe.batch_size, device=recipe.device, prune_head=recipe.prune_head, dtype=recipe.dtype,
        compute_dtype=recipe.compute_dtype, activations_dtype=recipe.activations_dtype, max_memory=limit,
        trust_remote_code=trust_remote_code)
    reducer = distributed.start(torch.device(check_device(recipe.device)))
    if reducer.world_size > 1 and ppl:
        raise PrunekitError("--ppl runs once, after a data-parallel run: evaluate with `prunekit eval` instead")
    before = _streamed_ppl(spec, ppl, ppl_seqlen, trust_remote_code) if ppl else None
    manifest = prune_files(request, overwrite=recipe.overwrite, resume=True if resume else None,
                           log=lambda m: err.print(f"[dim]{m}[/]"), reducer=reducer)
    distributed.finish(reducer)
    if reducer.rank != 0:
        return
    out.print(f"saved {recipe.out} (achieved sparsity {manifest['overall_sparsity']:.4f}, "
              f"{manifest['timings_s']['total']:.1f}s, peak RSS {manifest['memory']['peak_rss_mib']:.0f} MiB)")
    if ppl:
        after = _streamed_ppl(recipe.out, ppl, ppl_seqlen, trust_remote_code)
        _record_evaluation(Path(recipe.out), before, after)
        _print_table(spec, recipe.method, recipe.sparsity, recipe.pattern, before, after, manifest["overall_sparsity"])


def _streamed_ppl(spec: str, source: str, seqlen: int, trust_remote_code: bool) -> dict[str, Any]:
    from prunekit.structured.io import structured_spec

    if structured_spec(Path(spec).expanduser()) is not None:  # per-layer sizes: the explicit loader
        from prunekit.structured.io import load_structured

        loaded = load_structured(spec)
        return _ppl(loaded, source, seqlen)
    from prunekit.evaluation.streamed import streamed_perplexity
    from prunekit.models import open_checkpoint

    checkpoint = open_checkpoint(spec, trust_remote_code=trust_remote_code)
    return streamed_perplexity(checkpoint, checkpoint.tokenizer(), source, seqlen=seqlen).to_dict()


def _record_evaluation(folder: Path, before: dict[str, Any], after: dict[str, Any]) -> None:
    from prunekit.files import MANIFEST, atomic_write_json

    path = folder / MANIFEST
    if path.is_file():
        manifest = json.loads(path.read_text())
        atomic_write_json(path, {**manifest, "evaluation": {"before": before, "after": after}})


def _prune_in_memory(recipe, spec: str, ppl: str | None, ppl_seqlen: int, trust_remote_code: bool) -> None:
    from prunekit import distributed
    from prunekit.api import prune as run_prune
    from prunekit.api import versions
    from prunekit.checks import check_device
    from prunekit.export import save_model
    from prunekit.models import load_model
    from prunekit.streaming.prune import check_compute_dtype, parse_dtype

    device = torch.device(check_device(recipe.device))
    reducer = distributed.start(device)
    started = time.perf_counter()
    compute = check_compute_dtype(parse_dtype(recipe.compute_dtype, "--compute-dtype"), device)
    loaded = load_model(spec, dtype=compute, trust_remote_code=trust_remote_code)
    load_seconds = time.perf_counter() - started
    before = _ppl(loaded, ppl, ppl_seqlen) if ppl else None
    report = run_prune(
        loaded.model, method=recipe.method, refine=recipe.refine, sparsity=recipe.sparsity,
        pattern=recipe.pattern,
        calibration=recipe.calib, tokenizer=loaded.tokenizer, nsamples=recipe.nsamples, seqlen=recipe.seqlen,
        seed=recipe.seed, method_options=recipe.options, overrides=recipe.overrides, skip=recipe.skip,
        propagate=recipe.propagate, batch_size=recipe.batch_size, device=recipe.device,
        prune_head=recipe.prune_head, activations_dtype=parse_dtype(recipe.activations_dtype, "--activations-dtype"),
        progress=reducer.rank == 0, reducer=reducer,
        sparsity_allocation=recipe.sparsity_allocation,
    )
    distributed.finish(reducer)
    if reducer.rank != 0:  # every rank holds the same pruned model: rank 0 writes it
        return
    after = _ppl(loaded, ppl, ppl_seqlen) if ppl else None
    manifest = {
        "model": loaded.provenance,
        "recipe": recipe.model_dump(),
        **report.to_dict(),
        "evaluation": {"before": before, "after": after} if ppl else None,
        "load_seconds": load_seconds,
        "versions": versions(),
    }
    output_dtype = parse_dtype(recipe.dtype, "--dtype")
    if output_dtype is not None:
        loaded.model.to(output_dtype)
    t0 = time.perf_counter()
    if getattr(report, "structured", False):  # a smaller model; seap: one per task
        from prunekit.structured import save_outputs

        paths = save_outputs(report, loaded.model, loaded.tokenizer, recipe.out, manifest, overwrite=recipe.overwrite)
        path = paths[0] if len(paths) == 1 else Path(recipe.out)
    else:
        path = save_model(loaded.model, loaded.tokenizer, recipe.out, manifest, overwrite=recipe.overwrite)
    out.print(f"saved {path} (achieved sparsity {report.overall_sparsity:.4f}, "
              f"prune {report.seconds:.1f}s, save {time.perf_counter() - t0:.1f}s)")
    if ppl:
        _print_table(spec, recipe.method, recipe.sparsity, recipe.pattern, before, after, report.overall_sparsity)


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


@app.command()
def gradients(
    model: Annotated[str, typer.Argument(help="Hub id, local HF folder, .gguf file or alias.")],
    out_file: Annotated[Path, typer.Option("--out", help="safetensors file to write (for --option gradients=).")],
    calib: Annotated[str, typer.Option(help="Calibration source: the same as the prune run's.")] = "self",
    nsamples: Annotated[int, typer.Option(help="Calibration windows (one backward each).")] = 128,
    seqlen: Annotated[int | None, typer.Option(help="Tokens per window.")] = None,
    seed: Annotated[int, typer.Option(help="Seed for the windows.")] = 0,
    trust_remote_code: Annotated[bool, typer.Option(help="Allow model code from the hub.")] = False,
) -> None:
    """GBLM's gradient norms of MODEL on the calibration windows, cached for `prune --method gblm`."""
    from prunekit.api import prepare_calibration
    from prunekit.models import load_model
    from prunekit.pruning.gradients import compute_gradient_norms

    if out_file.suffix != ".safetensors":
        raise PrunekitError(f"--out {out_file} must end in .safetensors")
    if out_file.exists():
        raise PrunekitError(f"--out {out_file} exists; gradients are never overwritten (delete it first)")
    loaded = load_model(model, trust_remote_code=trust_remote_code)
    ids, provenance = prepare_calibration(calib, loaded.tokenizer, loaded.model, nsamples=nsamples,
                                          seqlen=seqlen, seed=seed)
    t0 = time.perf_counter()
    compute_gradient_norms(loaded.model, ids, path=out_file, metadata={"model": loaded.provenance, **provenance},
                           log=lambda m: err.print(f"[dim]{m}[/]"))
    out.print(f"saved {out_file} ({ids.shape[0]} windows x {ids.shape[1]} tokens, "
              f"{time.perf_counter() - t0:.1f}s)")


@app.command()
def demo(
    model: Annotated[str, typer.Argument(help="Model to prune.")] = DEFAULT_MODEL,
    sparsity: Annotated[float, typer.Option(help="Wanda sparsity.")] = 0.5,
    nsamples: Annotated[int, typer.Option(help="Calibration windows sampled from the model itself.")] = 16,
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
