"""OWL's outlier ratio and per-block allocation against the reference's formula and naive counting."""

from __future__ import annotations

import itertools

import pytest
import torch

from prunekit.errors import PrunekitError
from prunekit.pruning.owl import owl_block_ratio, owl_sparsities


def test_block_ratio_equals_naive_count():
    g = torch.Generator().manual_seed(0)
    weights = {"q": torch.randn(6, 8, generator=g), "down": torch.randn(8, 12, generator=g) ** 3}
    norms = {"q": torch.rand(8, generator=g) * 4, "down": torch.rand(12, generator=g)}
    scores = [abs(float(w[i, j])) * float(norms[n][j]) for n, w in weights.items()
              for i in range(w.shape[0]) for j in range(w.shape[1])]
    mean = sum(scores) / len(scores)
    for m in (1.0, 2.0, 5.0):
        expected = sum(s > m * mean for s in scores) / len(scores)
        assert owl_block_ratio(weights, norms, m) == pytest.approx(expected, abs=1e-12)


def test_equal_blocks_reproduce_the_reference_formula():
    ratios = [0.010, 0.030, 0.021, 0.014, 0.025]  # the reference spread stays within ±λ here
    target, lam = 0.6, 0.08
    r = torch.tensor(ratios, dtype=torch.float64)
    scaled = (r - r.min()) / (r.max() - r.min()) * 2 * lam
    reference = (target - (scaled - scaled.mean())).tolist()  # 1 - density of the reference
    got = owl_sparsities(ratios, [100] * 5, target, lam)
    assert got == pytest.approx(reference, abs=1e-9)
    assert sum(got) / 5 == pytest.approx(target, abs=1e-12)


@pytest.mark.parametrize("params", [[100] * 6, [50, 300, 100, 80, 120, 400]])
def test_band_weighted_exactness_and_order(params):
    ratios = [0.001, 0.002, 0.0015, 0.0012, 0.09, 0.0011]  # one block full of outliers
    target, lam = 0.7, 0.08
    got = owl_sparsities(ratios, params, target, lam)
    weighted = sum(s * p for s, p in zip(got, params, strict=True)) / sum(params)
    assert weighted == pytest.approx(target, abs=1e-9)
    assert all(target - lam - 1e-12 <= s <= target + lam + 1e-12 for s in got)
    order = sorted(range(6), key=lambda i: ratios[i])
    assert all(got[a] >= got[b] - 1e-12 for a, b in itertools.pairwise(order))  # more outliers, less pruning
    assert got[4] == pytest.approx(target - lam)  # the outlier block is clipped at the band's edge


def test_uniform_ratios_give_the_target_everywhere():
    assert owl_sparsities([0.02] * 4, [10] * 4, 0.5) == pytest.approx([0.5] * 4)


@pytest.mark.parametrize("target,lam,needle", [(1.2, 0.08, "target sparsity"), (0.5, -0.1, "lambda")])
def test_bad_values_are_one_line_errors(target, lam, needle):
    with pytest.raises(PrunekitError, match=needle):
        owl_sparsities([0.1, 0.2], [1, 1], target, lam)
