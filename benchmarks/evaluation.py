"""Benchmark of the evaluation suite (issue: evaluation that tells the truth).

SmolLM2-135M-Instruct, dense and pruned by magnitude, Wanda and SparseGPT at 50 % unstructured and 2:4,
calibrated as in benchmarks/classic.py (128 windows x 512 tokens of sotu/train.txt, seed 0). The pruned
models saved by `classic.py --save-models benchmarks/results/cache/models` are reused; missing ones are
pruned here with the same protocol and saved there.

For each model, on ../shared/data/corpora/sotu/test.txt:
  * perplexity and Jensen-Shannon divergence / KL / top-1 agreement to the dense model over the same
    512-token windows (the first --windows windows of the pinned perplexity protocol; dense top-1024
    log-probs cached on disk, see prunekit.evaluation.divergence);
  * the two offline zero-shot tasks built from the same text (prunekit_cloze: last word of a passage,
    acc and target perplexity; prunekit_nextsent: true next sentence among 4, acc and acc_norm), run by
    stock lm-eval in process, --examples per task; the wall time per 1000 examples is recorded.
Then: does JSD rank the methods as perplexity does (Kendall tau, and the pairs where they disagree)?

    python benchmarks/evaluation.py                 # about 30 min on 2 CPU cores
    python benchmarks/evaluation.py --markdown      # print the stored results as the README table
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import sys
import time
from pathlib import Path

from classic import saved_model_name  # same folder: the names classic.py saves under

ROOT = Path(__file__).resolve().parents[1]
SOTU = ROOT.parent / "shared" / "data" / "corpora" / "sotu"
RESULTS = ROOT / "benchmarks" / "results" / "evaluation.json"
MODELS = ROOT / "benchmarks" / "results" / "cache" / "models"
CACHE = ROOT / "benchmarks" / "results" / "cache" / "dense-logprobs-sotu-test"
CONFIGS = {
    "dense": (None, None),
    "magnitude-50%": ("magnitude", None), "wanda-50%": ("wanda", None), "sparsegpt-50%": ("sparsegpt", None),
    "magnitude-2:4": ("magnitude", "2:4"), "wanda-2:4": ("wanda", "2:4"), "sparsegpt-2:4": ("sparsegpt", "2:4"),
}
CALIBRATION = {"nsamples": 128, "seqlen": 512, "seed": 0}


def model_folder(name: str) -> Path:
    return MODELS / saved_model_name(name)


def pruned_model(name: str, dense_loaded, batch_size: int):
    """The pruned model for config `name`: from the classic benchmark's folder, or pruned now and saved."""
    from prunekit.api import prune
    from prunekit.data import build_calibration
    from prunekit.export import save_model
    from prunekit.export.save import read_manifest
    from prunekit.models import load_model

    folder = model_folder(name)
    manifest = read_manifest(folder) if folder.exists() else None
    if manifest is not None:
        print(f"[{name}] reusing {folder}", file=sys.stderr, flush=True)
        return load_model(folder).model, manifest.get("prunekit", manifest)
    method, pattern = CONFIGS[name]
    print(f"[{name}] pruning (classic protocol) and saving to {folder}", file=sys.stderr, flush=True)
    calib = build_calibration(str(SOTU / "train.txt"), dense_loaded.tokenizer, **CALIBRATION)
    model = load_model("smollm2-135m").model
    report = prune(model, method=method, sparsity=0.5, pattern=pattern, calibration=calib.input_ids,
                   batch_size=batch_size, progress=True)
    save_model(model, dense_loaded.tokenizer, folder,
               {"prunekit": report.to_dict(), "benchmark": "evaluation", "config": name}, overwrite=True)
    return model, report.to_dict()


def kendall_tau(a: list[float], b: list[float]) -> float:
    """Kendall's tau-a between two score lists (ties count as neither concordant nor discordant)."""
    concordant = discordant = 0
    for i, j in itertools.combinations(range(len(a)), 2):
        s = (a[i] - a[j]) * (b[i] - b[j])
        concordant += s > 0
        discordant += s < 0
    pairs = len(a) * (len(a) - 1) / 2
    return (concordant - discordant) / pairs if pairs else float("nan")


