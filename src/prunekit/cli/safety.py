"""`prunekit safety`: the jailbreak-resistance study."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from prunekit.cli.app import app, err, out


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
    dense_from: Annotated[Path | None, typer.Option(
        help="Reuse the dense answers and measurements of this earlier run folder (same model, prompts, judges; "
             "it may differ in what is pruned, e.g. --layers), instead of generating them again.")] = None,
    ppl: Annotated[str | None, typer.Option(help="Perplexity of every variant on this text SOURCE.")] = None,
    ppl_windows: Annotated[int | None, typer.Option(help="At most N windows for --ppl.")] = None,
    device: Annotated[str, typer.Option(help="cpu or cuda.")] = "cpu",
    overwrite: Annotated[bool, typer.Option("--overwrite", help="Replace an existing --out.")] = False,
) -> None:
    """Jailbreak resistance dense vs pruned: refusal rates with intervals, McNemar, plot. Prompts and answers
    go to the output folder only. A stopped run continues when the same command is run again."""
    from prunekit.safety.config import SafetyConfig, parse_list
    from prunekit.safety.run import run_study, run_throughput, sigterm_as_interrupt
    from prunekit.safety.summary import format_summary

    config = SafetyConfig(model=model, tasks=tasks, benign=benign, reference=reference,
                          sparsities=[float(s) for s in parse_list(sparsities, "--sparsities", float)],
                          method=method, templates=parse_list(templates, "--templates", str) if templates else None,
                          template_files=list(template_file or []), limit=limit, max_new_tokens=max_new_tokens,
                          batch_size=batch_size, prompt_format=prompt_format, calib=calib, nsamples=nsamples,
                          seqlen=seqlen, device=device, analyses=analyses, judge_model=judge_model, layers=layers,
                          generation=generation, stop_early=stop_early, ppl_source=ppl, ppl_max_windows=ppl_windows,
                          baseline_batch_size=baseline_batch_size,
                          dense_from=str(dense_from) if dense_from else None)
    log = lambda m: err.print(f"[dim]{m}[/]")  # noqa: E731
    if throughput_study:
        study = run_throughput(config, out_dir, overwrite=overwrite, log=log)
        old, new = study["old"]["prompts_per_s"], study["new"]["prompts_per_s"]
        out.print(f"old path {old:.2f} prompts/s, new path {new:.2f} prompts/s: x{study['speedup']:.2f}; "
                  f"identical answers {study['identical_answers']}/"
                  f"{study['prompts']}, verdicts agree {study['verdicts_agree']}/{study['prompts']}")
        out.print(f"wrote {out_dir / 'throughput.json'}")
        return
    with sigterm_as_interrupt():
        results = run_study(config, out_dir, overwrite=overwrite, log=log)
    out.print(format_summary(results))
    out.print(f"wrote {out_dir / 'results.json'}, responses.jsonl (prompts and answers), refusal_vs_sparsity.png")
