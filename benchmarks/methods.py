"""Second-generation methods against the classic ones on SmolLM2-135M-Instruct (issue 12).

Protocol: the classic benchmark's calibration (128 windows x 512 tokens of sotu/train.txt, seed 0);
perplexity (pinned protocol, 512-token windows, no BOS) on all of sotu/test.txt and on the Brown genres
learned (j_learned) and general fiction (k_fiction_general), outside the calibration domain; at 50 %,
60 %, 70 % unstructured and 2:4. Every row runs in a fresh process (peak RSS is the row's own) and
measures one dense forward of the whole model over the calibration set just before pruning: prune
time is reported as a ratio to it. GBLM's gradient pass runs once (the first gblm row, timed and
reported on its own) and its cached file serves every gblm row. Rows are kept in the JSON as they
finish: a rerun skips them (resume), `--only`/`--redo` choose rows. Rows whose method the installed
prunekit cannot run yet (OWL before `sparsity_allocation` exists) are skipped and reported.

    PRUNEKIT_SHARED_DATA=/work/shared/data python benchmarks/methods.py --only ria-50% alps-50%
    python benchmarks/methods.py --markdown
"""

from __future__ import annotations

import argparse
import inspect
import json
import os
import subprocess
import sys
import time
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


class Skipped(Exception):
    """This prunekit cannot run the row yet."""


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


def _besa_by_blocks(model, ids, sparsity: float, batch_size: int):
    """BESA block by block with pruned propagation, for as long as the engine has no block hook."""
    import torch

    from prunekit.adapters import get_adapter
    from prunekit.engine.capture import capture_block_calls, capture_block_inputs
    from prunekit.methods.besa import besa_prune_block
    from prunekit.pruning import SparsityTarget

    adapter = get_adapter(model)
    blocks = adapter.blocks()
    calls = capture_block_calls(model, blocks, ids.shape[1], "cpu")
    acts = capture_block_inputs(model, blocks, ids, batch_size, "cpu")
    pruned = total = 0
    for index, block in enumerate(blocks):
        call = calls[index]

        def forward(hidden, block=block, call=call):
            out = block(hidden, *call.args, **call.kwargs)
            return out[0] if isinstance(out, (tuple, list)) else out

        linears = {n: m for _g, mods in adapter.block_linears(block) for n, m in mods.items()}
        batches = [acts[i : i + batch_size] for i in range(0, acts.shape[0], batch_size)]
        masks = besa_prune_block(linears, forward, batches, None, {n: SparsityTarget(sparsity) for n in linears},
                                 progress=lambda line, i=index: print(f"block {i}: {line}", file=sys.stderr,
                                                                      flush=True))
        with torch.no_grad():
            for name, module in linears.items():
                module.weight.masked_fill_(masks[name], 0.0)
                pruned += int(masks[name].sum())
                total += masks[name].numel()
            for i in range(0, acts.shape[0], batch_size):
                acts[i : i + batch_size] = forward(acts[i : i + batch_size])
    return pruned / total


def run_one(name: str, nsamples: int, seqlen: int, batch_size: int, max_windows: int | None,
            threads: int) -> dict:
    import resource

    import torch

    from prunekit.api import prune, versions
    from prunekit.data import build_calibration
    from prunekit.errors import PrunekitError
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
            if "sparsity_allocation" not in inspect.signature(prune).parameters:
                raise Skipped("prunekit.prune has no sparsity_allocation yet (OWL is wired by the engine)")
            extra["sparsity_allocation"] = allocation
        row.update(method=method, refine=refine, allocation=allocation, sparsity=sparsity,
                   pattern=pattern or "unstructured")
        t0, c0 = time.perf_counter(), time.process_time()
        try:
            report = prune(model, method=method, refine=refine, sparsity=sparsity, pattern=pattern,
                           calibration=calib.input_ids, batch_size=batch_size, method_options=options, **extra)
            row.update(achieved_sparsity=report.overall_sparsity, method_config=report.method,
                       timings_s=report.engine.timings)
        except PrunekitError as exc:
            if method != "besa" or "block hook" not in str(exc):
                raise
            row.update(achieved_sparsity=_besa_by_blocks(model, calib.input_ids, sparsity, batch_size),
                       driver="benchmarks/methods.py block loop (engine block hook pending)")
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
    args = parser.parse_args()
    if args.child:
        try:
            row = run_one(args.child, args.nsamples, args.seqlen, args.batch_size, args.max_windows, args.threads)
        except Skipped as exc:
            row = {"config": args.child, "skipped": str(exc)}
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
    for name in wanted:
        if name in rows and not args.redo:
            continue
        cmd = [sys.executable, __file__, "--child", name, "--nsamples", str(args.nsamples), "--seqlen",
               str(args.seqlen), "--batch-size", str(args.batch_size), "--out", str(args.out),
               "--threads", str(args.threads)]
        if args.max_windows:
            cmd += ["--max-windows", str(args.max_windows)]
        print(f"== {name}", file=sys.stderr, flush=True)
        proc = subprocess.run(cmd, stdout=subprocess.PIPE, text=True, check=True)
        row = json.loads(next(ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT "))[len("RESULT "):])
        if "skipped" in row:
            print(f"   skipped: {row['skipped']}", file=sys.stderr)
            continue
        rows[name] = row
        atomic_write_json(args.out, {"benchmark": "methods", "protocol": __doc__.split("\n\n")[1],
                                     "rows": [rows[c] for c in CONFIGS if c in rows]})
    print(markdown_table([rows[c] for c in CONFIGS if c in rows]))


if __name__ == "__main__":
    main()
