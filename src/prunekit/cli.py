"""Command line: `prunekit prune`, `eval`, `speed`, `demo`, `sweep`, `report`, `safety` and `retrain`.

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
    structure: Annotated[str | None, typer.Option(help="Structured methods: UL-UM, UL-MM, AL-MM, AL-AM.")] = None,
    metric: Annotated[str | None, typer.Option(help="flap/seap score: IFV, WIFV or WIFN.")] = None,
    task: Annotated[list[str] | None, typer.Option(help="seap task NAME=SOURCE (repeatable).")] = None,
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
    from prunekit.pruning.target import check_sparsity
    from prunekit.recipe import load_recipe

    options = {**_parse_options(option), **_structured_options(structure, metric, task)}
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
    if getattr(report, "structured", False):  # a smaller model; seap: one per task
        from prunekit.structured import save_outputs

        paths = save_outputs(report, loaded.model, loaded.tokenizer, recipe.out, manifest, overwrite=recipe.overwrite)
        path = paths[0] if len(paths) == 1 else Path(recipe.out)
    else:
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
    as_json: Annotated[bool, typer.Option("--json", help="End with one JSON line.")] = False,
    trust_remote_code: Annotated[bool, typer.Option(help="Allow model code from the hub.")] = False,
) -> None:
    """Perplexity (pinned protocol), zero-shot tasks (lm-eval) and divergence from a dense model."""
    from prunekit.experiments.evaluate import run_evaluation, save_summary

    summary = run_evaluation(model, ppl=ppl, tasks=tasks, local_tasks=local_tasks, local_n=local_n, limit=limit,
                             reference=reference, jsd=jsd, topk=topk, seqlen=seqlen, batch_size=batch_size, bos=bos,
                             max_windows=max_windows, trust_remote_code=trust_remote_code,
                             log=lambda m: err.print(f"[dim]{m}[/]"))
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
        save_summary(summary, save_json)
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
        help="Comma-separated decode runtimes: eager (generate()), compiled (static cache + torch.compile).")
                       ] = "eager,compiled",
    threads: Annotated[int | None, typer.Option(help="torch threads (default: torch's choice).")] = None,
    save_json: Annotated[Path | None, typer.Option(help="Also write the report here.")] = None,
    trust_remote_code: Annotated[bool, typer.Option(help="Allow model code from the hub.")] = False,
) -> None:
    """Prefill and greedy-decode tokens/s of each model, and its speed-up over the first, timed interleaved."""
    from prunekit.evaluation.speed import check_runtimes, measure_speed, speed_ids
    from prunekit.models import load_model

    runtimes = check_runtimes([r.strip() for r in runtime.split(",") if r.strip()])
    for name, value in (("--prefill-tokens", prefill_tokens), ("--prompt-tokens", prompt_tokens),
                        ("--new-tokens", new_tokens), ("--repeats", repeats), ("--threads", threads or 1)):
        if value < 1:
            raise PrunekitError(f"{name} {value} must be at least 1")
    if prompt_tokens > prefill_tokens:
        raise PrunekitError(f"--prompt-tokens {prompt_tokens} must not exceed --prefill-tokens {prefill_tokens}")
    if threads is not None:
        import torch

        torch.set_num_threads(threads)
    loaded = {spec: load_model(spec, trust_remote_code=trust_remote_code) for spec in dict.fromkeys(models)}
    first = next(iter(loaded.values()))
    if text is None:
        with resources.as_file(resources.files("prunekit.data").joinpath("embedded/sotu_2020_2021.txt")) as path:
            ids = speed_ids(str(path), first.tokenizer, prefill_tokens)
    else:
        ids = speed_ids(text, first.tokenizer, prefill_tokens)
    result = measure_speed({spec: item.model for spec, item in loaded.items()}, ids, prompt_tokens=prompt_tokens,
                           new_tokens=new_tokens, repeats=repeats, runtimes=runtimes,
                           log=lambda m: err.print(f"[dim]{m}[/]"))
    n_threads = result.protocol["threads"]
    table = Table(title=f"speed: {n_threads} thread{'s' if n_threads != 1 else ''}, prefill 1 x {prefill_tokens}, "
                        f"decode {new_tokens} greedy tokens")
    columns = ["model", "params (M)", "prefill tok/s", *[f"{r} decode tok/s" for r in runtimes]]
    for column in columns + (["same tokens"] if len(runtimes) == 2 else []):
        table.add_column(column, justify="right")
    for spec, row in result.models.items():
        label = Path(spec).name if Path(spec).exists() else spec
        cells = [label, f"{row.parameters / 1e6:.1f}", f"{row.prefill_tok_s:.0f} (x{row.prefill_speedup:.2f})",
                 *[f"{row.decode_tok_s[r]:.1f} (x{row.decode_speedup[r]:.2f})" for r in runtimes]]
        if row.same_tokens_as_eager is not None:
            cells.append("yes" if row.same_tokens_as_eager else "no")
        table.add_row(*cells)
    out.print(table)
    if save_json is not None:
        from prunekit.api import versions
        from prunekit.experiments.evaluate import save_summary

        summary = result.to_dict()
        summary["protocol"].update(text=text or "embedded sotu_2020_2021.txt", versions=versions())
        save_summary(summary, save_json)


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
) -> None:
    """Markdown + offline HTML comparison of pruning runs, with plots."""
    from prunekit.report import build_report

    page = build_report(run_dirs, out_dir, title=title)
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
    device: Annotated[str, typer.Option(help="cpu or cuda.")] = "cpu",
    overwrite: Annotated[bool, typer.Option("--overwrite", help="Replace an existing --out.")] = False,
) -> None:
    """Jailbreak resistance dense vs pruned: refusal rates with intervals, McNemar, plot. Prompts and answers
    go to the output folder only."""
    from prunekit.safety.run import SafetyConfig, format_summary, parse_list, run_study

    config = SafetyConfig(model=model, tasks=tasks, benign=benign, reference=reference,
                          sparsities=[float(s) for s in parse_list(sparsities, "--sparsities", float)],
                          method=method, templates=parse_list(templates, "--templates", str) if templates else None,
                          template_files=list(template_file or []), limit=limit, max_new_tokens=max_new_tokens,
                          batch_size=batch_size, prompt_format=prompt_format, calib=calib, nsamples=nsamples,
                          seqlen=seqlen, device=device, analyses=analyses, judge_model=judge_model)
    results = run_study(config, out_dir, overwrite=overwrite, log=lambda m: err.print(f"[dim]{m}[/]"))
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
