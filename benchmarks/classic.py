"""Benchmark of the classic methods on SmolLM2-135M-Instruct (issue: engine and classic methods).

Protocol: calibration 128 windows x 512 tokens from ../shared/data/corpora/sotu/train.txt, seed 0;
perplexity on sotu/test.txt in non-overlapping 512-token windows (pinned protocol, no BOS).
For each configuration: perplexity, prune wall time, peak RSS (of a fresh process per configuration,
so one run's peak does not hide another's), and the ratio of prune wall time to one dense forward
pass of the whole model over the calibration set, measured in the same process just before pruning.

    python benchmarks/classic.py                       # everything (about 40 min on 2 CPU cores)
    python benchmarks/classic.py --only wanda-50%      # one configuration
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SOTU = ROOT.parent / "shared" / "data" / "corpora" / "sotu"
RESULTS = ROOT / "benchmarks" / "results" / "classic.json"
CONFIGS = {
    "dense": (None, None),
    "magnitude-50%": ("magnitude", None), "wanda-50%": ("wanda", None), "sparsegpt-50%": ("sparsegpt", None),
    "magnitude-2:4": ("magnitude", "2:4"), "wanda-2:4": ("wanda", "2:4"), "sparsegpt-2:4": ("sparsegpt", "2:4"),
    "magnitude-4:8": ("magnitude", "4:8"), "wanda-4:8": ("wanda", "4:8"), "sparsegpt-4:8": ("sparsegpt", "4:8"),
}


def saved_model_name(config: str) -> str:
    """Folder name of a saved pruned model (benchmarks/evaluation.py finds them by it)."""
    return config.replace(":", "-").replace("%", "")


def run_one(name: str, nsamples: int, seqlen: int, batch_size: int, max_windows: int | None,
            save_dir: Path | None = None) -> dict:
    """Runs in its own process (see main) so peak RSS belongs to this configuration alone."""
    import resource

    import torch

    from prunekit.api import prune, versions
    from prunekit.data import build_calibration
    from prunekit.evaluation import perplexity
    from prunekit.models import load_model

    torch.set_num_threads(os.cpu_count() or 1)
    method, pattern = CONFIGS[name]
    loaded = load_model("smollm2-135m")
    model, tokenizer = loaded.model, loaded.tokenizer
    calib = build_calibration(str(SOTU / "train.txt"), tokenizer, nsamples=nsamples, seqlen=seqlen, seed=0)
    row: dict = {"config": name, "method": method or "dense", "pattern": pattern or "unstructured",
                 "sparsity": 0.0 if method is None else 0.5}
    # one dense forward of the whole model (embeddings to logits) over the calibration set, same batching
    # (CPU time of the process is recorded too: on a shared machine it is the steadier of the two)
    t0, c0 = time.perf_counter(), time.process_time()
    with torch.no_grad():
        for start in range(0, nsamples, batch_size):
            model(input_ids=calib.input_ids[start : start + batch_size], use_cache=False)
    row["dense_forward_s"] = time.perf_counter() - t0
    row["dense_forward_cpu_s"] = time.process_time() - c0
    if method is not None:
        c0 = time.process_time()
        report = prune(model, method=method, sparsity=0.5, pattern=pattern, calibration=calib.input_ids,
                       batch_size=batch_size, progress=True)
        prune_cpu = time.process_time() - c0
        row.update(prune_s=report.seconds, ratio_to_dense_forward=report.seconds / row["dense_forward_s"],
                   prune_cpu_s=prune_cpu, cpu_ratio_to_dense_forward=prune_cpu / row["dense_forward_cpu_s"],
                   achieved_sparsity=report.overall_sparsity, timings_s=report.engine.timings)
        if save_dir is not None:  # reused by benchmarks/evaluation.py
            from prunekit.export import save_model

            save_model(model, tokenizer, save_dir / saved_model_name(name),
                       {"prunekit": report.to_dict(), "benchmark": "classic", "config": name}, overwrite=True)
    t0 = time.perf_counter()
    result = perplexity(model, tokenizer, str(SOTU / "test.txt"), seqlen=seqlen, batch_size=batch_size,
                        max_windows=max_windows)
    row.update(perplexity=result.perplexity, eval_tokens=result.tokens, eval_windows=result.windows,
               eval_s=time.perf_counter() - t0,
               peak_rss_mib=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
               calibration={k: calib.provenance.get(k) for k in ("source", "nsamples", "seqlen", "seed",
                                                                  "ids_sha256")},
               versions=versions(), threads=torch.get_num_threads())
    return row


def print_table(rows: list[dict]) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title="SmolLM2-135M: classic methods (sotu, 128x512 calibration, ppl on sotu/test @512)")
    for col in ("config", "sparsity", "perplexity", "prune s", "x dense fwd", "x dense fwd (CPU time)",
                "peak RSS MiB"):
        table.add_column(col, justify="right")
    for r in rows:
        table.add_row(r["config"], f"{r.get('achieved_sparsity', 0.0):.4f}", f"{r['perplexity']:.3f}",
                      f"{r.get('prune_s', 0):.1f}", f"{r['ratio_to_dense_forward']:.2f}" if "prune_s" in r else "-",
                      f"{r['cpu_ratio_to_dense_forward']:.2f}" if "prune_cpu_s" in r else "-",
                      f"{r['peak_rss_mib']:.0f}")
    Console().print(table)


def markdown_table(rows: list[dict]) -> str:
    """The README's results table."""
    lines = ["| config | achieved sparsity | perplexity | prune wall s | × dense forward (wall) | × (CPU time) "
             "| peak RSS MiB |", "|---|---|---|---|---|---|---|"]
    for r in rows:
        pruned = "prune_s" in r
        lines.append(
            f"| {r['config']} | {r.get('achieved_sparsity', 0.0):.4f} | {r['perplexity']:.2f} | "
            f"{r['prune_s']:.1f} | {r['ratio_to_dense_forward']:.2f} | {r['cpu_ratio_to_dense_forward']:.2f} | "
            f"{r['peak_rss_mib']:.0f} |" if pruned else
            f"| {r['config']} | 0 | {r['perplexity']:.2f} | – | – | – | {r['peak_rss_mib']:.0f} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--only", nargs="*", choices=list(CONFIGS), help="configurations to (re)run")
    parser.add_argument("--nsamples", type=int, default=128)
    parser.add_argument("--seqlen", type=int, default=512)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--max-windows", type=int, default=None, help="limit evaluation windows (default: all)")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--markdown", action="store_true", help="print the stored results as a Markdown table")
    parser.add_argument("--out", type=Path, default=RESULTS)
    parser.add_argument("--save-models", type=Path, default=None,
                        help="also save each pruned model under this folder (benchmarks/evaluation.py reuses them)")
    args = parser.parse_args()
    if args.child:
        print("RESULT " + json.dumps(run_one(args.child, args.nsamples, args.seqlen, args.batch_size,
                                             args.max_windows, args.save_models)))
        return
    if args.markdown:
        print(markdown_table(json.loads(args.out.read_text())["rows"]))
        return
    if not SOTU.exists():
        sys.exit(f"error: {SOTU} not found (the benchmark needs ../shared/data)")
    previous = json.loads(args.out.read_text()) if args.out.exists() else {"rows": []}
    rows = {r["config"]: r for r in previous["rows"]}
    for name in args.only or list(CONFIGS):
        cmd = [sys.executable, __file__, "--child", name, "--nsamples", str(args.nsamples), "--seqlen",
               str(args.seqlen), "--batch-size", str(args.batch_size)]
        if args.max_windows:
            cmd += ["--max-windows", str(args.max_windows)]
        if args.save_models:
            cmd += ["--save-models", str(args.save_models)]
        print(f"== {name}", file=sys.stderr, flush=True)
        proc = subprocess.run(cmd, stdout=subprocess.PIPE, text=True, check=True)
        line = next(ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT "))
        rows[name] = json.loads(line[len("RESULT "):])
        ordered = [rows[c] for c in CONFIGS if c in rows]
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps({"benchmark": "classic", "rows": ordered,
                                        "protocol": __doc__.split("\n\n")[1]}, indent=2) + "\n")
    print_table([rows[c] for c in CONFIGS if c in rows])


if __name__ == "__main__":
    main()
