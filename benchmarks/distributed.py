"""Data-parallel calibration on one machine (issue: beyond one machine): overhead and correctness, not speed.

SmolLM2-135M, Wanda and SparseGPT 50 %, calibration 128 x 512 of sotu/train.txt (seed 0), streamed CLI runs:
one process with 2 torch threads against `torchrun --nproc-per-node 2` with 1 thread each (gloo), same machine.
Two cores give no speed-up to expect; the table shows the wall time of each, the bytes reduced (all-reduced for
Wanda, reduced to rank 0 for SparseGPT) and broadcast per block, whether the masks are identical and the
perplexity on the first 64 windows of sotu/test.txt.

    python benchmarks/distributed.py [--only wanda sparsegpt]
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
CACHE = ROOT / "benchmarks" / "results" / "cache" / "distributed"
RESULTS = ROOT / "benchmarks" / "results" / "distributed.json"


def run(command: list[str], threads: int) -> float:
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src"), "OMP_NUM_THREADS": str(threads)}
    started = time.perf_counter()
    result = subprocess.run(command, env=env, capture_output=True, text=True, check=False)
    if result.returncode != 0:
        raise RuntimeError(f"{command[:6]} failed:\n{result.stderr[-3000:]}")
    return time.perf_counter() - started


def masks(folder: Path) -> dict:
    from safetensors import safe_open

    out = {}
    for path in folder.glob("*.safetensors"):
        with safe_open(str(path), "pt") as handle:
            for key in handle.keys():  # noqa: SIM118
                out[key] = handle.get_tensor(key) == 0
    return out


def perplexity(folder: Path) -> float:
    command = [sys.executable, "-m", "prunekit", "eval", str(folder), "--ppl", str(SOTU / "test.txt"), "--seqlen",
               "512", "--max-windows", "64", "--json"]
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src")}
    result = subprocess.run(command, env=env, capture_output=True, text=True, check=True)
    return json.loads(result.stdout.strip().splitlines()[-1])["perplexity"]


def measure(method: str) -> dict:
    common = ["prune", "smollm2-135m", "--method", method, "--sparsity", "0.5", "--calib", str(SOTU / "train.txt"),
              "--nsamples", "128", "--seqlen", "512", "--seed", "0", "--overwrite"]
    one, two = CACHE / f"{method}-1x2", CACHE / f"{method}-2x1"
    single = run([sys.executable, "-m", "prunekit", *common, "--out", str(one)], threads=2)
    parallel = run([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-port", "29533",
                    "-m", "prunekit", *common, "--out", str(two)], threads=1)
    a, b = masks(one), masks(two)
    agreement = min(float((a[k] == b[k]).float().mean()) for k in a)
    manifest = json.loads((two / "prunekit.json").read_text())
    blocks = manifest["model"]["num_layers"]
    return {"one_process_2_threads_s": single, "torchrun_2x1_s": parallel, "overhead": parallel / single,
            "identical_masks": agreement == 1.0, "min_mask_agreement": agreement,
            "reduced_bytes_per_block": manifest["distributed"]["bytes_reduced"] / blocks,
            "broadcast_bytes_per_block": manifest["distributed"]["bytes_broadcast"] / blocks,
            "perplexity_one_process": perplexity(one), "perplexity_torchrun": perplexity(two),
            "measured_at": time.strftime("%Y-%m-%d %H:%M")}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--only", nargs="+", choices=("wanda", "sparsegpt"), default=["wanda", "sparsegpt"])
    args = parser.parse_args()
    from prunekit.files import atomic_write_json

    results = json.loads(RESULTS.read_text()) if RESULTS.is_file() else {}
    for method in args.only:
        results[method] = measure(method)
        atomic_write_json(RESULTS, results)
    print("| method | 1 process x 2 threads s | torchrun 2 x 1 thread s | reduced MB/block | broadcast MB/block "
          "| identical masks | perplexity (1 process / torchrun) |")
    print("|---|---|---|---|---|---|---|")
    for method, r in results.items():
        print(f"| {method} | {r['one_process_2_threads_s']:.0f} | {r['torchrun_2x1_s']:.0f} | "
              f"{r['reduced_bytes_per_block'] / 1e6:.3f} | {r['broadcast_bytes_per_block'] / 1e6:.1f} | "
              f"{r['identical_masks']} ({r['min_mask_agreement']:.6f}) | {r['perplexity_one_process']:.3f} / "
              f"{r['perplexity_torchrun']:.3f} |")


if __name__ == "__main__":
    main()
