"""GBLM-Pruner: the gradient pass against plain autograd, the score against naive loops, the cache, errors."""

from __future__ import annotations

import math

import pytest
import torch

from prunekit.adapters import weight_matrix
from prunekit.api import prune
from prunekit.errors import PrunekitError
from prunekit.files import atomic_save_tensors
from prunekit.methods import build_method
from prunekit.pruning import SparsityTarget
from prunekit.pruning.gradients import compute_gradient_norms, prunable_linears
from prunekit.pruning.statistics import InputSquaredNorms
from test_methods import prunable
from tiny import assert_one_line_error, build, random_ids, run

pytestmark = pytest.mark.usefixtures("one_torch_thread")  # tiny models: threads only add waiting


def naive_gradient_norms(model, ids, scale=100.0):
    """Every parameter trainable, one backward per window, .grad read and summed by hand."""
    linears = prunable_linears(model)
    sums = {name: 0 for name in linears}
    for window in ids:
        model.zero_grad()
        model(input_ids=window[None], labels=window[None], use_cache=False).loss.backward()
        for name, module in linears.items():
            grad = module.weight.grad.double()
            if type(module).__name__ == "Conv1D":
                grad = grad.t()
            sums[name] = sums[name] + (scale * grad) ** 2
    model.zero_grad()
    return {name: total.sqrt() for name, total in sums.items()}


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_gradient_pass_equals_plain_autograd(family, tmp_path):
    model = build(family)
    ids = random_ids(n=3, seqlen=16)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    norms = compute_gradient_norms(model, ids, path=tmp_path / "g.safetensors")
    assert all(p.grad is None for p in model.parameters())
    assert {n: p.requires_grad for n, p in model.named_parameters()} == flags
    assert all(torch.equal(p, before[n]) for n, p in model.named_parameters())
    expected = naive_gradient_norms(build(family), ids)
    assert list(norms) == list(expected)
    for name, value in norms.items():
        assert value.shape == weight_matrix(prunable_linears(model)[name]).shape
        assert torch.allclose(value.double(), expected[name], rtol=1e-4, atol=1e-6), name
    from safetensors import safe_open

    with safe_open(str(tmp_path / "g.safetensors"), "pt") as handle:
        assert set(handle.keys()) == set(norms)
        assert '"windows": 3' in handle.metadata()["prunekit"]


def naive_gblm_mask(weight, gradient, inputs, windows, sparsity):
    rows, cols = weight.shape
    norms = [math.sqrt(sum(float(x) ** 2 for x in inputs[:, j])) for j in range(cols)]
    total = round(sparsity * rows * cols)
    mask = torch.zeros(rows, cols, dtype=torch.bool)
    for i in range(rows):
        scores = [(abs(float(weight[i, j])) * (float(gradient[i, j]) + norms[j] / math.sqrt(windows)), j)
                  for j in range(cols)]
        count = total // rows + (1 if i < total % rows else 0)
        for _, j in sorted(scores)[:count]:
            mask[i, j] = True
    return mask


def test_score_and_mask_equal_naive(tmp_path):
    g = torch.Generator().manual_seed(0)
    weight = torch.randn(8, 12, generator=g)
    gradient = torch.rand(8, 12, generator=g) * 4
    inputs = torch.randn(3, 10, 12, generator=g)
    path = tmp_path / "g.safetensors"
    atomic_save_tensors({"blk.q": gradient}, path, metadata={"prunekit": '{"prunekit": "gblm-gradients"}'})
    stats = InputSquaredNorms(12)
    stats.update(inputs)
    method = build_method("gblm", {"gradients": str(path)})
    result = method.prune_group({"blk.q": weight}, stats, {"blk.q": SparsityTarget(0.5)})["blk.q"]
    assert torch.equal(result.mask, naive_gblm_mask(weight, gradient, inputs.reshape(-1, 12), 3, 0.5))
    # the gradient term matters: without it the mask is Wanda's
    wanda = build_method("wanda").prune_layer(weight, stats, SparsityTarget(0.5))
    assert not torch.equal(result.mask, wanda.mask)


