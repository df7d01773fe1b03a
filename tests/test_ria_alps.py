"""RIA and ALPS against small naive implementations of the references, and on tiny models end to end."""

from __future__ import annotations

import itertools

import pytest
import torch

from prunekit.api import prune
from prunekit.methods import build_method
from prunekit.methods.alps import ALPSConfig, alps_prune, lowest_k
from prunekit.methods.ria import heuristic_order, lsa_refine, ria_nm_mask
from prunekit.pruning import SparsityTarget
from prunekit.pruning.statistics import InputHessian, InputSquaredNorms
from test_methods import prunable
from tiny import FAMILIES, build, random_ids

pytestmark = pytest.mark.usefixtures("one_torch_thread")  # tiny models: threads only add waiting


def layer_problem(rows=12, cols=16, tokens=64, seed=0):
    g = torch.Generator().manual_seed(seed)
    weight = torch.randn(rows, cols, generator=g)
    inputs = torch.randn(tokens, cols, generator=g) @ torch.randn(cols, cols, generator=g) * 0.5
    inputs = inputs * torch.rand(cols, generator=g) * 3
    return weight, inputs


def naive_ria_scores(weight, norms, a):
    rows, cols = weight.shape
    w = weight.double().tolist()
    col_sum = [sum(abs(w[i][j]) for i in range(rows)) for j in range(cols)]
    row_sum = [sum(abs(w[i][j]) for j in range(cols)) for i in range(rows)]
    return [[(abs(w[i][j]) / col_sum[j] + abs(w[i][j]) / row_sum[i]) * float(norms[j]) ** a for j in range(cols)]
            for i in range(rows)]


