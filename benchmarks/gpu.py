"""The GPU path in one command, within about 5 minutes on one GPU (issue: the GPU path end to end).

1. SmolLM2-135M (the alias when its cache is there; else a seeded random-init model of its exact shape, since a
   lent GPU machine reaches no package index) pruned by Wanda and SparseGPT at 50 % and 2:4 with the streamed CLI
   on CUDA and on the CPU: masks compared, perplexity (SOTU text embedded in the package, 32 x 512 tokens) within
   0.5 %.
2. `prunekit eval --device cuda` against the CPU's perplexity of the same dense model.
3. 2:4 on torch's semi-structured sparse kernels: a stack of Llama-2-7B-shaped MLP linears (4096 -> 11008 -> 4096,
   fp16, magnitude 2:4) timed dense vs `to_sparse_semi_structured` on 4096 tokens.

    python benchmarks/gpu.py          # writes benchmarks/results/gpu.json and prints a table
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
EMBEDDED = ROOT / "src" / "prunekit" / "data" / "embedded" / "sotu_2020_2021.txt"
WORK = ROOT / "benchmarks" / "results" / "cache" / "gpu"
RESULTS = ROOT / "benchmarks" / "results" / "gpu.json"
CONFIGS = (("wanda", "unstructured"), ("sparsegpt", "unstructured"), ("wanda", "2:4"), ("sparsegpt", "2:4"))


def model_folder() -> tuple[str, str]:
    """The real SmolLM2 if its cache is here, else a random-init folder of its shape (stated in the results)."""
    from prunekit.models import model_cache_dir

    cached = model_cache_dir() / "models" / "smollm2-135m"
    if (cached / "config.json").is_file():
        return str(cached), "SmolLM2-135M-Instruct (cached alias)"
    folder = WORK / "smollm2-shaped-random"
    if not (folder / "config.json").is_file():
        from transformers import AutoModelForCausalLM, LlamaConfig

        sys.path.insert(0, str(ROOT / "tests"))
        from tiny import make_tokenizer

        torch.manual_seed(0)
        config = LlamaConfig(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
                             num_attention_heads=9, num_key_value_heads=3, max_position_embeddings=8192,
                             tie_word_embeddings=True, rope_theta=100000.0)
        AutoModelForCausalLM.from_config(config).save_pretrained(folder)
        make_tokenizer().save_pretrained(folder)
    return str(folder), "random-init model of SmolLM2-135M's shape (no alias cache on this machine)"


def cli(*args: str) -> dict:
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src")}
    started = time.perf_counter()
    result = subprocess.run([sys.executable, "-m", "prunekit", *args], env=env, capture_output=True, text=True,
                            check=False)
    if result.returncode != 0:
        raise RuntimeError(f"prunekit {' '.join(args[:4])} failed:\n{result.stderr[-2000:]}")
    return {"seconds": time.perf_counter() - started, "stdout": result.stdout}


def ppl(folder: str, device: str) -> float:
    out = cli("eval", folder, "--ppl", str(EMBEDDED), "--seqlen", "512", "--max-windows", "32", "--device", device,
              "--stream", "--json")
    return json.loads(out["stdout"].strip().splitlines()[-1])["perplexity"]


def masks_agree(a: Path, b: Path) -> float:
    from safetensors import safe_open

    worst = 1.0
    for path in a.glob("*.safetensors"):
        with safe_open(str(path), "pt") as ha, safe_open(str(b / path.name), "pt") as hb:
            for key in ha.keys():  # noqa: SIM118
                worst = min(worst, float(((ha.get_tensor(key) == 0) == (hb.get_tensor(key) == 0)).float().mean()))
    return worst


def semi_structured_speed(tokens: int = 4096, layers: int = 4, repeats: int = 20) -> dict:
    from torch.sparse import to_sparse_semi_structured

    from prunekit.methods import build_method
    from prunekit.pruning import SparsityPlan

    torch.manual_seed(0)
    magnitude, target = build_method("magnitude"), SparsityPlan.build(0.5, "2:4").default
    shapes = [(11008, 4096), (4096, 11008)] * (layers // 2)
    dense = [magnitude.prune_layer(torch.randn(s) * 0.02, None, target).weight.half().cuda() for s in shapes]
    sparse = [to_sparse_semi_structured(w) for w in dense]
    x = torch.randn(tokens, 4096, dtype=torch.half, device="cuda")

    def stack(weights):
        h = x
        for w in weights:
            h = torch.nn.functional.linear(h, w)
        return h

    def timed(weights):
        for _ in range(3):
            stack(weights)
        torch.cuda.synchronize()
        start = time.perf_counter()
        for _ in range(repeats):
            stack(weights)
        torch.cuda.synchronize()
        return (time.perf_counter() - start) / repeats

    t_dense, t_sparse = timed(dense), timed(sparse)
    error = float((stack(dense) - stack(sparse)).abs().max())
    return {"tokens": tokens, "layers": layers, "dense_ms": t_dense * 1e3, "semi_structured_ms": t_sparse * 1e3,
            "speedup": t_dense / t_sparse, "max_abs_difference": error}


def main() -> None:
    if not torch.cuda.is_available():
        raise SystemExit("benchmarks/gpu.py needs a CUDA GPU")
    WORK.mkdir(parents=True, exist_ok=True)
    model, what = model_folder()
    started = time.perf_counter()
    rows = {}
    for method, pattern in CONFIGS:
        name = f"{method}-{pattern.replace(':', '-')}"
        row = {}
        for device in ("cuda", "cpu"):
            out = WORK / f"{name}-{device}"
            run = cli("prune", model, "--method", method, "--pattern", pattern, "--calib", str(EMBEDDED),
                      "--nsamples", "32", "--seqlen", "512", "--device", device, "--out", str(out), "--overwrite")
            row[f"{device}_s"] = run["seconds"]
            row[f"{device}_ppl"] = ppl(str(out), "cuda")
        row["mask_agreement"] = masks_agree(WORK / f"{name}-cuda", WORK / f"{name}-cpu")
        row["ppl_relative_difference"] = abs(row["cuda_ppl"] / row["cpu_ppl"] - 1)
        rows[name] = row
    dense = {"cuda_ppl": ppl(model, "cuda"), "cpu_ppl": ppl(model, "cpu")}
    results = {"model": what, "prune": rows, "dense_eval": dense, "semi_structured": semi_structured_speed(),
               "device": torch.cuda.get_device_name(), "torch": torch.__version__,
               "seconds": time.perf_counter() - started}
    from prunekit.files import atomic_write_json

    atomic_write_json(RESULTS, results)
    print(f"model: {what}")
    print("| config | CUDA s | CPU s | mask agreement | ppl CUDA | ppl CPU | difference |")
    print("|---|---|---|---|---|---|---|")
    for name, r in rows.items():
        print(f"| {name} | {r['cuda_s']:.0f} | {r['cpu_s']:.0f} | {r['mask_agreement']:.5f} | {r['cuda_ppl']:.3f} | "
              f"{r['cpu_ppl']:.3f} | {100 * r['ppl_relative_difference']:.3f} % |")
    s = results["semi_structured"]
    print(f"dense eval: ppl CUDA {dense['cuda_ppl']:.3f} vs CPU {dense['cpu_ppl']:.3f}")
    print(f"2:4 semi-structured: {s['dense_ms']:.2f} ms dense vs {s['semi_structured_ms']:.2f} ms sparse "
          f"(x{s['speedup']:.2f}) for {s['layers']} 7B-shaped MLP linears on {s['tokens']} tokens")


if __name__ == "__main__":
    main()
