"""The streamed engine: a model on disk pruned block by block gives what the in-memory path gives, writes the
checkpoint's dtype, survives SIGKILL at any block with byte-identical output, and refuses bad input in one line."""

from __future__ import annotations

import hashlib
import json
import os
import random
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

import prunekit
from tiny import WORDS, assert_one_line_error, build, make_tokenizer, run

ROOT = Path(__file__).resolve().parents[1]
EMBEDDED = ROOT / "src" / "prunekit" / "data" / "embedded" / "sotu_2020_2021.txt"


def _save(folder: Path, family: str = "llama", dtype: torch.dtype = torch.float32) -> Path:
    tokenizer = make_tokenizer()
    model = build(family, vocab=len(tokenizer), max_positions=512)
    model.to(dtype).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def material(tmp_path_factory):
    root = tmp_path_factory.mktemp("streaming")
    rng = random.Random(0)
    calib = root / "calib.txt"
    calib.write_text(" ".join(rng.choice(WORDS) for _ in range(8000)))
    return root, calib


def _args(model: Path, out: Path, calib: Path, *extra: str) -> list[str]:
    return ["prune", str(model), "--calib", str(calib), "--nsamples", "8", "--seqlen", "64", "--batch-size", "4",
            "--out", str(out), *extra]


def _shards(folder: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.glob("*.safetensors"))}


@pytest.mark.parametrize("family", ["llama", "gemma3", "gpt2"])
@pytest.mark.parametrize("method,pattern", [("wanda", "unstructured"), ("sparsegpt", "2:4"), ("magnitude", "4:8")])
def test_streamed_equals_in_memory(capsys, material, tmp_path, family, method, pattern):
    _root, calib = material
    model = _save(tmp_path / "model", family)
    common = ["--method", method, "--pattern", pattern]
    code, _, err = run(capsys, *_args(model, tmp_path / "s", calib, *common))
    assert code == 0, err
    code, _, err = run(capsys, *_args(model, tmp_path / "m", calib, *common, "--no-stream"))
    assert code == 0, err
    streamed = AutoModelForCausalLM.from_pretrained(tmp_path / "s").state_dict()
    in_memory = AutoModelForCausalLM.from_pretrained(tmp_path / "m").state_dict()
    assert streamed.keys() == in_memory.keys()
    for name, weight in in_memory.items():
        assert torch.equal(streamed[name] == 0, weight == 0), name  # identical masks
        torch.testing.assert_close(streamed[name], weight, rtol=1e-5, atol=1e-6)
    manifest = json.loads((tmp_path / "s" / "prunekit.json").read_text())
    assert manifest["streaming"]["output_dtype"] == "float32" and not manifest["streaming"]["resumed"]
    assert manifest["overall_sparsity"] == pytest.approx(0.5, abs=1e-9)


def test_structured_streamed_equals_in_memory(capsys, material, tmp_path):
    _root, calib = material
    model = _save(tmp_path / "model")
    for name, extra in (("s", ()), ("m", ("--no-stream",))):
        code, _, err = run(capsys, *_args(model, tmp_path / name, calib, "--method", "flap", "--sparsity", "0.3",
                                          *extra))
        assert code == 0, err
    ids = torch.randint(0, 200, (2, 24))
    streamed, in_memory = prunekit.load(tmp_path / "s").model, prunekit.load(tmp_path / "m").model
    with torch.no_grad():
        assert torch.equal(streamed(ids).logits, in_memory(ids).logits)
    manifest = json.loads((tmp_path / "s" / "prunekit.json").read_text())
    assert manifest["structured"]["params_after"] == sum(p.numel() for p in streamed.parameters())


def test_bf16_in_bf16_out_and_dtype_override(capsys, material, tmp_path):
    _root, calib = material
    model = _save(tmp_path / "model", dtype=torch.bfloat16)
    code, _, err = run(capsys, *_args(model, tmp_path / "bf16", calib, "--method", "wanda"))
    assert code == 0, err
    out = AutoModelForCausalLM.from_pretrained(tmp_path / "bf16")
    assert {p.dtype for p in out.parameters()} == {torch.bfloat16}
    manifest = json.loads((tmp_path / "bf16" / "prunekit.json").read_text())
    assert manifest["streaming"]["output_dtype"] == manifest["streaming"]["activations_dtype"] == "bfloat16"
    code, _, err = run(capsys, *_args(model, tmp_path / "fp32", calib, "--method", "wanda", "--dtype", "float32"))
    assert code == 0, err
    assert json.loads((tmp_path / "fp32" / "config.json").read_text())["dtype"] == "float32"


# -- resume ------------------------------------------------------------------------------------------------