@pytest.mark.parametrize("group", ["layer", "row"])
def test_ria_unstructured_equals_naive(group):
    weight, inputs = layer_problem()
    stats = InputSquaredNorms(weight.shape[1])
    stats.update(inputs.unsqueeze(0))
    result = build_method("ria", {"group": group}).prune_layer(weight, stats, SparsityTarget(0.4))
    scores = naive_ria_scores(weight, inputs.double().norm(dim=0), 0.5)
    rows, cols = weight.shape
    expected = torch.zeros(rows, cols, dtype=torch.bool)
    if group == "layer":
        ranked = sorted((scores[i][j], i * cols + j) for i in range(rows) for j in range(cols))
        for _, flat in ranked[: round(0.4 * rows * cols)]:
            expected[flat // cols, flat % cols] = True
    else:
        for i in range(rows):  # the reference's per-row count, int(in_features * s)
            for _, j in sorted((scores[i][j], j) for j in range(cols))[: int(cols * 0.4)]:
                expected[i, j] = True
    assert torch.equal(result.mask, expected)
    assert torch.equal(result.weight, weight.masked_fill(expected, 0.0))


def naive_retained(scores, columns, n, m):
    """Score an N:M mask keeps over the groups formed by `columns` (consecutive runs of m)."""
    total = 0.0
    for row in scores:
        for g in range(0, len(columns), m):
            values = sorted((row[c] for c in columns[g : g + m]), reverse=True)
            total += sum(values[: m - n])
    return total


def test_ria_channel_permutation_equals_naive():
    """Heuristic reallocation then, slot by slot, the best assignment found by trying every permutation."""
    g = torch.Generator().manual_seed(3)
    scores = torch.rand(5, 16, generator=g).double()
    n, m = 2, 4
    rows, cols = scores.shape
    sums = [sum(scores[i, j].item() for i in range(rows)) for j in range(cols)]
    ranked = sorted(range(cols), key=lambda j: (sums[j], j))
    order = [0] * cols
    band = cols // m
    for slot in range(m):
        members = ranked[slot * band : (slot + 1) * band]
        if slot % 2:
            members = members[::-1]
        for k, column in enumerate(members):
            order[k * m + slot] = column
    assert heuristic_order(scores, m).tolist() == order

    table = scores.tolist()
    for slot in range(m):
        offered = [order[k * m + slot] for k in range(band)]
        best, best_value = None, -1.0
        for perm in itertools.permutations(range(band)):
            trial = list(order)
            for k in range(band):
                trial[k * m + slot] = offered[perm[k]]
            value = naive_retained(table, trial, n, m)
            if value > best_value:
                best, best_value = trial, value
        order = best
    refined = lsa_refine(scores, heuristic_order(scores, m), n, m, chunk=3)
    assert refined.tolist() == order
    mask, column_order = ria_nm_mask(scores, n, m, "lsa")
    assert torch.equal(column_order, refined)
    assert torch.all(mask[:, column_order].view(rows, -1, m).sum(-1) == n)  # N:M on the permuted columns
    kept = naive_retained(table, list(range(cols)), n, m)
    assert naive_retained(table, order, n, m) >= kept  # the permutation never keeps less than plain N:M


def naive_alps(weight, xtx, sparsity, cfg: ALPSConfig):
    """The reference's ADMM written plainly in float64: explicit inverses, sorted projections, plain CG."""
    w = weight.double()
    gram = xtx.double().clone()
    gram += torch.eye(len(gram), dtype=torch.float64) * cfg.percdamp * torch.diag(gram).mean()
    scale = torch.diag(gram).sqrt() + 1e-8
    gram = gram / torch.outer(scale, scale)
    dense = (w * scale).T.clone()
    rhs = gram @ dense
    numel = dense.numel()
    prune_count = round(sparsity * numel)
    kept = numel - prune_count

    def project(v):
        order = sorted(range(numel), key=lambda i: (abs(v.flatten()[i].item()), i))
        pruned = torch.zeros(numel, dtype=torch.bool)
        pruned[order[:prune_count]] = True
        pruned = pruned.view_as(v)
        return v.masked_fill(pruned, 0.0), pruned

    rho = cfg.rho
    d_init, supp = project(dense)
    b, d, v = dense.clone(), d_init.clone(), torch.zeros_like(dense)
    grown = False
    for it in range(cfg.max_iter):
        b = torch.linalg.inv(gram + rho * torch.eye(len(gram), dtype=torch.float64)) @ (rhs - v + rho * d)
        d, pruned = project(b + v / rho)
        v = v + rho * (b - d)
        if (it + 1) % cfg.update_iter == 0:
            change = int((pruned != supp).sum())
            supp = pruned
            if change / kept > 0.1:
                grown, rho = True, rho * 1.3
            elif change / kept > 0.005:
                grown, rho = True, rho * 1.2
            elif change > 0:
                if grown:
                    rho *= 1.1
                else:
                    rho /= 5
                    b, d, v = dense.clone(), d_init.clone(), torch.zeros_like(dense)
            elif grown:
                break
            else:
                rho /= 5
            rho = min(rho, 1e6)
            if it >= cfg.switch_iter and change / kept < 0.0003:
                break
    b, pruned = project(b)
    keep = (~pruned).double()
    for col in range(b.shape[1]):  # CG per output, restricted to the support
        x = b[:, col].clone()
        s = keep[:, col]
        r = (rhs[:, col] - gram @ x) * s
        p = r.clone()
        rr = float(r @ r)
        for _ in range(cfg.cg_iters):
            if rr <= (cfg.cg_rtol * float(rhs[:, col].norm())) ** 2:
                break
            ap = gram @ p
            alpha = rr / float(p @ ap)
            x = x + alpha * p
            r = (r - alpha * ap) * s
            rr_new = float(r @ r)
            p = r + rr_new / rr * p
            rr = rr_new
        b[:, col] = x
    return (b / scale[:, None]).T.masked_fill(pruned.T, 0.0), pruned.T


def test_alps_equals_naive_float64():
    weight, inputs = layer_problem(rows=10, cols=12, tokens=40)
    xtx = inputs.double().T @ inputs.double()
    cfg = ALPSConfig()
    new_weight, mask = alps_prune(weight.double(), xtx, SparsityTarget(0.5), cfg)
    expected_weight, expected_mask = naive_alps(weight, xtx, 0.5, cfg)
    assert torch.equal(mask, expected_mask)
    assert torch.allclose(new_weight, expected_weight, atol=1e-8)
    assert int(mask.sum()) == 60


def reconstruction_error(weight, new_weight, xtx):
    delta = (weight - new_weight).double()
    return float(torch.einsum("ij,jk,ik->", delta, xtx.double(), delta))


@pytest.mark.parametrize("target", [SparsityTarget(0.7), SparsityTarget(0.5, 2, 4)])
def test_alps_reconstructs_better_than_wanda_and_sparsegpt(target):
    weight, inputs = layer_problem(rows=32, cols=48, tokens=256, seed=5)
    stats = InputHessian(48)
    stats.update(inputs.unsqueeze(0))
    norms = InputSquaredNorms(48)
    norms.update(inputs.unsqueeze(0))
    alps = build_method("alps").prune_layer(weight, stats, target)
    wanda = build_method("wanda").prune_layer(weight, norms, target)
    sparsegpt = build_method("sparsegpt").prune_layer(weight, stats, target)
    assert int(alps.mask.sum()) == round(target.sparsity * weight.numel())
    assert torch.all(alps.weight[alps.mask] == 0)
    errors = {r: reconstruction_error(weight, res.weight, stats.xtx)
              for r, res in (("alps", alps), ("wanda", wanda), ("sparsegpt", sparsegpt))}
    assert errors["alps"] < errors["sparsegpt"] < errors["wanda"], errors


def test_lowest_k_matches_a_stable_sort():
    values = torch.tensor([3.0, 1.0, 2.0, 1.0, 5.0, 1.0, 0.5])
    for k in range(len(values) + 1):
        expected = torch.zeros(len(values), dtype=torch.bool)
        expected[torch.argsort(values, stable=True)[:k]] = True
        assert torch.equal(lowest_k(values, k), expected), k


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("method", ["ria", "alps"])
def test_exact_sparsity_on_tiny_models(family, method):
    model = build(family)
    report = prune(model, method=method, sparsity=0.6, calibration=random_ids(), batch_size=4, progress=False)
    for name, weight in prunable(model):
        assert abs((weight == 0).float().mean().item() - 0.6) < 1e-3, name
    assert report.method["name"] == method and "config" in report.method


@pytest.mark.parametrize("method,options", [("alps", {}), ("ria", {"permutation": "none"})])
def test_nm_structure_on_tiny_models(method, options):
    model = build("llama")
    prune(model, method=method, sparsity=0.0, pattern="2:4", calibration=random_ids(), batch_size=4,
          progress=False, method_options=options)
    for name, weight in prunable(model):
        assert torch.all((weight == 0).view(weight.shape[0], -1, 4).sum(-1) == 2), name


def test_ria_permuted_nm_holds_on_the_recorded_order():
    weight, inputs = layer_problem(rows=16, cols=32)
    stats = InputSquaredNorms(32)
    stats.update(inputs.unsqueeze(0))
    result = build_method("ria").prune_layer(weight, stats, SparsityTarget(0.5, 2, 4))
    assert result.column_order is not None and sorted(result.column_order.tolist()) == list(range(32))
    assert torch.all(result.mask[:, result.column_order].view(16, -1, 4).sum(-1) == 2)
    assert int(result.mask.sum()) == 16 * 16


def test_ria_permutation_is_recorded_in_the_report_and_the_saved_zeros_follow_it():
    """The saved model is only N:M under RIA's channel order, so the order must travel with it (manifest)."""
    model = build("llama")
    report = prune(model, method="ria", sparsity=0.0, pattern="2:4", calibration=random_ids(), batch_size=4,
                   progress=False)
    records = {r["name"]: r for r in report.to_dict()["layers"]}
    weights = dict(prunable(model))
    permuted_somewhere = False
    for name, weight in weights.items():
        order = records[name]["column_order"]
        assert sorted(order) == list(range(weight.shape[1])), name
        zeros = (weight == 0)[:, order].view(weight.shape[0], -1, 4).sum(-1)
        assert torch.all(zeros == 2), name
        permuted_somewhere |= order != list(range(weight.shape[1]))
    assert permuted_somewhere


@pytest.mark.parametrize("method,options,needle", [
    ("ria", {"permutation": "best"}, "permutation"),
    ("ria", {"alpha": 1}, "alpha"),
    ("alps", {"rho": "x"}, "rho"),
])
def test_bad_options_are_one_line(method, options, needle):
    from prunekit.errors import PrunekitError

    with pytest.raises(PrunekitError) as info:
        build_method(method, options)
    assert needle in str(info.value) and "\n" not in str(info.value)
