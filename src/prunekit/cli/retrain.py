"""`prunekit retrain`: PERP parameter-efficient retraining of a pruned model."""

from __future__ import annotations

from typing import Annotated

import typer

from prunekit.cli.app import app, err, out


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
