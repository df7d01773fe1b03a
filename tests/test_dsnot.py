"""DSnoT against a row-by-row naive implementation of the reference, and `--refine` end to end."""

from __future__ import annotations

import pytest
import torch

from prunekit.adapters.base import is_mlp_linear
from prunekit.api import prune
from prunekit.errors import PrunekitError
from prunekit.methods import build_method
from prunekit.methods.dsnot import DSnoTConfig, dsnot_refine
from prunekit.pruning import SparsityTarget
from prunekit.pruning.masks import nm_mask, unstructured_row_mask
from test_methods import prunable
from tiny import FAMILIES, assert_one_line_error, build, random_ids, run, save_tiny_llama

pytestmark = pytest.mark.usefixtures("one_torch_thread")  # tiny models: threads only add waiting


def naive_dsnot(dense, weight, mask, mean, var, norms, cfg, m=None):
    """The reference's cycle, one row at a time, with Python lists (float64)."""
    mask = mask.clone()
    rows, cols = dense.shape
    for i in range(rows):
        grow_gain = [float(dense[i, j]) * float(mean[j]) for j in range(cols)]
        cost = [float(weight[i, j]) * float(mean[j]) for j in range(cols)]
        wanda = [abs(float(weight[i, j])) * float(norms[j]) for j in range(cols)]
        error = sum((float(dense[i, j]) - float(weight[i, j])) * float(mean[j]) for j in range(cols))
        sign0 = (error > 0) - (error < 0)
        pruned = [j for j in range(cols) if mask[i, j]]
        grow = sorted(pruned, key=lambda j: (grow_gain[j] / float(var[j]) ** cfg.var_power, j))
        low, high = 0, len(grow) - 1
        kept = sorted((j for j in range(cols) if not mask[i, j]), key=lambda j: (wanda[j], j))
        negative = [j for j in kept if cost[j] < 0]
        positive = [j for j in kept if cost[j] > 0]
        used: set[int] = set()
        for _ in range(cfg.max_cycles):
            if low > high:
                break
            if error > 0:
                r, high = grow[high], high - 1
            else:
                r, low = grow[low], low + 1
            if m is None:
                queue = negative if error > 0 else positive
                if not queue:
                    break
                p = queue.pop(0)
            else:
                start = r - r % m
                options = [j for j in range(start, start + m) if j in kept and j not in used]
                if not options:
                    break
                p = min(options, key=lambda j: (wanda[j], j))
                used.add(p)
            after = error + cost[p] - grow_gain[r]
            if not (abs(error) > cfg.threshold and ((after > 0) - (after < 0)) == sign0):
                break
            mask[i, p], mask[i, r] = True, False
            error = after
    return mask


def problem(seed=0, rows=24, cols=32):
    g = torch.Generator().manual_seed(seed)
    dense = torch.randn(rows, cols, generator=g).double()
    mean = (torch.randn(cols, generator=g) * 2).double()
    var = (torch.rand(cols, generator=g) + 0.2).double()
    norms = (torch.rand(cols, generator=g) * 3 + 0.1).double()
    return dense, mean, var, norms


@pytest.mark.parametrize("threshold", [0.1, 0.0])
@pytest.mark.parametrize("updated", [False, True])
def test_unstructured_equals_naive(threshold, updated):
    dense, mean, var, norms = problem()
    mask = unstructured_row_mask(dense.abs() * norms, 0.5)
    weight = dense.masked_fill(mask, 0.0)
    if updated:  # a weight-updating base method (SparseGPT-like): kept weights moved
        weight = (weight * (1 + 0.3 * torch.randn(dense.shape, generator=torch.Generator().manual_seed(9)))
                  ).masked_fill(mask, 0.0).double()
    cfg = DSnoTConfig(threshold=threshold, max_cycles=7)
    refined = dsnot_refine(dense, weight, mask, mean, var, norms, cfg)
    expected = naive_dsnot(dense, weight, mask, mean, var, norms, cfg)
    assert torch.equal(refined, expected)
    assert not torch.equal(refined, mask)  # something was swapped
    assert torch.equal(refined.sum(1), mask.sum(1))  # every row keeps its count


def test_nm_equals_naive_and_keeps_the_pattern():
    dense, mean, var, norms = problem(seed=1)
    mask = nm_mask(dense.abs() * norms, 2, 4)
    weight = dense.masked_fill(mask, 0.0)
    cfg = DSnoTConfig(threshold=0.05, max_cycles=10)
    refined = dsnot_refine(dense, weight, mask, mean, var, norms, cfg, m=4)
    assert torch.equal(refined, naive_dsnot(dense, weight, mask, mean, var, norms, cfg, m=4))
    assert not torch.equal(refined, mask)
    assert torch.all(refined.view(dense.shape[0], -1, 4).sum(-1) == 2)


def test_refinement_shrinks_the_expected_error():
    dense, mean, var, norms = problem(seed=2, rows=64, cols=64)
    mask = unstructured_row_mask(dense.abs() * norms, 0.6)
    weight = dense.masked_fill(mask, 0.0)
    refined = dsnot_refine(dense, weight, mask, mean, var, norms, DSnoTConfig())

    def error(m):
        return ((dense * m) * mean).sum(1).abs()

    before, after = error(mask), error(refined)
    assert torch.all(after <= before + 1e-12) and after.sum() < 0.5 * before.sum()


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("base", ["wanda", "sparsegpt"])
@pytest.mark.parametrize("layers", ["attention", "all"])
def test_refine_keeps_the_exact_sparsity(family, base, layers):
    plain, refined = build(family), build(family)
    ids = random_ids()
    prune(plain, method=base, sparsity=0.6, calibration=ids, batch_size=4, progress=False)
    options = {"dsnot.threshold": 0.0} | ({} if layers == "attention" else {"dsnot.layers": "all"})
    report = prune(refined, method=base, refine="dsnot", sparsity=0.6, calibration=ids, batch_size=4,
                   progress=False, method_options=options)
    assert report.method["name"] == f"{base}+dsnot" and report.method["refine"]["config"]["threshold"] == 0.0
    assert report.method["refine"]["config"]["layers"] == layers
    changed = 0
    for (name, w_plain), (_, w_refined) in zip(prunable(plain), prunable(refined), strict=True):
        assert int((w_plain == 0).sum()) == int((w_refined == 0).sum()), name  # the base method's exact count
        changed += int(((w_plain == 0) != (w_refined == 0)).sum())
    assert changed > 0