def disagreements(rows: list[dict], first: str, second: str) -> list[str]:
    """Pairs of pruned models that `first` and `second` order differently (both: lower is better)."""
    out = []
    for x, y in itertools.combinations(rows, 2):
        if (x[first] - y[first]) * (x[second] - y[second]) < 0:
            better_first = x if x[first] < y[first] else y
            other = y if better_first is x else x
            out.append(f"{better_first['config']} vs {other['config']}: {first} prefers {better_first['config']}, "
                       f"{second} prefers {other['config']}")
    return out


def evaluate(args) -> dict:
    import torch

    from prunekit.api import versions
    from prunekit.evaluation import cache_reference, divergence, zeroshot
    from prunekit.models import load_model

    torch.set_num_threads(os.cpu_count() or 1)
    dense = load_model("smollm2-135m")
    test = str(SOTU / "test.txt")
    t0 = time.perf_counter()
    reference = cache_reference(dense.model, dense.tokenizer, test, CACHE, seqlen=512, batch_size=args.batch_size,
                                max_windows=args.windows, progress=True)
    dense_cache_s = time.perf_counter() - t0
    rows = []
    for name in CONFIGS:
        if name == "dense":
            model, manifest = dense.model, None
        else:
            model, manifest = pruned_model(name, dense, args.batch_size)
        div = divergence(model, reference, tokenizer=dense.tokenizer, progress=True)
        shot = zeroshot(model, dense.tokenizer, local_source=test, local_n=args.examples, batch_size=args.batch_size,
                        seed=0)
        cloze, nextsent = shot.tasks["prunekit_cloze"], shot.tasks["prunekit_nextsent"]
        row = {
            "config": name, "method": CONFIGS[name][0] or "dense", "pattern": CONFIGS[name][1] or "unstructured",
            "achieved_sparsity": manifest.get("overall_sparsity", 0.5) if manifest else 0.0,
            "perplexity": div.perplexity, "jsd_mean": div.jsd_mean, "jsd_median": div.jsd_median,
            "jsd_p95": div.jsd_p95, "kl_mean": div.kl_mean, "top1_agreement": div.top1_agreement,
            "divergence_tokens": div.tokens, "divergence_s": div.seconds, "tail_mass_mean": div.tail_mass_mean,
            "cloze_acc": cloze.get("acc"), "cloze_acc_stderr": cloze.get("acc_stderr"),
            "cloze_target_ppl": cloze.get("perplexity"), "cloze_n": cloze.get("n"),
            "nextsent_acc": nextsent.get("acc"), "nextsent_acc_stderr": nextsent.get("acc_stderr"),
            "nextsent_acc_norm": nextsent.get("acc_norm"), "nextsent_acc_norm_stderr": nextsent.get("acc_norm_stderr"),
            "nextsent_n": nextsent.get("n"), "zeroshot_s": shot.seconds, "zeroshot_examples": shot.examples,
            "zeroshot_s_per_1000": shot.seconds_per_1000, "zeroshot_batch_size": shot.batch_size,
            "jsd_histogram": div.histogram,
        }
        rows.append(row)
        print(f"[{name}] ppl {row['perplexity']:.2f}  JSD {row['jsd_mean']:.4f}  top-1 {row['top1_agreement']:.3f}  "
              f"cloze {row['cloze_acc']:.3f}  nextsent {row['nextsent_acc']:.3f}/{row['nextsent_acc_norm']:.3f}  "
              f"zero-shot {row['zeroshot_s_per_1000']:.1f} s/1000", file=sys.stderr, flush=True)
        if name != "dense":
            del model
    pruned = [r for r in rows if r["config"] != "dense"]
    for r in pruned:  # lower is better for every ranking key
        r["neg_cloze_acc"], r["neg_nextsent_acc"] = -r["cloze_acc"], -r["nextsent_acc"]
    ranking = {
        "by_perplexity": [r["config"] for r in sorted(pruned, key=lambda r: r["perplexity"])],
        "by_jsd": [r["config"] for r in sorted(pruned, key=lambda r: r["jsd_mean"])],
        "kendall_tau_ppl_jsd": kendall_tau([r["perplexity"] for r in pruned], [r["jsd_mean"] for r in pruned]),
        "disagreements_ppl_jsd": disagreements(pruned, "perplexity", "jsd_mean"),
        "kendall_tau_jsd_cloze": kendall_tau([r["jsd_mean"] for r in pruned], [r["neg_cloze_acc"] for r in pruned]),
        "kendall_tau_ppl_cloze": kendall_tau([r["perplexity"] for r in pruned], [r["neg_cloze_acc"] for r in pruned]),
        "kendall_tau_jsd_nextsent": kendall_tau([r["jsd_mean"] for r in pruned],
                                                [r["neg_nextsent_acc"] for r in pruned]),
        "kendall_tau_ppl_nextsent": kendall_tau([r["perplexity"] for r in pruned],
                                                [r["neg_nextsent_acc"] for r in pruned]),
    }
    for r in pruned:
        del r["neg_cloze_acc"], r["neg_nextsent_acc"]
    return {
        "benchmark": "evaluation", "protocol": __doc__.split("\n\n")[1:3], "rows": rows, "ranking": ranking,
        "dense_cache_s": dense_cache_s, "windows": args.windows, "examples_per_task": args.examples,
        "versions": versions(), "threads": torch.get_num_threads(),
    }