_KILLER = """
import os, signal, sys
from prunekit.engine import loop, passes

where, block = sys.argv[1], int(sys.argv[2])
if where == "after":  # right after block `block` was recorded
    recorded = loop.Engine._checkpoint
    def checkpoint(self, k, current, progress, index, store, count):
        recorded(self, k, current, progress, index, store, count)
        if index == block:
            os.kill(os.getpid(), signal.SIGKILL)
    loop.Engine._checkpoint = checkpoint
else:  # in the middle of block `block`: pruned, not yet propagated or written
    prune_group = passes.SequentialPass._prune_group
    def killing(self, prefix, modules, statistic):
        prune_group(self, prefix, modules, statistic)
        if prefix.endswith(f".{block}"):
            os.kill(os.getpid(), signal.SIGKILL)
    passes.SequentialPass._prune_group = killing
from prunekit.cli import main
main(sys.argv[3:])
"""


def _killed_run(tmp_path: Path, where: str, block: int, args: list[str]) -> None:
    script = tmp_path / "killer.py"
    script.write_text(_KILLER)
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src")}
    result = subprocess.run([sys.executable, str(script), where, str(block), *args], env=env, capture_output=True,
                            text=True, check=False)
    assert result.returncode == -9, result.stderr[-2000:]


@pytest.mark.parametrize("where,block,extra", [
    ("after", 0, ()),
    ("middle", 1, ()),
    ("after", 1, ("--method", "sparsegpt")),
    ("middle", 1, ("--max-memory", "SPILL")),
])
def test_killed_run_resumes_to_identical_bytes(capsys, material, tmp_path, where, block, extra):
    _root, calib = material
    model = _save(tmp_path / "model")
    extra = list(extra)
    if "SPILL" in extra:  # a limit that leaves no room for the activations: they live on disk
        extra[extra.index("SPILL")] = str(_fixed_bytes(model) + 1)
    args = _args(model, tmp_path / "whole", calib, *extra)
    code, _, err = run(capsys, *args)
    assert code == 0, err
    killed = _args(model, tmp_path / "killed", calib, *extra)
    _killed_run(tmp_path, where, block, killed)
    staging = tmp_path / ".killed.partial"
    assert staging.is_dir() and not (tmp_path / "killed").exists()
    code, _, err = run(capsys, *killed)  # the same command continues
    assert code == 0, err
    assert _shards(tmp_path / "killed") == _shards(tmp_path / "whole")
    assert not staging.exists()
    manifest = json.loads((tmp_path / "killed" / "prunekit.json").read_text())
    resumed_block = block + 1 if where == "after" else block
    assert manifest["streaming"]["resumed"] and manifest["streaming"]["resumed_at"][0]["block"] == resumed_block
    if "--max-memory" in extra:
        assert manifest["streaming"]["memory_plan"]["activations_spilled"]


def _fixed_bytes(model: Path) -> int:
    from prunekit.adapters import get_adapter
    from prunekit.engine import StreamedBlocks
    from prunekit.methods import build_method
    from prunekit.models import open_checkpoint
    from prunekit.streaming.budget import plan_memory, statistics_bytes

    checkpoint = open_checkpoint(model)
    adapter = get_adapter(checkpoint.skeleton())
    source = StreamedBlocks(checkpoint, adapter, torch.device("cpu"))
    return plan_memory(source, [statistics_bytes(build_method("wanda"), adapter)], rows=8, seqlen=64, batch_size=4,
                       activations_dtype=torch.float32, limit=None).fixed_bytes


def test_resume_refuses_a_changed_recipe(capsys, material, tmp_path):
    _root, calib = material
    model = _save(tmp_path / "model")
    _killed_run(tmp_path, "after", 0, _args(model, tmp_path / "out", calib, "--method", "wanda"))
    code, _, err = run(capsys, *_args(model, tmp_path / "out", calib, "--method", "wanda", "--sparsity", "0.6"))
    assert_one_line_error(code, err, "had a different recipe")
    code, _, err = run(capsys, *_args(model, tmp_path / "out", calib, "--method", "wanda", "--sparsity", "0.6",
                                      "--resume"))
    assert_one_line_error(code, err, "had a different recipe")
    code, _, err = run(capsys, *_args(model, tmp_path / "out", calib, "--method", "wanda", "--sparsity", "0.6",
                                      "--overwrite"))
    assert code == 0, err  # --overwrite discards the other run (prunekit's own staging folder)
    manifest = json.loads((tmp_path / "out" / "prunekit.json").read_text())
    assert manifest["overall_sparsity"] == pytest.approx(0.6, abs=0.01) and not manifest["streaming"]["resumed"]


