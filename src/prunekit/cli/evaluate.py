"""`prunekit eval`, `speed`, `sweep` and `report`: measuring models and runs."""

from __future__ import annotations

import json
from importlib import resources
from pathlib import Path
from typing import Annotated

import torch
import typer
from rich.table import Table

from prunekit.cli.app import app, err, out
from prunekit.errors import PrunekitError


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
