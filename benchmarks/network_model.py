"""What data-parallel calibration sends per block, and when it stops paying: a model, not a measurement.

Bytes come from prunekit's own statistics (their accumulators at the real shapes, allocated on the meta
device) and the block's linears; times assume a ring all-reduce (2(W-1)/W of the bytes through each link) for
Wanda, whose ranks all decide, a ring reduce to rank 0 ((W-1)/W) for SparseGPT, whose rank 0 decides alone, and a
pipelined broadcast (the bytes once per link), at 25 / 100 / 400 Gb/s. Compute per block assumes a GPU sustaining
`--tflops` (default 200, an H100 in bf16 at about half its peak) on the calibration forward passes
(2 x parameters x tokens FLOPs per pass; Wanda: 2 passes, SparseGPT: 2 passes plus the OBS updates, modelled by
their FLOPs, 2 x rows x cols^2 per linear, run once on rank 0: a lower bound, the column loop is latency-bound in
practice, which only makes the network matter less). Prints a Markdown table and writes
benchmarks/results/network_model.json.

    python benchmarks/network_model.py [--tokens 262144] [--tflops 200]
"""

from __future__ import annotations

import argparse
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results" / "network_model.json"
SHAPES = {"Llama-2-7B": {"hidden": 4096, "inter": 11008, "heads": 32, "kv": 32, "layers": 32},
          "Llama-2-70B": {"hidden": 8192, "inter": 28672, "heads": 64, "kv": 8, "layers": 80}}
LINKS_GBPS = (25, 100, 400)
RANKS = (2, 4, 8, 16, 64)


def block_linears(shape: dict) -> list[tuple[int, int]]:
    """(rows, cols) of q, k, v, o, gate, up, down."""
    h, i, d = shape["hidden"], shape["inter"], shape["hidden"] // shape["heads"]
    kv = shape["kv"] * d
    return [(h, h), (kv, h), (kv, h), (h, h), (i, h), (i, h), (h, i)]


def statistics_bytes(shape: dict, method: str) -> int:
    from prunekit.methods import build_method

    statistic = build_method(method).statistic
    widths = [shape["hidden"], shape["hidden"], shape["hidden"], shape["inter"]]  # qkv, o, gate/up, down inputs
    return sum(statistic(w, device="meta").nbytes for w in widths)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokens", type=int, default=128 * 2048, help="calibration tokens (the papers: 128 x 2048)")
    parser.add_argument("--tflops", type=float, default=200.0)
    args = parser.parse_args()
    rows = []
    for model, shape in SHAPES.items():
        linears = block_linears(shape)
        params = sum(r * c for r, c in linears)
        for method in ("wanda", "sparsegpt"):
            reduced = statistics_bytes(shape, method)
            broadcast = params * 4 if method == "sparsegpt" else 0  # fp32 pruned linears from rank 0
            forward = 2 * 2 * params * args.tokens  # two passes over the calibration tokens
            obs = sum(2 * r * c * c for r, c in linears) if method == "sparsegpt" else 0.0
            flops = forward + obs
            for ranks in RANKS:
                compute = (forward / ranks + obs) / (args.tflops * 1e12)  # the OBS loop runs once, on rank 0
                row = {"model": model, "method": method, "ranks": ranks, "reduced_mb": reduced / 1e6,
                       "broadcast_mb": broadcast / 1e6, "compute_s": compute}
                for gbps in LINKS_GBPS:
                    bandwidth = gbps * 1e9 / 8
                    hops = (1 if method == "sparsegpt" else 2) * (ranks - 1) / ranks  # reduce vs all-reduce
                    row[f"network_s_{gbps}"] = (hops * reduced + broadcast) / bandwidth
                single = flops / (args.tflops * 1e12)
                row["speedup_25"] = single / (compute + row["network_s_25"])
                row["speedup_400"] = single / (compute + row["network_s_400"])
                rows.append(row)
    lines = ["| model | method | ranks | reduced MB/block | broadcast MB/block | compute s/block | network s/block "
             "(25 / 100 / 400 Gb/s) | speed-up at 25 / 400 Gb/s |", "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['model']} | {r['method']} | {r['ranks']} | {r['reduced_mb']:.2f} | "
                     f"{r['broadcast_mb']:.0f} | {r['compute_s']:.3f} | {r['network_s_25']:.3f} / "
                     f"{r['network_s_100']:.3f} / {r['network_s_400']:.4f} | {r['speedup_25']:.2f} / "
                     f"{r['speedup_400']:.2f} |")
    print("\n".join(lines))
    from prunekit.files import atomic_write_json

    atomic_write_json(RESULTS, {"assumptions": vars(args) | {"links_gbps": LINKS_GBPS}, "rows": rows})


if __name__ == "__main__":
    main()