def test_resume_refuses_changed_calibration_text(capsys, material, tmp_path):
    model = _save(tmp_path / "model")
    calib = tmp_path / "calib.txt"
    calib.write_text(material[1].read_text())
    args = _args(model, tmp_path / "out", calib, "--method", "wanda")
    _killed_run(tmp_path, "after", 0, args)
    calib.write_text(material[1].read_text()[::-1])
    code, _, err = run(capsys, *args)
    assert_one_line_error(code, err, "calibration of the interrupted run")


def test_resume_without_a_run(capsys, material, tmp_path):
    _root, calib = material
    code, _, err = run(capsys, *_args(_save(tmp_path / "model"), tmp_path / "out", calib, "--resume"))
    assert_one_line_error(code, err, "no interrupted run")


# -- bad input ---------------------------------------------------------------------------------------------


def test_shard_missing_from_index(capsys, material, tmp_path):
    _root, calib = material
    model = _save(tmp_path / "model")
    weights = model / "model.safetensors"
    shard = "model-00001-of-00002.safetensors"
    weights.rename(model / shard)
    index = {"metadata": {}, "weight_map": {"model.embed_tokens.weight": shard,
                                            "model.norm.weight": "model-00002-of-00002.safetensors"}}
    (model / "model.safetensors.index.json").write_text(json.dumps(index))
    code, _, err = run(capsys, *_args(model, tmp_path / "out", calib))
    assert_one_line_error(code, err, "model-00002-of-00002.safetensors")
    assert not (tmp_path / "out").exists()


def test_tensor_shape_disagrees_with_config(capsys, material, tmp_path):
    _root, calib = material
    model = _save(tmp_path / "model")
    config = json.loads((model / "config.json").read_text())
    config["intermediate_size"] *= 2
    (model / "config.json").write_text(json.dumps(config))
    code, _, err = run(capsys, *_args(model, tmp_path / "out", calib))
    assert_one_line_error(code, err, "but the config gives")


def test_max_memory_below_one_block(capsys, material, tmp_path):
    _root, calib = material
    code, _, err = run(capsys, *_args(_save(tmp_path / "model"), tmp_path / "out", calib, "--max-memory", "100MB"))
    assert_one_line_error(code, err, "below what one block needs: at least")


def test_bad_sizes_and_dtypes(capsys, material, tmp_path):
    _root, calib = material
    model = _save(tmp_path / "model")
    for extra, needle in ((("--max-memory", "lots"), "is not a size"), (("--dtype", "int8"), "--dtype 'int8'"),
                          (("--activations-dtype", "fp8"), "--activations-dtype"),
                          (("--no-stream", "--resume"), "need the streamed engine")):
        code, _, err = run(capsys, *_args(model, tmp_path / "out", calib, *extra))
        assert_one_line_error(code, err, needle)


def test_disk_too_small(capsys, material, tmp_path, monkeypatch):
    import shutil

    _root, calib = material
    model = _save(tmp_path / "model")
    real = shutil.disk_usage
    monkeypatch.setattr(shutil, "disk_usage", lambda path: real(path)._replace(free=1000))
    code, _, err = run(capsys, *_args(model, tmp_path / "out", calib))
    assert_one_line_error(code, err, "not enough disk")


def test_self_calibration_too_slow_is_refused(capsys, tmp_path, monkeypatch):
    from prunekit.streaming import prune as streamed

    monkeypatch.setattr(streamed, "self_sampling_estimate", lambda *a, **k: 26 * 3600.0)
    code, _, err = run(capsys, "prune", str(_save(tmp_path / "model")), "--out", str(tmp_path / "out"),
                       "--nsamples", "4", "--seqlen", "32")
    assert_one_line_error(code, err, "calibration 'self' would sample 128 tokens")
    assert "--calib" in err


# -- GGUF and evaluation -----------------------------------------------------------------------------------


def test_gguf_streamed_one_tensor_at_a_time(capsys, material, tmp_path, monkeypatch):
    from test_models import _write_tiny_gguf

    monkeypatch.setenv("PRUNEKIT_CACHE", str(tmp_path / "cache"))
    _root, calib = material
    gguf = tmp_path / "tiny.gguf"
    _write_tiny_gguf(gguf)
    code, _, err = run(capsys, *_args(gguf, tmp_path / "s", calib, "--seqlen", "32", "--dtype", "float32"))
    assert code == 0, err
    code, _, err = run(capsys, *_args(gguf, tmp_path / "m", calib, "--seqlen", "32", "--dtype", "float32",
                                      "--no-stream"))
    assert code == 0, err
    streamed = AutoModelForCausalLM.from_pretrained(tmp_path / "s").state_dict()
    in_memory = AutoModelForCausalLM.from_pretrained(tmp_path / "m").state_dict()
    for name, weight in in_memory.items():
        assert torch.equal(streamed[name], weight), name
    manifest = json.loads((tmp_path / "s" / "prunekit.json").read_text())
    assert manifest["model"]["kind"] == "gguf" and manifest["model"]["source_quantization"] == "Q8_0"


