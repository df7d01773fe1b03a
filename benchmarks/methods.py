"""Second-generation methods against the classic ones on SmolLM2-135M-Instruct (issue 12).

Protocol: the classic benchmark's calibration (128 windows x 512 tokens of sotu/train.txt, seed 0);
perplexity (pinned protocol, 512-token windows, no BOS) on all of sotu/test.txt and on the Brown genres
learned (j_learned) and general fiction (k_fiction_general), outside the calibration domain; at 50 %,
60 %, 70 % unstructured and 2:4. Every row runs in a fresh process (peak RSS is the row's own) and
measures one dense forward of the whole model over the calibration set just before pruning: prune
time is reported as a ratio to it. GBLM's gradient pass runs once (the first gblm row, timed and
reported on its own) and its cached file serves every gblm row. Rows are kept in the JSON as they
finish: a rerun skips them (resume), `--only`/`--redo` choose rows.

    PRUNEKIT_SHARED_DATA=/work/shared/data python benchmarks/methods.py --only ria-50% alps-50%
    python benchmarks/methods.py --markdown
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from datetime import datetime
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DATA = Path(os.environ.get("PRUNEKIT_SHARED_DATA", ROOT.parent / "shared" / "data"))
SOTU = DATA / "corpora" / "sotu"
EVAL = {"sotu": SOTU / "test.txt", "learned": DATA / "corpora" / "brown" / "j_learned.txt",
        "fiction": DATA / "corpora" / "brown" / "k_fiction_general.txt"}
RESULTS = ROOT / "benchmarks" / "results" / "methods.json"
CACHE = ROOT / "benchmarks" / "results" / "cache"

#: label -> (method, refine, sparsity allocation)
METHODS = {
    "magnitude": ("magnitude", None, None), "wanda": ("wanda", None, None), "sparsegpt": ("sparsegpt", None, None),
    "gblm": ("gblm", None, None), "besa": ("besa", None, None), "ria": ("ria", None, None),
    "alps": ("alps", None, None), "owl+wanda": ("wanda", None, "owl"), "owl+sparsegpt": ("sparsegpt", None, "owl"),
    "wanda+dsnot": ("wanda", "dsnot", None), "sparsegpt+dsnot": ("sparsegpt", "dsnot", None),
}
LEVELS = {"50%": (0.5, None), "60%": (0.6, None), "70%": (0.7, None), "2:4": (0.5, "2:4")}
#: combinations the methods do not define: BESA learns unstructured sparsity, OWL allocates unstructured
UNDEFINED = {("besa", "2:4"), ("owl+wanda", "2:4"), ("owl+sparsegpt", "2:4")}
CONFIGS = ["dense"] + [f"{label}-{level}" for level in LEVELS for label in METHODS
                       if (label, level) not in UNDEFINED]


def _gradient_file(model, calib, row: dict) -> Path:
    """The cached GBLM gradient norms of these calibration windows; computed (and timed) here when missing."""
    import resource

    from prunekit.pruning.gradients import compute_gradient_norms

    ids = calib.input_ids
    path = CACHE / f"gblm_smollm2_{calib.provenance['ids_sha256'][:16]}.safetensors"
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        t0 = time.perf_counter()
        compute_gradient_norms(model, ids, path=path, metadata={"model": "smollm2-135m", **calib.provenance})
        seconds = time.perf_counter() - t0
        row["gradient_pass"] = {"seconds": seconds, "windows": int(ids.shape[0]), "seqlen": int(ids.shape[1]),
                                "seconds_per_window": seconds / ids.shape[0],
                                "peak_rss_mib_after": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
                                "file_mib": path.stat().st_size / 2**20}
    return path


def run_one(name: str, nsamples: int, seqlen: int, batch_size: int, max_windows: int | None,
            threads: int) -> dict:
    import resource

    import torch

    from prunekit.api import prune, versions
    from prunekit.data import build_calibration
    from prunekit.evaluation import perplexity
    from prunekit.models import load_model

    torch.set_num_threads(threads)
    loaded = load_model("smollm2-135m")
    model, tokenizer = loaded.model, loaded.tokenizer
    calib = build_calibration(str(SOTU / "train.txt"), tokenizer, nsamples=nsamples, seqlen=seqlen, seed=0)
    row: dict = {"config": name}
    t0, c0 = time.perf_counter(), time.process_time()
    with torch.no_grad():
        for start in range(0, nsamples, batch_size):
            model(input_ids=calib.input_ids[start : start + batch_size], use_cache=False)
    row["dense_forward_s"] = time.perf_counter() - t0
    row["dense_forward_cpu_s"] = time.process_time() - c0
    if name != "dense":
        label, level = name.rsplit("-", 1)
        method, refine, allocation = METHODS[label]
        sparsity, pattern = LEVELS[level]
        options: dict = {}
        if method == "gblm":
            options["gradients"] = str(_gradient_file(model, calib, row))
        extra = {}
        if allocation is not None:
            extra["sparsity_allocation"] = allocation
        row.update(method=method, refine=refine, allocation=allocation, sparsity=sparsity,
                   pattern=pattern or "unstructured")
        t0, c0 = time.perf_counter(), time.process_time()
        report = prune(model, method=method, refine=refine, sparsity=sparsity, pattern=pattern,
                       calibration=calib.input_ids, batch_size=batch_size, method_options=options, **extra)
        row.update(achieved_sparsity=report.overall_sparsity, method_config=report.method,
                   timings_s=report.engine.timings)
        if report.allocation is not None:  # OWL: outlier ratios and per-block sparsities
            row["allocation_detail"] = report.allocation
        row["prune_s"] = time.perf_counter() - t0
        row["prune_cpu_s"] = time.process_time() - c0
        row["ratio_to_dense_forward"] = row["prune_s"] / row["dense_forward_s"]
        row["cpu_ratio_to_dense_forward"] = row["prune_cpu_s"] / row["dense_forward_cpu_s"]
    for domain, path in EVAL.items():
        t0 = time.perf_counter()
        result = perplexity(model, tokenizer, str(path), seqlen=seqlen, batch_size=batch_size,
                            max_windows=max_windows)
        row[f"ppl_{domain}"] = result.perplexity
        row[f"eval_{domain}"] = {"tokens": result.tokens, "windows": result.windows,
                                 "seconds": time.perf_counter() - t0}
    row.update(peak_rss_mib=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
               calibration={k: calib.provenance.get(k) for k in ("source", "nsamples", "seqlen", "seed",
                                                                  "ids_sha256")},
               versions=versions(), threads=torch.get_num_threads())
    return row


def markdown_table(rows: list[dict]) -> str:
    lines = ["| config | achieved sparsity | sotu ppl | learned ppl | fiction ppl | prune s | × dense forward "
             "| peak RSS MiB |", "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        pruned = "prune_s" in r
        lines.append(f"| {r['config']} | {r.get('achieved_sparsity', 0.0):.4f} | {r['ppl_sotu']:.2f} | "
                     f"{r['ppl_learned']:.2f} | {r['ppl_fiction']:.2f} | "
                     f"{(format(r['prune_s'], '.1f') if pruned else '–')} | "
                     f"{(format(r['ratio_to_dense_forward'], '.2f') if pruned else '–')} | "
                     f"{r['peak_rss_mib']:.0f} |")
    return "\n".join(lines)


def _today_at(hhmm: str) -> datetime:
    try:
        hour, minute = (int(part) for part in hhmm.split(":"))
        return datetime.now().replace(hour=hour, minute=minute, second=0, microsecond=0)
    except ValueError:
        sys.exit(f"error: --start-before {hhmm!r} is not a time; give HH:MM (24-hour, local)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--only", nargs="*", choices=CONFIGS, help="rows to run (default: every missing row)")
    parser.add_argument("--redo", action="store_true", help="rerun rows already in the JSON")
    parser.add_argument("--nsamples", type=int, default=128)
    parser.add_argument("--seqlen", type=int, default=512)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--max-windows", type=int, default=None, help="limit evaluation windows (default: all)")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--markdown", action="store_true", help="print the stored rows as a Markdown table")
    parser.add_argument("--out", type=Path, default=RESULTS)
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1,
                        help="torch threads per row (1 when another job holds the other core)")
    parser.add_argument("--start-before", metavar="HH:MM",
                        help="start no new row after this local time today (a row cut short is lost; "
                             "this ends the run between rows)")
    args = parser.parse_args()
    if args.child:
        row = run_one(args.child, args.nsamples, args.seqlen, args.batch_size, args.max_windows, args.threads)
        print("RESULT " + json.dumps(row))
        return
    from prunekit.files import atomic_write_json

    stored = json.loads(args.out.read_text()) if args.out.exists() else {"rows": []}
    rows = {r["config"]: r for r in stored["rows"]}
    if args.markdown:
        print(markdown_table([rows[c] for c in CONFIGS if c in rows]))
        return
    if not SOTU.exists():
        sys.exit(f"error: {SOTU} not found (set PRUNEKIT_SHARED_DATA to the shared data folder)")
    wanted = args.only or CONFIGS
    deadline = _today_at(args.start_before) if args.start_before else None
    for name in wanted:
        if name in rows and not args.redo:
            continue
        if deadline is not None and datetime.now() >= deadline:
            print(f"== {args.start_before} reached: stopping before {name}", file=sys.stderr, flush=True)
            break
        cmd = [sys.executable, __file__, "--child", name, "--nsamples", str(args.nsamples), "--seqlen",
               str(args.seqlen), "--batch-size", str(args.batch_size), "--out", str(args.out),
               "--threads", str(args.threads)]
        if args.max_windows:
            cmd += ["--max-windows", str(args.max_windows)]
        print(f"== {name}", file=sys.stderr, flush=True)
        proc = subprocess.run(cmd, stdout=subprocess.PIPE, text=True, check=True)
        row = json.loads(next(ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT "))[len("RESULT "):])
        rows[name] = row
        atomic_write_json(args.out, {"benchmark": "methods", "protocol": __doc__.split("\n\n")[1],
                                     "rows": [rows[c] for c in CONFIGS if c in rows]})
    print(markdown_table([rows[c] for c in CONFIGS if c in rows]))


if __name__ == "__main__":
    main()
