"""FLAP's head scores: the reference rule (attention metric squared before standardising) against the
unsquared rule prunekit used before, side by side on SmolLM2-135M-Instruct.

Protocol of benchmarks/structured.py: statistics of 1024 x 128 tokens of sotu/train.txt, seed 0 (cached in
benchmarks/results/cache/ and shared with it); FLAP with WIFV, AL-AM and bias compensation; perplexity over
the first 64 non-overlapping 512-token windows of sotu/test.txt. Per ratio the two plans differ only in how
heads are scored. Writes benchmarks/results/flap_head_scores.json.

    python benchmarks/flap_head_scores.py [--ratios 0.2,0.3] [--eval-windows 64]
"""

from __future__ import annotations

import argparse
import copy
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from structured import METHODS, SOTU, calibration_stats, log, ppl

RESULTS = Path(__file__).resolve().parent / "results" / "flap_head_scores.json"
RULES = {"reference (squared)": True, "unsquared (before)": False}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--ratios", default="0.2,0.3")
    parser.add_argument("--eval-windows", type=int, default=64)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    from prunekit.api import versions
    from prunekit.files import atomic_write_json
    from prunekit.methods import build_method
    from prunekit.models import load_model
    from prunekit.structured import apply_plan, get_structure

    loaded = load_model("smollm2-135m")
    stats, meta = calibration_stats(loaded, 1024, 128, 32)
    rows = []
    for ratio in (float(r) for r in args.ratios.split(",")):
        for rule, squared in RULES.items():
            method = build_method("flap", METHODS["flap"])
            method.square_heads = squared
            model = copy.deepcopy(loaded.model)
            structure = get_structure(model)
            plan = method.plan(structure, stats, ratio)
            apply_plan(model, structure, plan)
            t0 = time.perf_counter()
            value = ppl(model, loaded.tokenizer, str(SOTU / "test.txt"), args.eval_windows)
            heads = sum(len(layer.heads) for layer in plan.layers)
            rows.append({"ratio": ratio, "rule": rule, "achieved": plan.achieved, "perplexity": value,
                         "query_heads_kept": heads, "eval_seconds": time.perf_counter() - t0})
            log(f"flap-{ratio:g} {rule}: achieved {plan.achieved:.4f}, {heads} query heads kept, ppl {value:.2f}")
            del model
    atomic_write_json(RESULTS, {"protocol": {"calibration": meta, "evaluation": str(SOTU / "test.txt"),
                                             "eval_windows": args.eval_windows, "seqlen": 512,
                                             "method": METHODS["flap"], "versions": versions()},
                                "rows": rows})
    print("| ratio | head score | achieved | query heads kept | perplexity |\n|---|---|---|---|---|")
    for row in rows:
        print(f"| {row['ratio']:.1f} | {row['rule']} | {row['achieved']:.4f} | {row['query_heads_kept']} "
              f"| {row['perplexity']:.2f} |")
    print(f"wrote {RESULTS}")


if __name__ == "__main__":
    main()
