"""Command line: `prunekit prune`, `gradients`, `eval`, `speed`, `demo`, `sweep`, `report`, `safety` and `retrain`.

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
import torch
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


def _structured_options(structure: str | None, metric: str | None, tasks: list[str] | None) -> dict[str, Any]:
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

    options = {**_parse_options(option), **_structured_options(structure, metric, task)}
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


@app.command("eval")
def evaluate(
    model: Annotated[str, typer.Argument(help="Hub id, local HF folder (e.g. a prunekit output), .gguf or alias.")],
    ppl: Annotated[str | None, typer.Option(
        help="Perplexity source: wikitext2, c4, ptb, .txt, folder, .jsonl[:field].")] = None,
    seqlen: Annotated[int | None, typer.Option(help="Window length (default 2048, capped by context).")] = None,
    batch_size: Annotated[int, typer.Option(help="Windows per forward.")] = 8,
    bos: Annotated[bool, typer.Option(help="Prepend BOS to every window.")] = False,
    max_windows: Annotated[int | None, typer.Option(help="Evaluate at most this many windows.")] = None,
    tasks: Annotated[str | None, typer.Option(help="lm-eval tasks, e.g. boolq,rte,hellaswag (hub data).")] = None,
    local_tasks: Annotated[str | None, typer.Option(
        help="Build the offline tasks prunekit_cloze + prunekit_nextsent from this text SOURCE.")] = None,
    local_n: Annotated[int, typer.Option(help="Examples per offline task (at most).")] = 500,
    limit: Annotated[int | None, typer.Option(help="lm-eval limit: examples per hub task.")] = None,
    reference: Annotated[str | None, typer.Option(help="Dense model to compare against (with --jsd).")] = None,
    jsd: Annotated[str | None, typer.Option(help="Text SOURCE for JSD/KL/top-1 agreement to --reference.")] = None,
    topk: Annotated[int, typer.Option(help="Dense log-probs cached per token for --jsd (>= vocab: exact).")] = 1024,
    save_json: Annotated[Path | None, typer.Option(help="Also write the summary here (e.g. RUN_DIR/eval.json).")
                         ] = None,
    overwrite: Annotated[bool, typer.Option("--overwrite", help="Replace an earlier prunekit --save-json file.")
                         ] = False,
    as_json: Annotated[bool, typer.Option("--json", help="End with one JSON line.")] = False,
    stream: Annotated[bool | None, typer.Option("--stream/--no-stream", help="Perplexity block by block from "
                                                "disk (default: when the model would not fit in memory).")] = None,
    device: Annotated[str, typer.Option(help="cpu, cuda, cuda:N or auto (streamed perplexity).")] = "cpu",
    trust_remote_code: Annotated[bool, typer.Option(help="Allow model code from the hub.")] = False,
) -> None:
    """Perplexity (pinned protocol), zero-shot tasks (lm-eval) and divergence from a dense model."""
    from prunekit.checks import check_device, check_positive
    from prunekit.experiments.evaluate import run_evaluation, save_summary
    from prunekit.files import check_output_file

    device = check_device(device)
    check_positive({"--seqlen": seqlen, "--batch-size": batch_size, "--max-windows": max_windows,
                    "--local-n": local_n, "--topk": topk, "--limit": limit})
    if save_json is not None:
        check_output_file(save_json, overwrite)
    summary = run_evaluation(model, ppl=ppl, tasks=tasks, local_tasks=local_tasks, local_n=local_n, limit=limit,
                             reference=reference, jsd=jsd, topk=topk, seqlen=seqlen, batch_size=batch_size, bos=bos,
                             max_windows=max_windows, trust_remote_code=trust_remote_code,
                             log=lambda m: err.print(f"[dim]{m}[/]"), stream=stream, device=device)
    if ppl is not None:
        out.print(f"perplexity {summary['perplexity']:.4f} over {summary['tokens']} tokens "
                  f"({summary['windows']} windows of {summary['seqlen']}, bos={summary['bos']})")
    if "divergence" in summary:
        d = summary["divergence"]
        out.print(f"JSD mean {d['jsd_mean']:.5f} nats (median {d['jsd_median']:.5f}, p95 {d['jsd_p95']:.5f}), "
                  f"KL {d['kl_mean']:.5f}, top-1 agreement {d['top1_agreement']:.4f} over {d['tokens']} tokens; "
                  f"perplexity {d['perplexity']:.3f} vs dense {d['reference_perplexity']:.3f}")
    for name, task in (summary.get("zeroshot") or {}).get("tasks", {}).items():
        metrics = ", ".join(f"{m} {task[m]:.4f}" for m in ("acc", "acc_norm", "perplexity") if task.get(m) is not None)
        out.print(f"{name} (v{task.get('version')}, n={task.get('n')}): {metrics}")
    if save_json is not None:
        save_summary(summary, save_json, overwrite=overwrite)
    if as_json:
        print(json.dumps(summary, default=str))


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


@app.command()
def speed(
    models: Annotated[list[str], typer.Argument(
        help="Models to time, baseline first: e.g. the dense model, then prunekit output folders.")],
    text: Annotated[str | None, typer.Option(
        help="Text SOURCE for the prompts (.txt, folder, .jsonl[:field], dataset); default: the embedded "
             "State of the Union text.")] = None,
    prefill_tokens: Annotated[int, typer.Option(help="Tokens of the timed prefill (batch 1).")] = 512,
    prompt_tokens: Annotated[int, typer.Option(help="Prompt tokens before greedy decoding.")] = 32,
    new_tokens: Annotated[int, typer.Option(help="Greedy tokens decoded per timing.")] = 128,
    repeats: Annotated[int, typer.Option(help="Timings per model; the median is kept.")] = 3,
    runtime: Annotated[str, typer.Option(
        help="Comma-separated decode runtimes: eager (generate()), compiled (static cache + torch.compile), "
             "semi-structured (CUDA: 2:4 linears on torch's sparse kernels).")] = "eager,compiled",
    threads: Annotated[int | None, typer.Option(help="torch threads (default: torch's choice).")] = None,
    device: Annotated[str, typer.Option(help="cpu, cuda, cuda:N or auto.")] = "cpu",
    dtype: Annotated[str, typer.Option(help="Weights while timing: float32, bfloat16, float16.")] = "float32",
    save_json: Annotated[Path | None, typer.Option(help="Also write the report here.")] = None,
    overwrite: Annotated[bool, typer.Option("--overwrite", help="Replace an earlier prunekit --save-json file.")
                         ] = False,
    trust_remote_code: Annotated[bool, typer.Option(help="Allow model code from the hub.")] = False,
) -> None:
    """Prefill and greedy-decode tokens/s of each model, and its speed-up over the first, timed interleaved."""
    from prunekit.checks import check_device
    from prunekit.evaluation.speed import check_runtimes, measure_speed, speed_ids
    from prunekit.files import check_output_file
    from prunekit.models import load_model
    from prunekit.streaming.prune import parse_dtype

    device = check_device(device)
    weights_dtype = parse_dtype(dtype, "--dtype")
    if save_json is not None:
        check_output_file(save_json, overwrite)
    runtimes = check_runtimes([r.strip() for r in runtime.split(",") if r.strip()], device)
    for name, value in (("--prefill-tokens", prefill_tokens), ("--prompt-tokens", prompt_tokens),
                        ("--new-tokens", new_tokens), ("--repeats", repeats), ("--threads", threads or 1)):
        if value < 1:
            raise PrunekitError(f"{name} {value} must be at least 1")
    if prompt_tokens > prefill_tokens:
        raise PrunekitError(f"--prompt-tokens {prompt_tokens} must not exceed --prefill-tokens {prefill_tokens}")
    if threads is not None:
        torch.set_num_threads(threads)
    loaded = {spec: load_model(spec, dtype=weights_dtype, trust_remote_code=trust_remote_code)
              for spec in dict.fromkeys(models)}
    first = next(iter(loaded.values()))
    if text is None:
        with resources.as_file(resources.files("prunekit.data").joinpath("embedded/sotu_2020_2021.txt")) as path:
            ids = speed_ids(str(path), first.tokenizer, prefill_tokens)
    else:
        ids = speed_ids(text, first.tokenizer, prefill_tokens)
    result = measure_speed({spec: item.model for spec, item in loaded.items()}, ids, prompt_tokens=prompt_tokens,
                           new_tokens=new_tokens, repeats=repeats, runtimes=runtimes,
                           log=lambda m: err.print(f"[dim]{m}[/]"), device=device)
    n_threads = result.protocol["threads"]
    table = Table(title=f"speed: {n_threads} thread{'s' if n_threads != 1 else ''}, prefill 1 x {prefill_tokens}, "
                        f"decode {new_tokens} greedy tokens")
    sparse = "semi-structured" in runtimes
    columns = ["model", "params (M)", "prefill tok/s", *(["2:4 sparse prefill tok/s"] if sparse else []),
               *[f"{r} decode tok/s" for r in runtimes]]
    for column in columns + (["same tokens"] if "compiled" in runtimes else []):
        table.add_column(column, justify="right")
    dense_prefill = next(iter(result.models.values())).prefill_tok_s
    for spec, row in result.models.items():
        label = Path(spec).name if Path(spec).exists() else spec
        cells = [label, f"{row.parameters / 1e6:.1f}", f"{row.prefill_tok_s:.0f} (x{row.prefill_speedup:.2f})"]
        if sparse:
            fast = row.semi_structured_prefill_tok_s
            cells.append(f"{fast:.0f} (x{fast / dense_prefill:.2f}, {row.semi_structured_linears} linears)")
        cells += [f"{row.decode_tok_s[r]:.1f} (x{row.decode_speedup[r]:.2f})" for r in runtimes]
        if row.same_tokens_as_eager is not None:
            cells.append("yes" if row.same_tokens_as_eager else "no")
        table.add_row(*cells)
    out.print(table)
    if save_json is not None:
        from prunekit.api import versions
        from prunekit.experiments.evaluate import save_summary

        summary = {"kind": "prunekit.speed", **result.to_dict()}
        summary["protocol"].update(text=text or "embedded sotu_2020_2021.txt", versions=versions())
        save_summary(summary, save_json, overwrite=overwrite)


@app.command()
def sweep(
    grid: Annotated[Path, typer.Argument(help="YAML grid: model, method, sparsity, calibration/evaluation domains.")],
    out_dir: Annotated[Path, typer.Option("--out", help="Output folder (matrix.json + runs/).")],
    overwrite: Annotated[bool, typer.Option("--overwrite", help="Replace an existing --out.")] = False,
) -> None:
    """Prune with each calibration domain, measure perplexity and JSD on each evaluation domain."""
    from prunekit.experiments.sweep import format_matrix, load_grid, run_sweep

    matrix = run_sweep(load_grid(grid), out_dir, overwrite=overwrite, log=lambda m: err.print(f"[dim]{m}[/]"))
    out.print(format_matrix(matrix, "perplexity", 3))
    out.print(format_matrix(matrix, "jsd", 5))
    out.print(f"wrote {Path(out_dir) / 'matrix.json'} ({matrix['seconds']:.0f}s)")


@app.command()
def report(
    run_dirs: Annotated[list[Path], typer.Argument(help="prunekit prune / sweep output folders.")],
    out_dir: Annotated[Path, typer.Option("--out", help="Report folder (index.html, report.md, plots/).")],
    title: Annotated[str, typer.Option(help="Page title.")] = "prunekit report",
    overwrite: Annotated[bool, typer.Option("--overwrite", help="Replace an earlier report in --out.")] = False,
) -> None:
    """Markdown + offline HTML comparison of pruning runs, with plots."""
    from prunekit.report import build_report

    page = build_report(run_dirs, out_dir, title=title, overwrite=overwrite)
    out.print(f"wrote {page} and {page.with_name('report.md')}")


@app.command()
def safety(
    model: Annotated[str, typer.Argument(help="Model to test (pruned with --sparsities, or compared to --reference).")],
    tasks: Annotated[str, typer.Option(help="Tasks: malicious_tasks_dataset.yaml, integrated.yaml, .csv/.jsonl "
                                            "(goal/task/prompt column), .json or .txt.")],
    out_dir: Annotated[Path, typer.Option("--out", help="Output folder (results.json, responses.jsonl, plot).")],
    reference: Annotated[str | None, typer.Option(help="Dense baseline when MODEL is already pruned.")] = None,
    sparsities: Annotated[str | None, typer.Option(help="Also prune MODEL at these, e.g. 0.1,0.2,0.3.")] = None,
    method: Annotated[str, typer.Option(help="Pruning method for --sparsities.")] = "wanda",
    templates: Annotated[str | None, typer.Option(help="Comma-separated template names (default: all).")] = None,
    template_file: Annotated[list[str] | None, typer.Option(help="User templates with a {task} slot.")] = None,
    benign: Annotated[str | None, typer.Option(help="Benign tasks for the over-refusal control.")] = None,
    limit: Annotated[int | None, typer.Option(help="Use N tasks spread over the list.")] = None,
    max_new_tokens: Annotated[int, typer.Option(
        help="Answer length. Refusals show in the first tokens: on 40 sampled jailbreak prompts, verdicts after "
             "32 and 64 tokens equalled those after 256; 64 keeps a margin for role-play preambles.")] = 64,
    batch_size: Annotated[int, typer.Option(help="Prompts per generation batch.")] = 16,
    prompt_format: Annotated[str, typer.Option("--format", help="auto, chat (apply_chat_template) or plain.")
                             ] = "auto",
    calib: Annotated[str | None, typer.Option(help="Calibration source for pruning (default: self).")] = None,
    nsamples: Annotated[int, typer.Option(help="Calibration windows.")] = 128,
    seqlen: Annotated[int, typer.Option(help="Tokens per calibration window.")] = 512,
    analyses: Annotated[bool, typer.Option("--analyses", help="Attention-to-task and prompt perplexity.")] = False,
    judge_model: Annotated[str | None, typer.Option(help="Local chat model as a second judge.")] = None,
    layers: Annotated[str, typer.Option(
        help="Layers Wanda prunes: attention (q/k/v/o, the paper's choice) or all (every linear layer).")
                      ] = "attention",
    generation: Annotated[str, typer.Option(
        help="prefix (shared-prefix KV cache, the default) or plain (model.generate on whole prompts).")
                          ] = "prefix",
    stop_early: Annotated[bool, typer.Option(
        "--stop-early/--no-stop-early",
        help="End an answer once the judge's verdict is final (a refusal phrase appeared); the answer records it.")
                          ] = True,
    throughput_study: Annotated[bool, typer.Option(
        "--throughput-study", help="Only time the old and new generation paths on the same prompts (dense MODEL, "
                                   "--limit tasks x --templates); writes throughput.json to --out.")] = False,
    baseline_batch_size: Annotated[int | None, typer.Option(
        help="--throughput-study: batch of the old path (default: --batch-size).")] = None,
    ppl: Annotated[str | None, typer.Option(help="Perplexity of every variant on this text SOURCE.")] = None,
    ppl_windows: Annotated[int | None, typer.Option(help="At most N windows for --ppl.")] = None,
    device: Annotated[str, typer.Option(help="cpu or cuda.")] = "cpu",
    overwrite: Annotated[bool, typer.Option("--overwrite", help="Replace an existing --out.")] = False,
) -> None:
    """Jailbreak resistance dense vs pruned: refusal rates with intervals, McNemar, plot. Prompts and answers
    go to the output folder only. A stopped run continues when the same command is run again."""
    from prunekit.safety.run import SafetyConfig, parse_list, run_study, run_throughput
    from prunekit.safety.summary import format_summary

    config = SafetyConfig(model=model, tasks=tasks, benign=benign, reference=reference,
                          sparsities=[float(s) for s in parse_list(sparsities, "--sparsities", float)],
                          method=method, templates=parse_list(templates, "--templates", str) if templates else None,
                          template_files=list(template_file or []), limit=limit, max_new_tokens=max_new_tokens,
                          batch_size=batch_size, prompt_format=prompt_format, calib=calib, nsamples=nsamples,
                          seqlen=seqlen, device=device, analyses=analyses, judge_model=judge_model, layers=layers,
                          generation=generation, stop_early=stop_early, ppl_source=ppl, ppl_max_windows=ppl_windows,
                          baseline_batch_size=baseline_batch_size)
    log = lambda m: err.print(f"[dim]{m}[/]")  # noqa: E731
    if throughput_study:
        study = run_throughput(config, out_dir, overwrite=overwrite, log=log)
        old, new = study["old"]["prompts_per_s"], study["new"]["prompts_per_s"]
        out.print(f"old path {old:.2f} prompts/s, new path {new:.2f} prompts/s: x{study['speedup']:.2f}; "
                  f"identical answers {study['identical_answers']}/"
                  f"{study['prompts']}, verdicts agree {study['verdicts_agree']}/{study['prompts']}")
        out.print(f"wrote {out_dir / 'throughput.json'}")
        return
    results = run_study(config, out_dir, overwrite=overwrite, log=log)
    out.print(format_summary(results))
    out.print(f"wrote {out_dir / 'results.json'}, responses.jsonl (prompts and answers), refusal_vs_sparsity.png")


@app.command()
def retrain(
    pruned: Annotated[str, typer.Argument(help="A prunekit output folder (prunekit.json beside the weights).")],
    out_dir: Annotated[str, typer.Option("--out", help="Output folder.")],
    calib: Annotated[str | None, typer.Option(help="Training text SOURCE (.txt, folder, .jsonl[:field], dataset).")
                     ] = None,
    params: Annotated[str | None, typer.Option(help="Parameter sets: bias,norm,head,lora (default: all four).")
                      ] = None,
    lora_rank: Annotated[int | None, typer.Option(help="Rank of the adapters (default 16).")] = None,
    lora_kind: Annotated[str | None, typer.Option(
        help="lora, scale_lora or mask_lora (default; the last two keep the pruning mask when merged).")] = None,
    merge_lora: Annotated[bool, typer.Option("--merge-lora", help="Merge plain lora even if it fills pruned "
                                                                  "weights (default: saved as a peft adapter).")
                          ] = False,
    mode: Annotated[str | None, typer.Option(help="retrain (next-token loss) or reconstruct (block-wise).")] = None,
    reference: Annotated[str | None, typer.Option(help="Dense model for --mode reconstruct.")] = None,
    steps: Annotated[int | None, typer.Option(help="Optimizer steps (default 100; reconstruct: per block).")] = None,
    lr: Annotated[float | None, typer.Option(help="Peak AdamW learning rate (default 5e-4).")] = None,
    schedule: Annotated[str | None, typer.Option(help="linear, cosine or constant, after 10 % warm-up.")] = None,
    batch_size: Annotated[int | None, typer.Option(help="Windows per step (default 8).")] = None,
    seqlen: Annotated[int | None, typer.Option(help="Tokens per window (default 512).")] = None,
    nsamples: Annotated[int | None, typer.Option(help="Reconstruct: windows kept and cycled (default 128).")
                        ] = None,
    seed: Annotated[int | None, typer.Option(help="Seed of the windows and adapter initialisation.")] = None,
    save_every: Annotated[int | None, typer.Option(help="Checkpoint every N steps (default 50; 0: never).")] = None,
    resume: Annotated[bool, typer.Option("--resume", help="Continue an interrupted run from its checkpoint.")
                      ] = False,
    overwrite: Annotated[bool, typer.Option("--overwrite", help="Replace an existing --out.")] = False,
    ppl: Annotated[str | None, typer.Option(help="Held-out SOURCE: perplexity before and after.")] = None,
    ppl_seqlen: Annotated[int, typer.Option(help="Window length for --ppl.")] = 512,
) -> None:
    """PERP: retrain a pruned model's biases, norms, head and low-rank adapters; save it with the record."""
    from prunekit.retrain import retrain as run_retrain

    report = run_retrain(
        pruned, out_dir, calib=calib, reference=reference, overwrite=overwrite, resume=resume, ppl=ppl,
        ppl_seqlen=ppl_seqlen, log=lambda m: err.print(f"[dim]{m}[/]"), params=params, lora_rank=lora_rank,
        lora_kind=lora_kind, merge_lora=merge_lora or None, mode=mode, steps=steps, lr=lr, schedule=schedule,
        batch_size=batch_size, seqlen=seqlen, nsamples=nsamples, seed=seed, save_every=save_every)
    record = report.record
    out.print(f"saved {report.out} (trained {record['parameters']['trainable']:,} parameters, "
              f"{report.trainable_fraction:.3%}; {record['steps']} steps in {record['seconds']['train']:.0f}s; "
              f"mask kept: {'yes' if record['mask']['kept'] else 'no'})")
    if record["evaluation"]:
        before, after = record["evaluation"]["before"], record["evaluation"]["after"]
        out.print(f"perplexity {before['perplexity']:.3f} -> {after['perplexity']:.3f} over {after['tokens']} "
                  "held-out tokens")


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