def markdown(result: dict) -> str:
    """The README's table plus the ranking sentence."""
    lines = ["| model | perplexity | JSD mean | JSD median | JSD p95 | KL | top-1 agree | cloze acc | "
             "nextsent acc | nextsent acc_norm | zero-shot s / 1000 ex |", "|---|" + "---|" * 10]
    for r in result["rows"]:
        lines.append(
            f"| {r['config']} | {r['perplexity']:.2f} | {r['jsd_mean']:.4f} | {r['jsd_median']:.4f} | "
            f"{r['jsd_p95']:.4f} | {r['kl_mean']:.3f} | {r['top1_agreement']:.3f} | "
            f"{r['cloze_acc']:.3f} ± {r['cloze_acc_stderr']:.3f} | {r['nextsent_acc']:.3f} ± "
            f"{r['nextsent_acc_stderr']:.3f} | {r['nextsent_acc_norm']:.3f} | {r['zeroshot_s_per_1000']:.1f} |")
    rank = result["ranking"]
    lines += ["", f"By perplexity: {' < '.join(rank['by_perplexity'])}.  ",
              f"By JSD: {' < '.join(rank['by_jsd'])}.  ",
              f"Kendall tau (perplexity vs JSD) = {rank['kendall_tau_ppl_jsd']:.2f}; "
              f"vs cloze accuracy: perplexity {rank['kendall_tau_ppl_cloze']:.2f}, "
              f"JSD {rank['kendall_tau_jsd_cloze']:.2f}; "
              f"vs next-sentence accuracy: perplexity {rank['kendall_tau_ppl_nextsent']:.2f}, "
              f"JSD {rank['kendall_tau_jsd_nextsent']:.2f}."]
    if rank["disagreements_ppl_jsd"]:
        lines += ["", "Where perplexity and JSD disagree:"] + [f"- {d}" for d in rank["disagreements_ppl_jsd"]]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--windows", type=int, default=64, help="512-token windows of sotu/test for ppl and JSD")
    parser.add_argument("--examples", type=int, default=300, help="examples per offline zero-shot task")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--out", type=Path, default=RESULTS)
    parser.add_argument("--markdown", action="store_true", help="print the stored results as a Markdown table")
    args = parser.parse_args()
    if args.markdown:
        print(markdown(json.loads(args.out.read_text())))
        return
    if not SOTU.exists():
        sys.exit(f"error: {SOTU} not found (the benchmark needs ../shared/data)")
    result = evaluate(args)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    tmp = args.out.with_suffix(".json.partial")
    tmp.write_text(json.dumps(result, indent=2) + "\n")
    tmp.replace(args.out)
    print(markdown(result))


if __name__ == "__main__":
    main()
