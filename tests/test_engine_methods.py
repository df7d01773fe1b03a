"""The second-generation methods on the engine: OWL's collect pass + allocation, BESA's block hook, DSnoT and GBLM
through the streamed CLI."""

from __future__ import annotations

import json
import random

import pytest
import torch

import prunekit
from prunekit.errors import PrunekitError
from tiny import WORDS, assert_one_line_error, build, random_ids, run, save_tiny_llama


def _deep_llama(layers: int = 4):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=128,
                                         num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2,
                                         max_position_embeddings=256))
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():  # make block 1 heavy-tailed (3 % of its weights 20x larger): it must be pruned least
        for module in model.model.layers[1].modules():
            if isinstance(module, torch.nn.Linear):
                module.weight[torch.rand(module.weight.shape, generator=generator) < 0.03] *= 20
    return model.eval()


def _block_sparsity(model, index: int) -> float:
    block = model.model.layers[index]
    weights = [m.weight for m in block.modules() if isinstance(m, torch.nn.Linear)]
    return sum(int((w == 0).sum()) for w in weights) / sum(w.numel() for w in weights)


def test_owl_allocates_per_block_and_meets_the_target():
    model = _deep_llama()
    report = prunekit.prune(model, method="wanda", sparsity=0.5, calibration=random_ids(8, 32), progress=False,
                            sparsity_allocation="owl", method_options={"count": "exact-total", "owl.lam": 0.1})
    allocation = report.allocation
    assert allocation["method"] == "owl" and allocation["lambda"] == 0.1 and len(allocation["block_sparsities"]) == 4
    ratios, sparsities = allocation["outlier_ratios"], allocation["block_sparsities"]
    assert ratios[0] == min(ratios) and ratios[1] > 3 * ratios[0]  # the heavy tail of block 1 (and what it feeds)
    order = sorted(range(4), key=ratios.__getitem__)
    assert [sparsities[i] for i in order] == sorted(sparsities, reverse=True)  # more outliers, pruned less
    assert all(0.4 - 1e-9 <= s <= 0.6 + 1e-9 for s in sparsities)
    for index, target in enumerate(sparsities):
        assert _block_sparsity(model, index) == pytest.approx(target, abs=2e-3)
    assert report.overall_sparsity == pytest.approx(0.5, abs=1e-3)  # the global target, exactly (to a weight)


def test_owl_bad_requests():
    with pytest.raises(PrunekitError, match="fixes every block's sparsity"):
        prunekit.prune(build("llama"), method="wanda", pattern="2:4", calibration=random_ids(), progress=False,
                       sparsity_allocation="owl")
    with pytest.raises(PrunekitError, match="need --sparsity-allocation owl"):
        prunekit.prune(build("llama"), method="wanda", calibration=random_ids(), progress=False,
                       method_options={"owl.m": 3})
    with pytest.raises(PrunekitError, match="unknown sparsity allocation 'bes'"):
        prunekit.prune(build("llama"), method="wanda", calibration=random_ids(), progress=False,
                       sparsity_allocation="bes")
    with pytest.raises(PrunekitError, match=r"owl\.lam"):
        prunekit.prune(build("llama"), method="wanda", calibration=random_ids(), progress=False,
                       sparsity_allocation="owl", method_options={"owl.lam": 2})


def test_besa_on_the_engine_is_exact_per_block_and_learns():
    model, reference = build("llama"), build("llama")
    ids = random_ids(8, 32)
    report = prunekit.prune(model, method="besa", sparsity=0.5, calibration=ids, progress=False,
                            method_options={"epochs": 2})
    prunekit.prune(reference, method="wanda", sparsity=0.5, calibration=ids, progress=False)
    for index in range(len(model.model.layers)):
        assert _block_sparsity(model, index) == pytest.approx(0.5, abs=1e-9)
    per_layer = [layer.achieved_sparsity for layer in report.engine.layers]
    assert max(per_layer) > min(per_layer)  # sparsity moved between the layers of a block
    assert any(not torch.equal(a.weight == 0, b.weight == 0)
               for a, b in zip(model.modules(), reference.modules(), strict=True) if isinstance(a, torch.nn.Linear))


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    root = tmp_path_factory.mktemp("engine-methods")
    save_tiny_llama(root / "tiny")
    rng = random.Random(0)
    (root / "calib.txt").write_text(" ".join(rng.choice(WORDS) for _ in range(6000)))
    return root


@pytest.mark.parametrize("extra", [
    ["--method", "wanda", "--sparsity-allocation", "owl"],
    ["--method", "sparsegpt", "--refine", "dsnot"],
    ["--method", "ria", "--pattern", "2:4"],
    ["--method", "alps"],
    ["--method", "besa", "--option", "epochs=1"],
])
def test_streamed_cli_runs_every_method(capsys, folder, extra):
    out = folder / ("out-" + "-".join(extra[1::2]).replace(":", "-"))
    code, _, err = run(capsys, "prune", str(folder / "tiny"), "--calib", str(folder / "calib.txt"), "--nsamples",
                       "8", "--seqlen", "64", "--out", str(out), "--overwrite", *extra)
    assert code == 0, err
    manifest = json.loads((out / "prunekit.json").read_text())
    assert manifest["overall_sparsity"] == pytest.approx(0.5, abs=0.02)
    if "--sparsity-allocation" in extra:
        assert len(manifest["allocation"]["block_sparsities"]) == 2


def test_owl_with_a_pattern_is_one_line(capsys, folder):
    code, _, err = run(capsys, "prune", str(folder / "tiny"), "--calib", str(folder / "calib.txt"), "--out",
                       str(folder / "never"), "--sparsity-allocation", "owl", "--pattern", "2:4", "--nsamples", "8",
                       "--seqlen", "64")
    assert_one_line_error(code, err, "fixes every block's sparsity")
