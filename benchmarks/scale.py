"""Benchmark of pruning at real size (issue: real model sizes): checkpoints streamed block by block from disk.

Seeded random-init checkpoints of real architectures are written once (tensor by tensor, bf16, one shard per
block) into benchmarks/results/cache/scale/: Llama-2-7B's shapes (32 blocks, hidden 4096, intermediate 11008,
32 heads, vocab 32000; 13.5 GB) and TinyLlama-1.1B's (22 blocks, hidden 2048, intermediate 5632, 32 heads over 4
KV heads). Their tokenizer is a 32000-token BPE trained on sotu/train.txt (seeded input, deterministic trainer).
Calibration: 8 x 512 tokens of sotu/train.txt, seed 0. Every measured command runs in a fresh process, whose
peak RSS (ru_maxrss of the child) is reported.

Parts (each kept in benchmarks/results/scale.json; a rerun skips finished parts unless --redo):
  7b-forward    one streamed dense forward of the 7B model over the calibration tokens (read + run every block)
  7b-wanda      `prunekit prune` Wanda 50 % (the target: peak RSS <= 3 GB, time <= 2.0x 7b-forward)
  7b-kill       the same run killed with SIGKILL at block 10 and resumed: shards equal (sha256), time lost
  1b-sparsegpt  SparseGPT 50 % on the TinyLlama-shaped checkpoint
  1b-flap       FLAP 20 % on the TinyLlama-shaped checkpoint
  smollm2       SmolLM2-135M streamed vs in memory (Wanda 50 %, 128 x 512 of sotu/train): masks and perplexity

    python benchmarks/scale.py [--only 7b-wanda ...] [--redo]
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SOTU = ROOT.parent / "shared" / "data" / "corpora" / "sotu"
CACHE = ROOT / "benchmarks" / "results" / "cache" / "scale"
RESULTS = ROOT / "benchmarks" / "results" / "scale.json"
PARTS = ("7b-forward", "7b-wanda", "7b-kill", "1b-sparsegpt", "1b-flap", "smollm2")
SHAPES = {
    "llama2-7b-random": dict(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32,
                             num_key_value_heads=32, vocab_size=32000, max_position_embeddings=4096),
    "tinyllama-1.1b-random": dict(hidden_size=2048, intermediate_size=5632, num_hidden_layers=22,
                                  num_attention_heads=32, num_key_value_heads=4, vocab_size=32000,
                                  max_position_embeddings=2048),
}
CALIB = ["--calib", str(SOTU / "train.txt"), "--nsamples", "8", "--seqlen", "512", "--seed", "0"]


def log(message: str) -> None:
    print(f"[scale] {message}", file=sys.stderr, flush=True)


# -- the checkpoints -----------------------------------------------------------------------------------------


def tokenizer_folder() -> Path:
    """A 32000-token byte-level BPE trained on sotu/train.txt (the random models need a 32000 vocabulary)."""
    folder = CACHE / "tokenizer-32k"
    if (folder / "tokenizer.json").is_file():
        return folder
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    log("training a 32000-token BPE on sotu/train.txt ...")
    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    text = (SOTU / "train.txt").read_text().split("\n\n")
    backend.train_from_iterator(text, trainers.BpeTrainer(
        vocab_size=32000, special_tokens=["<unk>", "<s>", "</s>"], show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="<unk>", bos_token="<s>",
                                        eos_token="</s>")
    tokenizer.save_pretrained(folder)
    return folder


def write_checkpoint(name: str) -> Path:
    """Seeded random init of a Llama architecture, bf16, one shard per block, written tensor by tensor."""
    import torch
    from accelerate import init_empty_weights
    from transformers import AutoModelForCausalLM, GenerationConfig, LlamaConfig

    from prunekit.export.shards import shard_name, write_index, write_shard
    from prunekit.models.tensors import TensorSpec

    folder = CACHE / name
    if (folder / "model.safetensors.index.json").is_file():
        return folder
    stage = CACHE / f".{name}.partial"
    shutil.rmtree(stage, ignore_errors=True)  # our own unfinished folder
    config = LlamaConfig(**SHAPES[name], bos_token_id=1, eos_token_id=2, tie_word_embeddings=False,
                         dtype="bfloat16")
    with init_empty_weights():
        model = AutoModelForCausalLM.from_config(config)
    names = [n for n, _ in model.named_parameters()]
    shapes = {n: tuple(p.shape) for n, p in model.named_parameters()}
    groups: dict[int, list[str]] = {}
    for n in names:
        groups.setdefault(int(n.split(".")[2]) + 1 if n.startswith("model.layers.") else 0, []).append(n)
    count = len(groups)
    weight_map, total = {}, 0

    def tensor(n: str):
        if n.endswith("norm.weight"):
            return torch.ones(shapes[n], dtype=torch.bfloat16)
        generator = torch.Generator().manual_seed(int(hashlib.sha256(n.encode()).hexdigest()[:8], 16))
        return (torch.randn(shapes[n], generator=generator) * 0.02).to(torch.bfloat16)

    started = time.perf_counter()
    for index in sorted(groups):
        file = shard_name(index + 1, count)
        specs = {n: TensorSpec(shapes[n], torch.bfloat16) for n in groups[index]}
        total += write_shard(stage / file, ((n, tensor(n)) for n in specs), specs, {"format": "pt"})
        weight_map.update(dict.fromkeys(specs, file))
        log(f"{name}: shard {index + 1}/{count} ({total / 2**30:.1f} GiB, {time.perf_counter() - started:.0f}s)")
    write_index(stage, weight_map, total)
    config.save_pretrained(stage)
    GenerationConfig.from_model_config(config).save_pretrained(stage)
    for file in tokenizer_folder().iterdir():
        shutil.copyfile(file, stage / file.name)
    stage.rename(folder)
    return folder


# -- measured commands -------------------------------------------------------------------------------------


def measure(command: list[str], kill_at_block: int | None = None, run_file: Path | None = None) -> dict:
    """Run `command` in a fresh process: wall time and its own peak RSS (wait4), optionally SIGKILLed as soon as
    its run record shows `kill_at_block` blocks done. Its output goes to a log file (a pipe could fill up)."""
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src")}
    log(" ".join(command))
    CACHE.mkdir(parents=True, exist_ok=True)
    log_path = CACHE / "last-command.log"
    started = time.perf_counter()
    killed = False
    with log_path.open("w") as sink:
        process = subprocess.Popen(command, env=env, stdout=sink, stderr=subprocess.STDOUT)
        while True:
            pid, status, usage = os.wait4(process.pid, os.WNOHANG)
            if pid:
                break
            if kill_at_block is not None and not killed and _blocks_done(run_file) >= kill_at_block:
                os.kill(process.pid, signal.SIGKILL)
                killed = True
            time.sleep(0.2)
    process.returncode = code = os.waitstatus_to_exitcode(status)
    wall = time.perf_counter() - started
    output = log_path.read_text(errors="replace")
    if code != 0 and not (killed and code == -signal.SIGKILL):
        raise RuntimeError(f"{command[:5]} failed ({code}):\n{output[-3000:]}")
    return {"wall_s": wall, "peak_rss_mib": usage.ru_maxrss / 1024, "killed": killed, "output_tail": output[-1500:]}


def _blocks_done(run_file: Path | None) -> int:
    try:
        passes = json.loads(run_file.read_text()).get("passes", []) if run_file else []
    except (OSError, ValueError):  # not there yet, or replaced while read
        return 0
    return passes[0]["next_block"] if passes else 0


def prunekit_command(*args: str) -> list[str]:
    return [sys.executable, "-m", "prunekit.cli", *args]


def sha256s(folder: Path) -> dict[str, str]:
    digests = {}
    for path in sorted(folder.glob("*.safetensors")):
        digest = hashlib.sha256()
        with path.open("rb") as handle:
            while block := handle.read(1 << 24):
                digest.update(block)
        digests[path.name] = digest.hexdigest()
    return digests


def manifest_of(folder: Path) -> dict:
    return json.loads((folder / "prunekit.json").read_text())


# -- parts ---------------------------------------------------------------------------------------------------


def forward_child(model: str) -> None:
    """In a child process: one streamed dense forward over the calibration tokens; prints JSON."""
    import resource

    import torch

    from prunekit.adapters import get_adapter
    from prunekit.data import build_calibration
    from prunekit.engine import Engine, EngineOptions, StreamedBlocks
    from prunekit.engine.passes import ForwardPass, Passes
    from prunekit.models import open_checkpoint

    checkpoint = open_checkpoint(model)
    calib = build_calibration(str(SOTU / "train.txt"), checkpoint.tokenizer(), nsamples=8, seqlen=512, seed=0)
    source = StreamedBlocks(checkpoint, get_adapter(checkpoint.skeleton()), torch.device("cpu"))
    started = time.perf_counter()
    engine = Engine(source, options=EngineOptions(batch_size=8, progress=True, activations_dtype=checkpoint.dtype))
    result = engine.run(Passes(ForwardPass()), calib.input_ids)
    print(json.dumps({"forward_s": time.perf_counter() - started, "timings": result.timings, "io": result.io,
                      "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))


def part_forward(results: dict) -> dict:
    model = write_checkpoint("llama2-7b-random")
    run = measure([sys.executable, __file__, "--forward-child", str(model)])
    figures = json.loads(run["output_tail"].strip().splitlines()[-1])
    return {**figures, "wall_s": run["wall_s"], "peak_rss_mib": run["peak_rss_mib"]}


def part_wanda(results: dict) -> dict:
    model = write_checkpoint("llama2-7b-random")
    out = CACHE / "out-7b-wanda"
    run = measure(prunekit_command("prune", str(model), "--method", "wanda", "--sparsity", "0.5", *CALIB,
                                   "--out", str(out), "--overwrite"))
    manifest = manifest_of(out)
    forward = results.get("7b-forward", {}).get("forward_s")
    total = manifest["timings_s"]["total"]
    return {"wall_s": run["wall_s"], "peak_rss_mib": run["peak_rss_mib"], "prune_s": total,
            "ratio_to_streamed_forward": total / forward if forward else None,
            "overall_sparsity": manifest["overall_sparsity"], "io": manifest["streaming"]["io"],
            "memory_plan": manifest["streaming"]["memory_plan"], "estimate_s": manifest["streaming"]["estimate_s"],
            "timings": manifest["timings_s"], "shards": sha256s(out), "output_tail": run["output_tail"]}


def part_kill(results: dict) -> dict:
    model = write_checkpoint("llama2-7b-random")
    out = CACHE / "out-7b-killed"
    args = prunekit_command("prune", str(model), "--method", "wanda", "--sparsity", "0.5", *CALIB, "--out", str(out),
                            "--overwrite")
    first = measure(args, kill_at_block=10, run_file=CACHE / ".out-7b-killed.partial" / "run" / "run.json")
    second = measure(args)
    reference = results.get("7b-wanda", {}).get("shards") or {}
    shards = sha256s(out)
    manifest = manifest_of(out)
    uninterrupted = results.get("7b-wanda", {}).get("wall_s")
    row = {"killed_after_s": first["wall_s"], "resumed_wall_s": second["wall_s"],
           "peak_rss_mib": max(first["peak_rss_mib"] or 0, second["peak_rss_mib"] or 0),
           "identical_shards": bool(reference) and shards == reference, "shards_compared": len(shards),
           "resumed_at": manifest["streaming"]["resumed_at"],
           "time_lost_s": (first["wall_s"] + second["wall_s"] - uninterrupted) if uninterrupted else None,
           "time_lost_at_resumed_pace_s": time_lost_at_resumed_pace(first["wall_s"], second["wall_s"], 10)}
    if row["identical_shards"]:
        shutil.rmtree(out)  # prunekit's own output, identical to out-7b-wanda: the disk space is better free
    return row


def time_lost_at_resumed_pace(killed_s: float, resumed_s: float, killed_at: int, blocks: int = 32) -> float:
    """What the kill cost, measured against the resumed run's own pace (seconds per block) rather than against
    the uninterrupted run, which may have run under another load on this shared machine."""
    return killed_s + resumed_s - blocks * resumed_s / (blocks - killed_at)


def part_small(method: str, sparsity: str) -> dict:
    model = write_checkpoint("tinyllama-1.1b-random")
    out = CACHE / f"out-1b-{method}"
    run = measure(prunekit_command("prune", str(model), "--method", method, "--sparsity", sparsity, *CALIB,
                                   "--out", str(out), "--overwrite"))
    manifest = manifest_of(out)
    return {"wall_s": run["wall_s"], "peak_rss_mib": run["peak_rss_mib"], "prune_s": manifest["timings_s"]["total"],
            "overall_sparsity": manifest["overall_sparsity"], "io": manifest["streaming"]["io"],
            "timings": manifest["timings_s"]}


def part_smollm2(results: dict) -> dict:
    """Streamed CLI vs the in-memory API on the real SmolLM2: same masks, same perplexity."""
    out_s, out_m = CACHE / "smollm2-streamed", CACHE / "smollm2-in-memory"
    common = ["--method", "wanda", "--sparsity", "0.5", "--calib", str(SOTU / "train.txt"), "--nsamples", "128",
              "--seqlen", "512", "--seed", "0", "--overwrite", "--ppl", str(SOTU / "test.txt")]
    streamed = measure(prunekit_command("prune", "smollm2-135m", *common, "--out", str(out_s)))
    in_memory = measure(prunekit_command("prune", "smollm2-135m", *common, "--out", str(out_m), "--no-stream"))
    from safetensors import safe_open

    def zeros(folder: Path) -> dict:
        masks = {}
        for path in folder.glob("*.safetensors"):
            with safe_open(str(path), "pt") as handle:
                for key in handle.keys():  # noqa: SIM118
                    masks[key] = handle.get_tensor(key) == 0
        return masks

    a, b = zeros(out_s), zeros(out_m)
    identical = a.keys() == b.keys() and all(bool((a[k] == b[k]).all()) for k in a)
    ms, mm = manifest_of(out_s), manifest_of(out_m)
    return {"identical_masks": identical, "tensors": len(a),
            "streamed": {"perplexity": ms["evaluation"]["after"]["perplexity"],
                         "dense_perplexity": ms["evaluation"]["before"]["perplexity"],
                         "wall_s": streamed["wall_s"], "peak_rss_mib": streamed["peak_rss_mib"]},
            "in_memory": {"perplexity": mm["evaluation"]["after"]["perplexity"],
                          "dense_perplexity": mm["evaluation"]["before"]["perplexity"],
                          "wall_s": in_memory["wall_s"], "peak_rss_mib": in_memory["peak_rss_mib"]}}


def table(results: dict) -> str:
    lines = ["| part | wall s | prune s | peak RSS MiB | figures |", "|---|---|---|---|---|"]
    for part in PARTS:
        row = results.get(part)
        if not row:
            continue
        figures = {"7b-forward": lambda r: f"read {r['io']['bytes_read'] / 2**30:.1f} GiB",
                   "7b-wanda": lambda r: (f"x{r['ratio_to_streamed_forward']:.2f} streamed forward; sparsity "
                                          f"{r['overall_sparsity']:.4f}; read {r['io']['bytes_read'] / 2**30:.1f} GiB,"
                                          f" wrote {r['io']['bytes_written'] / 2**30:.1f} GiB"),
                   "7b-kill": lambda r: (f"identical shards {r['identical_shards']} ({r['shards_compared']}); "
                                         f"time lost {r.get('time_lost_at_resumed_pace_s', r['time_lost_s']):.0f}s"),
                   "1b-sparsegpt": lambda r: f"sparsity {r['overall_sparsity']:.4f}",
                   "1b-flap": lambda r: f"sparsity {r['overall_sparsity']:.4f}",
                   "smollm2": lambda r: (f"identical masks {r['identical_masks']}; ppl streamed "
                                         f"{r['streamed']['perplexity']:.3f} vs in memory "
                                         f"{r['in_memory']['perplexity']:.3f}")}[part](row)
        wall = row.get("wall_s") or row.get("resumed_wall_s") or row.get("streamed", {}).get("wall_s")
        lines.append(f"| {part} | {wall:.0f} | {row.get('prune_s', row.get('forward_s', 0)) or 0:.0f} | "
                     f"{row.get('peak_rss_mib') or row.get('streamed', {}).get('peak_rss_mib', 0):.0f} | {figures} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--only", nargs="+", choices=PARTS)
    parser.add_argument("--redo", action="store_true")
    parser.add_argument("--forward-child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.forward_child:
        return forward_child(args.forward_child)
    from prunekit.files import atomic_write_json

    results = json.loads(RESULTS.read_text()) if RESULTS.is_file() else {}
    runners = {"7b-forward": part_forward, "7b-wanda": part_wanda, "7b-kill": part_kill,
               "1b-sparsegpt": lambda r: part_small("sparsegpt", "0.5"), "1b-flap": lambda r: part_small("flap", "0.2"),
               "smollm2": part_smollm2}
    for part in args.only or PARTS:
        if part in results and not args.redo:
            log(f"{part}: done before (--redo to measure again)")
            continue
        results[part] = {**runners[part](results), "measured_at": time.strftime("%Y-%m-%d %H:%M")}
        import torch

        results.setdefault("environment", {"threads": torch.get_num_threads(), "cpu_count": os.cpu_count()})
        atomic_write_json(RESULTS, results)
        log(f"{part}: {json.dumps({k: v for k, v in results[part].items() if k not in ('output_tail', 'shards')})}")
    print(table(results))


if __name__ == "__main__":
    main()