@pytest.mark.parametrize("layers", ["attention", "all"])
def test_default_leaves_the_mlp_with_the_base_mask(layers):
    """The reference's default (`--skip_layer mlp`) refines only the linears outside the MLP."""
    method = build_method("wanda", {"dsnot.threshold": 0.0, "dsnot.layers": layers}, refine="dsnot")
    g = torch.Generator().manual_seed(3)
    dense = torch.randn(16, 32, generator=g)
    stats = method.statistic(32)
    stats.update(torch.randn(2, 40, 32, generator=g) + 0.5)
    names = ("model.layers.0.self_attn.q_proj", "model.layers.0.mlp.up_proj", "model.decoder.layers.0.fc1")
    targets = {n: SparsityTarget(0.5) for n in names}
    base = method.base.prune_group(dict.fromkeys(names, dense), stats.part(method.base.statistic), targets)
    refined = method.prune_group(dict.fromkeys(names, dense), stats, targets)
    for name in names:
        same = torch.equal(refined[name].mask, base[name].mask)
        assert same == (layers == "attention" and is_mlp_linear(name)), name


def test_refine_after_nm_keeps_the_pattern():
    model = build("llama")
    prune(model, method="wanda", refine="dsnot", sparsity=0.0, pattern="2:4", calibration=random_ids(),
          batch_size=4, progress=False, method_options={"dsnot.threshold": 0.0})
    for name, weight in prunable(model):
        assert torch.all((weight == 0).view(weight.shape[0], -1, 4).sum(-1) == 2), name


def test_regrown_weights_return_dense_and_the_rest_keep_the_base_update():
    from prunekit.methods.base import PruneResult
    from prunekit.methods.refine import RefinedMethod
    from prunekit.pruning.statistics import CombinedStatistic, InputHessian, InputMeanVariance

    method = build_method("sparsegpt", {}, refine="dsnot")
    assert isinstance(method, RefinedMethod)
    assert method.statistic.parts == (InputHessian, InputMeanVariance)
    assert issubclass(method.statistic, CombinedStatistic)
    g = torch.Generator().manual_seed(0)
    dense = torch.randn(8, 16, generator=g)
    stats = method.statistic(16)
    stats.update(torch.randn(2, 20, 16, generator=g) + 1.0)
    assert stats.windows == 2 and stats.part(InputHessian).tokens == 40
    base = method.base.prune_group({"l": dense}, stats.part(InputHessian), {"l": SparsityTarget(0.5)})["l"]
    result: PruneResult = method.prune_group({"l": dense}, stats, {"l": SparsityTarget(0.5)})["l"]
    regrown = base.mask & ~result.mask
    newly = ~base.mask & result.mask
    assert torch.equal(result.weight[regrown], dense[regrown])
    assert torch.all(result.weight[newly] == 0)
    untouched = ~base.mask & ~result.mask
    assert torch.equal(result.weight[untouched], base.weight[untouched])


def test_cli_refine_flag_and_recipe(tmp_path, capsys):
    folder = save_tiny_llama(tmp_path / "tiny")
    text = tmp_path / "calib.txt"
    text.write_text(" ".join(["the state of the union is strong and we will work"] * 200))
    code, _, err = run(capsys, "prune", str(folder), "--method", "wanda", "--refine", "dsnot", "--sparsity",
                         "0.5", "--calib", str(text), "--nsamples", "4", "--seqlen", "32", "--out",
                         str(tmp_path / "out"))
    assert code == 0, err
    import json

    manifest = json.loads((tmp_path / "out" / "prunekit.json").read_text())
    assert manifest["method"]["name"] == "wanda+dsnot" and manifest["recipe"]["refine"] == "dsnot"
    recipe = tmp_path / "r.yaml"
    recipe.write_text(f"method: sparsegpt\nrefine: dsnot\ncalib: {text}\nnsamples: 4\nseqlen: 32\n"
                      "options: {dsnot.max_cycles: 5}\n")
    code, _, err = run(capsys, "prune", str(folder), "--config", str(recipe), "--out", str(tmp_path / "o2"))
    assert code == 0, err
    manifest = json.loads((tmp_path / "o2" / "prunekit.json").read_text())
    assert manifest["method"]["refine"]["config"]["max_cycles"] == 5


@pytest.mark.parametrize("args,needle", [
    (["--refine", "growback"], "unknown refiner 'growback'"),
    (["--refine", "dsnot", "--option", "dsnot.cycles=3"], "cycles"),
    (["--refine", "dsnot", "--option", "dsnot.layers=mlp"], "layers"),
    (["--refine", "dsnot", "--method", "flap"], "does not produce them"),
])
def test_cli_refine_errors_are_one_line(tmp_path, capsys, args, needle):
    code, _, err = run(capsys, "prune", str(tmp_path / "missing-model"), *args, "--out", str(tmp_path / "o"))
    assert_one_line_error(code, err, needle)


def test_refine_on_a_block_method_is_refused():
    with pytest.raises(PrunekitError, match="does not produce them"):
        build_method("besa", {}, refine="dsnot")