def test_cached_gradients_serve_several_sparsities_and_patterns(tmp_path):
    ids = random_ids()
    path = tmp_path / "grads.safetensors"
    compute_gradient_norms(build("llama"), ids, path=path)
    stamp = path.stat().st_mtime_ns
    for sparsity, pattern in ((0.5, None), (0.7, None), (0.0, "2:4")):
        model = build("llama")
        report = prune(model, method="gblm", sparsity=sparsity, pattern=pattern, calibration=ids, batch_size=4,
                       progress=False, method_options={"gradients": str(path)})
        for layer in report.engine.layers:  # the reference's per-row count, int(in_features * s), as Wanda's
            cols = layer.shape[1]
            expected = 0.5 if pattern else int(cols * sparsity) / cols
            assert layer.achieved_sparsity == pytest.approx(expected), layer.name
        for name, weight in prunable(model):
            if pattern:
                assert torch.all((weight == 0).view(weight.shape[0], -1, 4).sum(-1) == 2), name
            else:
                expected = int(weight.shape[1] * sparsity) / weight.shape[1]
                assert abs((weight == 0).float().mean().item() - expected) < 1e-3, name
    assert path.stat().st_mtime_ns == stamp
    assert report.method["config"]["gradients"] == str(path)


def test_gradients_of_another_model_are_refused(tmp_path):
    path = tmp_path / "gpt2.safetensors"
    compute_gradient_norms(build("gpt2"), random_ids(n=2, seqlen=8), path=path)
    with pytest.raises(PrunekitError, match=r"has no entry for layer model\.layers\.0\.self_attn\.q_proj"):
        prune(build("llama"), method="gblm", sparsity=0.5, calibration=random_ids(), progress=False,
              method_options={"gradients": str(path)})


def test_cli_errors_are_one_line(tmp_path, capsys):
    code, _, err = run(capsys, "prune", str(tmp_path / "m"), "--method", "gblm", "--out", str(tmp_path / "o"))
    assert_one_line_error(code, err, "gradients: Field required")
    code, _, err = run(capsys, "prune", str(tmp_path / "m"), "--method", "gblm", "--option",
                       f"gradients={tmp_path / 'none.safetensors'}", "--out", str(tmp_path / "o"))
    assert_one_line_error(code, err, "not found")
    other = tmp_path / "other.safetensors"
    atomic_save_tensors({"x": torch.zeros(2)}, other)
    code, _, err = run(capsys, "prune", str(tmp_path / "m"), "--method", "gblm", "--option", f"gradients={other}",
                       "--out", str(tmp_path / "o"))
    assert_one_line_error(code, err, "not written by prunekit")


def test_cli_gradients_then_prune(tmp_path, capsys):
    import json

    from tiny import save_tiny_llama

    folder = save_tiny_llama(tmp_path / "tiny")
    text = tmp_path / "calib.txt"
    text.write_text(" ".join(["the state of the union is strong and we will work"] * 200))
    grads = tmp_path / "g.safetensors"
    calib = ["--calib", str(text), "--nsamples", "3", "--seqlen", "32"]
    code, out, err = run(capsys, "gradients", str(folder), *calib, "--out", str(grads))
    assert code == 0 and "3 windows x 32 tokens" in out, err
    code, _, err = run(capsys, "prune", str(folder), "--method", "gblm", "--option", f"gradients={grads}", *calib,
                       "--out", str(tmp_path / "pruned"))
    assert code == 0, err
    manifest = json.loads((tmp_path / "pruned" / "prunekit.json").read_text())
    assert manifest["method"]["config"]["gradients"] == str(grads)
    assert abs(manifest["overall_sparsity"] - 0.5) < 1e-3
    code, _, err = run(capsys, "gradients", str(folder), *calib, "--out", str(grads))
    assert_one_line_error(code, err, "exists")