def test_gguf_of_an_undequantizable_type(tmp_path):
    import gguf
    import numpy as np

    from prunekit.errors import PrunekitError
    from prunekit.models.gguf import inspect_gguf

    writer = gguf.GGUFWriter(str(tmp_path / "odd.gguf"), "llama")
    writer.add_block_count(1)
    writer.add_tensor("token_embd.weight", np.zeros((4, 40), dtype=np.uint8), raw_dtype=gguf.GGMLQuantizationType.Q8_1)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    with pytest.raises(PrunekitError, match="quantization type Q8_1"):
        inspect_gguf(tmp_path / "odd.gguf")


def test_streamed_perplexity_equals_in_memory(tmp_path):
    from prunekit.evaluation import perplexity
    from prunekit.evaluation.streamed import streamed_perplexity
    from prunekit.models import load_model, open_checkpoint

    for family in ("llama", "gemma3"):
        model = _save(tmp_path / family, family)
        checkpoint = open_checkpoint(model)
        streamed = streamed_perplexity(checkpoint, checkpoint.tokenizer(), str(EMBEDDED), seqlen=64, max_windows=6,
                                       batch_size=4)
        loaded = load_model(model)
        reference = perplexity(loaded.model, loaded.tokenizer, str(EMBEDDED), seqlen=64, max_windows=6)
        assert streamed.tokens == reference.tokens
        assert streamed.perplexity == pytest.approx(reference.perplexity, rel=1e-5)


@pytest.mark.real_model
def test_real_streamed_wanda_equals_in_memory(capsys, tmp_path):
    """SmolLM2 from its cached folder: the streamed CLI and the in-memory API give the same Wanda masks."""
    from prunekit.models import load_model

    code, _, err = run(capsys, "prune", "smollm2-135m", "--method", "wanda", "--calib", str(EMBEDDED), "--nsamples",
                       "4", "--seqlen", "128", "--out", str(tmp_path / "s"))
    assert code == 0, err
    loaded = load_model("smollm2-135m")
    prunekit.prune(loaded.model, method="wanda", calibration=str(EMBEDDED), tokenizer=loaded.tokenizer, nsamples=4,
                   seqlen=128, progress=False)
    streamed = AutoModelForCausalLM.from_pretrained(tmp_path / "s").state_dict()
    for name, weight in loaded.model.state_dict().items():
        if name in streamed:
            assert torch.equal(streamed[name] == 0, weight == 0), name


def test_eval_stream_equals_in_memory(capsys, tmp_path):
    model = _save(tmp_path / "model")
    results = []
    for flag in ("--stream", "--no-stream"):
        code, out, err = run(capsys, "eval", str(model), "--ppl", str(EMBEDDED), "--seqlen", "64", "--max-windows",
                             "4", flag, "--json")
        assert code == 0, err
        results.append(json.loads(out.strip().splitlines()[-1]))
    assert results[0]["perplexity"] == pytest.approx(results[1]["perplexity"], rel=1e-5)
    assert "block by block" in results[0]["protocol"] and "block by block" not in results[1]["protocol"]
    code, _, err = run(capsys, "eval", str(model), "--local-tasks", str(EMBEDDED), "--stream")
    assert_one_line_error(code, err, "--stream evaluates perplexity only")


def test_compute_dtype(capsys, material, tmp_path):
    _root, calib = material
    model = _save(tmp_path / "model")
    code, _, err = run(capsys, *_args(model, tmp_path / "fp16", calib, "--compute-dtype", "float16"))
    assert_one_line_error(code, err, "--compute-dtype float16 needs a GPU")
    code, _, err = run(capsys, *_args(model, tmp_path / "bf16", calib, "--compute-dtype", "bfloat16"))
    assert code == 0, err
    assert json.loads((tmp_path / "bf16" / "prunekit.json").read_text())["overall_sparsity"] == pytest.approx(0.5)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_streamed_equals_cpu(capsys, material, tmp_path):
    _root, calib = material
    model = _save(tmp_path / "model")
    for name, device in (("cpu", "cpu"), ("cuda", "cuda")):
        code, _, err = run(capsys, *_args(model, tmp_path / name, calib, "--method", "wanda", "--device", device))
        assert code == 0, err
    cpu, cuda = _weights_of(tmp_path / "cpu"), _weights_of(tmp_path / "cuda")
    agreement = min(float(((cpu[k] == 0) == (cuda[k] == 0)).float().mean()) for k in cpu)
    assert agreement > 0.999


def _weights_of(folder: Path) -> dict[str, torch.Tensor]:
    return AutoModelForCausalLM.from_pretrained(folder).state_dict()
