"""Benchmark of PERP retraining (`prunekit retrain`) on SmolLM2-135M-Instruct pruned models.

Inputs: SmolLM2-135M pruned with the classic benchmark's calibration (128 x 512 tokens of sotu/train.txt,
seed 0) by `prunekit prune` (magnitude, Wanda, SparseGPT at 50 % and 2:4; FLAP at 30 %), made here when
missing. Each row retrains one input with one parameter set on windows of sotu/train.txt and measures, on
the saved and reloaded model, perplexity on sotu/test.txt (the first 64 non-overlapping 512-token windows,
32,704 predicted tokens, no BOS, as benchmarks/evaluation.py; all 314 windows cost 5x more CPU than these
shared cores allow per row) and on Brown (out of domain: the first 6,000 characters of each of the 15
genres, 512-token windows), plus trainable fraction, wall time and peak RSS (each row in a fresh process).
Dense and the pruned inputs are measured in the same run on the same windows. "gap closed" is the share of
the pruning loss recovered on SOTU test: (before - after) / (before - dense).

Resumable: finished rows are kept in the JSON and skipped; an interrupted row resumes from its checkpoint.

    python benchmarks/retrain.py                          # every row, in priority order
    python benchmarks/retrain.py --only magnitude-50/+lora wanda-50/+lora
    python benchmarks/retrain.py --table                  # print the README table from the JSON
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
#: ../shared beside the repository, or $PRUNEKIT_SHARED (a worktree elsewhere).
CORPORA = Path(os.environ.get("PRUNEKIT_SHARED", ROOT.parent / "shared")) / "data" / "corpora"
SOTU = CORPORA / "sotu"
RESULTS = ROOT / "benchmarks" / "results" / "retrain.json"
CACHE = ROOT / "benchmarks" / "results" / "cache"
INPUTS = {
    "magnitude-50": ["--method", "magnitude", "--sparsity", "0.5"],
    "wanda-50": ["--method", "wanda", "--sparsity", "0.5"],
    "sparsegpt-50": ["--method", "sparsegpt", "--sparsity", "0.5"],
    "magnitude-2:4": ["--method", "magnitude", "--sparsity", "0.5", "--pattern", "2:4"],
    "wanda-2:4": ["--method", "wanda", "--sparsity", "0.5", "--pattern", "2:4"],
    "sparsegpt-2:4": ["--method", "sparsegpt", "--sparsity", "0.5", "--pattern", "2:4"],
    "flap-30": ["--method", "flap", "--sparsity", "0.3"],
}
SOTU_WINDOWS = 64
SETS = {"bias+norm": ["bias", "norm"], "+head": ["bias", "norm", "head"], "+lora": ["bias", "norm", "head", "lora"]}
#: Priority order: the issue's two targets first, then the parameter-set ablation, then the other inputs.
ROWS = ["magnitude-50/+lora", "wanda-50/+lora", "magnitude-50/bias+norm", "magnitude-50/+head",
        "flap-30/+lora", "sparsegpt-50/+lora", "wanda-2:4/+lora", "magnitude-2:4/+lora", "sparsegpt-2:4/+lora",
        "wanda-50/bias+norm", "wanda-50/+head"]


def input_dir(name: str) -> Path:
    return CACHE / "retrain_inputs" / name.replace(":", "-")


def ensure_input(name: str) -> Path:
    """Prune the input with the current CLI when it is not there yet."""
    folder = input_dir(name)
    if not (folder / "prunekit.json").is_file():
        subprocess.run([sys.executable, "-m", "prunekit.cli", "prune", "smollm2-135m", *INPUTS[name], "--calib",
                        str(SOTU / "train.txt"), "--nsamples", "128", "--seqlen", "512", "--seed", "0", "--out",
                        str(folder), "--overwrite"], check=True)
    return folder


def brown_documents() -> list[str]:
    return [path.read_text(encoding="utf-8")[:6000] for path in sorted((CORPORA / "brown").glob("*.txt"))]


def evaluate(model, tokenizer) -> dict:
    from prunekit.evaluation import perplexity

    sotu = perplexity(model, tokenizer, str(SOTU / "test.txt"), seqlen=512, batch_size=8, max_windows=SOTU_WINDOWS)
    brown = perplexity(model, tokenizer, brown_documents(), seqlen=512, batch_size=8)
    return {"sotu": sotu.perplexity, "sotu_tokens": sotu.tokens, "brown": brown.perplexity,
            "brown_tokens": brown.tokens}


def child_baseline(name: str) -> dict:
    import prunekit

    loaded = prunekit.load("smollm2-135m" if name == "dense" else str(input_dir(name)))
    return evaluate(loaded.model, loaded.tokenizer)


def child_row(key: str, budget: dict) -> dict:
    import resource

    import prunekit

    name, params = key.split("/")
    out = CACHE / "retrain_outputs" / key.replace("/", "_").replace(":", "-").replace("+", "plus_")
    kind = "lora" if name.startswith("flap") or name == "dense" else "mask_lora"
    settings = {"params": SETS[params], "lora_kind": kind, **budget}
    manifest = out / "prunekit.json"
    done = json.loads(manifest.read_text()).get("retraining") if manifest.is_file() else None
    if done and all(done["settings"][k] == v for k, v in settings.items()):
        record = done  # trained by an earlier, interrupted benchmark run: only the evaluation is left
    else:
        record = prunekit.retrain(input_dir(name), out, calib=str(SOTU / "train.txt"), overwrite=True, resume=True,
                                  save_every=25, progress=False, log=lambda m: print(m, file=sys.stderr),
                                  **settings).record
    loaded = prunekit.load(str(out))
    return {"input": name, "params": params, "lora_kind": kind if "lora" in SETS[params] else None,
            **evaluate(loaded.model, loaded.tokenizer),
            "trainable": record["parameters"]["trainable"], "trainable_fraction": record["parameters"]
            ["trainable_fraction"], "train_s": record["seconds"]["train"], "retrain_total_s": record["seconds"]
            ["total"], "peak_rss_mib": max(record["memory"]["peak_rss_mib"],
                                 resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024),
            "loss_first": record["loss_curve"][0], "loss_last10": sum(record["loss_curve"][-10:]) / 10,
            "mask_kept": record["mask"]["kept"], "zero_fraction": record["mask"]["zero_fraction_after"],
            "resumed_at_step": record["resumed_at_step"], "tokens": record["steps"] * record["data"]["tokens_per_step"]}


PARAM_LABELS = {"bias+norm": "bias+norm", "+head": "bias+norm+head", "+lora": "bias+norm+head+LoRA"}


def table(results: dict) -> str:
    """Rows grouped by input; gap closed = (before − after) / (before − dense), on SOTU and on Brown."""
    base = results["baselines"]
    dense = base["dense"]
    lines = ["| input | parameters | trainable | SOTU ppl before → after | gap closed | Brown ppl before → after "
             "| Brown gap closed | wall s | peak RSS MiB |", "|---|---|---|---|---|---|---|---|---|",
             f"| dense | – | – | {dense['sotu']:.2f} | – | {dense['brown']:.2f} | – | – | – |"]
    rows = [results["rows"][key] for key in ROWS if key in results["rows"]]
    order = list(dict.fromkeys(row["input"] for row in rows))
    for row in sorted(rows, key=lambda r: (order.index(r["input"]), list(PARAM_LABELS).index(r["params"]))):
        before = base[row["input"]]
        gap = {k: (before[k] - row[k]) / (before[k] - dense[k]) for k in ("sotu", "brown")}
        kind = f" ({row['lora_kind']})" if row.get("lora_kind") else ""
        resumed = " (resumed)" if row.get("resumed_at_step") else ""
        lines.append(f"| {row['input']} | {PARAM_LABELS.get(row['params'], row['params'])}{kind} | "
                     f"{row['trainable_fraction']:.2%} | {before['sotu']:.2f} → **{row['sotu']:.2f}** | "
                     f"{gap['sotu']:.0%} | {before['brown']:.2f} → {row['brown']:.2f} | {gap['brown']:.0%} | "
                     f"{row['retrain_total_s']:.0f}{resumed} | {row['peak_rss_mib']:.0f} |")
    return "\n".join(lines)


def run_child(args: list[str]) -> dict:
    proc = subprocess.run([sys.executable, __file__, *args], stdout=subprocess.PIPE, text=True, check=True)
    line = [x for x in proc.stdout.splitlines() if x.startswith("RESULT ")][-1]
    return json.loads(line[len("RESULT "):])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", nargs="*", help="row keys INPUT/SET (default: all, in priority order)")
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--seqlen", type=int, default=256)
    parser.add_argument("--lr", type=float, default=5e-4)
    parser.add_argument("--threads", type=int, default=1,
                        help="torch threads per row (1: on shared cores two OpenMP threads mostly wait)")
    parser.add_argument("--table", action="store_true", help="print the README table from the JSON and exit")
    parser.add_argument("--child-row", help=argparse.SUPPRESS)
    parser.add_argument("--child-baseline", help=argparse.SUPPRESS)
    args = parser.parse_args()
    budget = {"steps": args.steps, "batch_size": args.batch_size, "seqlen": args.seqlen, "lr": args.lr}
    if args.child_row or args.child_baseline:
        import torch

        torch.set_num_threads(args.threads)
    if args.child_row:
        print("RESULT " + json.dumps({**child_row(args.child_row, budget), "threads": args.threads}))
        return
    if args.child_baseline:
        print("RESULT " + json.dumps(child_baseline(args.child_baseline)))
        return
    from prunekit.files import atomic_write_json

    results = json.loads(RESULTS.read_text()) if RESULTS.exists() else {"baselines": {}, "rows": {}}
    if args.table:
        print(table(results))
        return
    results["protocol"] = {
        "model": "smollm2-135m", "train": "sotu/train.txt windows, seeded", "budget": budget,
        "tokens_per_row": args.steps * args.batch_size * args.seqlen,
        "eval": f"sotu/test.txt first {SOTU_WINDOWS} 512-token windows; Brown: first 6,000 chars of each of 15 "
                "genres, 512-token windows; no BOS", "inputs": "prunekit prune, calib sotu/train.txt 128 x 512, seed 0"}
    for key in args.only or ROWS:
        name = key.split("/")[0]
        for needed in ("dense", name):
            if needed not in results["baselines"]:
                if needed != "dense":
                    ensure_input(needed)
                results["baselines"][needed] = run_child(["--child-baseline", needed])
                atomic_write_json(RESULTS, results)
        if key in results["rows"]:
            continue
        ensure_input(name)
        results["rows"][key] = run_child(["--child-row", key, "--steps", str(args.steps), "--batch-size",
                                          str(args.batch_size), "--seqlen", str(args.seqlen), "--lr", str(args.lr)])
        atomic_write_json(RESULTS, results)
        print(table(results), flush=True)


if __name__ == "__main__":
    main()
