"""The classic methods on the real SmolLM2-135M-Instruct with real text (State of the Union)."""

from __future__ import annotations

import json
import math

import pytest
import torch
from transformers import AutoModelForCausalLM

from prunekit.api import prune
from prunekit.data import build_calibration
from prunekit.evaluation import perplexity
from prunekit.export import save_model
from prunekit.methods import build_method
from prunekit.pruning import SparsityTarget
from prunekit.pruning.statistics import InputHessian, InputSquaredNorms

pytestmark = pytest.mark.real_model


@pytest.fixture(scope="module")
def calibration(smollm2_loaded, sotu):
    return build_calibration(str(sotu / "train.txt"), smollm2_loaded.tokenizer, nsamples=16, seqlen=256, seed=0)


@pytest.fixture(scope="module")
def layer_inputs(smollm2_loaded, calibration):
    """Real inputs of three linears of block 6 of the dense model."""
    model = smollm2_loaded.model
    names = ["model.layers.6.self_attn.q_proj", "model.layers.6.self_attn.o_proj", "model.layers.6.mlp.down_proj"]
    captured: dict[str, list[torch.Tensor]] = {n: [] for n in names}
    handles = [model.get_submodule(n).register_forward_pre_hook(
        lambda _m, inp, n=n: captured[n].append(inp[0].reshape(-1, inp[0].shape[-1]))) for n in names]
    with torch.no_grad():
        model(calibration.input_ids[:8])
    for h in handles:
        h.remove()
    return {n: torch.cat(v) for n, v in captured.items()}


@pytest.mark.parametrize("pattern", [None, "2:4"])
def test_reconstruction_error_ordering(smollm2_loaded, layer_inputs, pattern):
    """||WX − ŴX||: SparseGPT < Wanda < magnitude on real activations, for each probed layer."""
    target = SparsityTarget(0.5) if pattern is None else SparsityTarget(0.5, 2, 4)
    for name, x in layer_inputs.items():
        weight = smollm2_loaded.model.get_submodule(name).weight.detach().float()
        norms, hessian = InputSquaredNorms(x.shape[1]), InputHessian(x.shape[1])
        norms.update(x)
        hessian.update(x)
        errors = {}
        for method, stats in (("magnitude", None), ("wanda", norms), ("sparsegpt", hessian)):
            result = build_method(method).prune_layer(weight, stats, target)
            errors[method] = torch.linalg.norm(x @ weight.t() - x @ result.weight.t()).item()
        assert errors["sparsegpt"] < errors["wanda"] < errors["magnitude"], (name, errors)


def test_prune_save_reload_identical_logits(smollm2, calibration, tmp_path):
    model, tokenizer = smollm2
    report = prune(model, method="sparsegpt", sparsity=0.0, pattern="2:4", calibration=calibration.input_ids,
                   progress=False)
    for layer in report.engine.layers:
        assert layer.achieved_sparsity == 0.5 and layer.pattern == "2:4"
    out = save_model(model, tokenizer, tmp_path / "pruned", report.to_dict())
    reloaded = AutoModelForCausalLM.from_pretrained(out).eval()
    ids = calibration.input_ids[:2, :64]
    with torch.no_grad():
        torch.testing.assert_close(reloaded(ids).logits, model(ids).logits, rtol=0, atol=0)
    down = reloaded.model.layers[3].mlp.down_proj.weight
    assert torch.all((down == 0).view(down.shape[0], -1, 4).sum(-1) == 2)
    manifest = json.loads((out / "prunekit.json").read_text())
    assert manifest["calibration"]["source"] == "tensor" and len(manifest["layers"]) == 30 * 7


def test_perplexity_ordering_on_real_text(smollm2_loaded, smollm2, calibration, sotu):
    """Dense < SparseGPT ≤ Wanda < magnitude at 50 % on held-out text (a well-known ordering)."""
    test_text = str(sotu / "test.txt")

    def ppl(model):
        return perplexity(model, smollm2_loaded.tokenizer, test_text, seqlen=256, max_windows=24,
                          batch_size=8).perplexity

    dense = ppl(smollm2_loaded.model)
    results = {}
    for method in ("magnitude", "wanda", "sparsegpt"):
        model = smollm2[0] if method == "magnitude" else type(smollm2[0])(smollm2[0].config)
        if method != "magnitude":
            model.load_state_dict(smollm2_loaded.model.state_dict())
            model.eval()
        prune(model, method=method, sparsity=0.5, calibration=calibration.input_ids, progress=False)
        results[method] = ppl(model)
    assert math.isfinite(dense) and dense < results["sparsegpt"] < results["wanda"] < results["magnitude"], (
        dense, results)


def test_perplexity_matches_plain_transformers(smollm2_loaded, sotu):
    """The pinned protocol against a window-by-window computation with transformers' own loss."""
    model, tokenizer = smollm2_loaded.model, smollm2_loaded.tokenizer
    result = perplexity(model, tokenizer, str(sotu / "test.txt"), seqlen=128, max_windows=6)
    text = "\n\n".join(p for p in (sotu / "test.txt").read_text().split("\n\n"))
    ids = tokenizer(text, add_special_tokens=False, return_tensors="pt").input_ids[0]
    losses = []
    with torch.no_grad():
        for w in range(6):
            window = ids[w * 128 : (w + 1) * 128].unsqueeze(0)
            losses.append(model(input_ids=window, labels=window).loss.item())
    expected = math.exp(sum(losses) / len(losses))
    assert result.tokens == 6 * 127
    assert abs(result.perplexity - expected) / expected < 1e-4
