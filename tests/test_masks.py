"""Mask rules against naive loops, and sparsity targets."""

from __future__ import annotations

import pytest
import torch

from prunekit.errors import PrunekitError
from prunekit.pruning import (
    SparsityPlan,
    nm_mask,
    parse_pattern,
    row_counts,
    unstructured_layer_mask,
    unstructured_row_mask,
)


def naive_row_mask(scores: torch.Tensor, counts: list[int]) -> torch.Tensor:
    mask = torch.zeros_like(scores, dtype=torch.bool)
    for r in range(scores.shape[0]):
        values = scores[r].tolist()
        order = sorted(range(len(values)), key=lambda j: (values[j], j))
        for j in order[: counts[r]]:
            mask[r, j] = True
    return mask


def naive_nm_mask(scores: torch.Tensor, n: int, m: int) -> torch.Tensor:
    mask = torch.zeros_like(scores, dtype=torch.bool)
    for r in range(scores.shape[0]):
        for g in range(0, scores.shape[1], m):
            values = scores[r, g : g + m].tolist()
            for j in sorted(range(m), key=lambda j: (values[j], j))[:n]:
                mask[r, g + j] = True
    return mask


def naive_wanda_reference_mask(scores: torch.Tensor, sparsity: float) -> torch.Tensor:
    """Wanda's reference (locuslab/wanda lib/prune.py): sort each row, prune its first int(in_features * s)."""
    mask = torch.zeros_like(scores, dtype=torch.bool)
    k = int(scores.shape[1] * sparsity)
    for r in range(scores.shape[0]):
        values = scores[r].tolist()
        for j in sorted(range(len(values)), key=lambda j: (values[j], j))[:k]:
            mask[r, j] = True
    return mask


@pytest.mark.parametrize("sparsity", [0.1, 0.3, 0.5, 0.7])
@pytest.mark.parametrize("cols", [576, 1536, 37])
def test_row_mask_default_is_the_reference_count(sparsity, cols):
    """The default per-row rule is the reference's: int(in_features * s) in every row, at every sparsity."""
    scores = torch.rand(12, cols, generator=torch.Generator().manual_seed(cols))
    mask = unstructured_row_mask(scores, sparsity)
    assert torch.equal(mask, naive_wanda_reference_mask(scores, sparsity))
    assert torch.all(mask.sum(1) == int(cols * sparsity))


def test_reference_and_exact_total_counts_differ_off_half():
    """At 30 % of 576 inputs the reference prunes 172 per row; the exact total would give most rows 173."""
    assert row_counts(576, 576, 0.3).unique().tolist() == [172]
    exact = row_counts(576, 576, 0.3, "exact-total")
    assert int(exact.sum()) == round(0.3 * 576 * 576) and int((exact == 173).sum()) == 461


@pytest.mark.parametrize("rows,cols", [(576, 576), (192, 576), (1536, 576), (576, 1536), (7, 64)])
def test_counts_agree_at_half_on_even_widths(rows, cols):
    """At 50 % on an even width both rules prune the same weights: the classic 50 % results stand."""
    scores = torch.rand(rows, cols, generator=torch.Generator().manual_seed(rows + cols))
    assert torch.equal(row_counts(rows, cols, 0.5), row_counts(rows, cols, 0.5, "exact-total"))
    assert torch.equal(unstructured_row_mask(scores, 0.5), unstructured_row_mask(scores, 0.5, "exact-total"))


@pytest.mark.parametrize("rows,cols,sparsity", [(7, 13, 0.5), (16, 24, 0.3), (5, 64, 0.9), (3, 10, 0.0)])
def test_exact_total_counts(rows, cols, sparsity):
    counts = row_counts(rows, cols, sparsity, "exact-total")
    assert int(counts.sum()) == round(sparsity * rows * cols)
    assert int(counts.max() - counts.min()) <= 1


@pytest.mark.parametrize("sparsity", [0.1, 0.5, 0.77])
def test_exact_total_row_mask_matches_naive(sparsity):
    scores = torch.rand(9, 40, generator=torch.Generator().manual_seed(0))
    counts = row_counts(9, 40, sparsity, "exact-total").tolist()
    assert torch.equal(unstructured_row_mask(scores, sparsity, "exact-total"), naive_row_mask(scores, counts))


def test_layer_mask_matches_naive():
    scores = torch.rand(6, 11, generator=torch.Generator().manual_seed(1))
    k = round(0.4 * scores.numel())
    threshold_order = sorted(range(scores.numel()), key=lambda i: (scores.flatten()[i].item(), i))[:k]
    naive = torch.zeros(scores.numel(), dtype=torch.bool)
    naive[threshold_order] = True
    assert torch.equal(unstructured_layer_mask(scores, 0.4), naive.view_as(scores))


@pytest.mark.parametrize("n,m", [(1, 2), (2, 4), (4, 8), (3, 8), (1, 3), (2, 3)])
def test_nm_mask_matches_naive(n, m):
    scores = torch.rand(5, 24, generator=torch.Generator().manual_seed(n * 10 + m))
    mask = nm_mask(scores, n, m)
    assert torch.equal(mask, naive_nm_mask(scores, n, m))
    assert torch.all(mask.view(5, -1, m).sum(-1) == n)


def test_ties_are_broken_by_position():
    scores = torch.ones(2, 8)
    assert unstructured_row_mask(scores, 0.5)[:, :4].all()
    assert nm_mask(scores, 2, 4).view(2, 2, 4)[..., :2].all()


@pytest.mark.parametrize("pattern,needle", [
    ("4:4", "N < M"), ("5:4", "N < M"), ("0:4", "N < M"), ("2-4", "not understood"), ("abc", "not understood"),
])
def test_bad_patterns(pattern, needle):
    with pytest.raises(PrunekitError, match=needle) as info:
        parse_pattern(pattern, 0.5)
    assert "\n" not in str(info.value)


@pytest.mark.parametrize("sparsity", [-0.1, 1.0, 1.5, "half"])
def test_bad_sparsity(sparsity):
    with pytest.raises(PrunekitError, match=r"\[0, 1\)"):
        parse_pattern("unstructured", sparsity)


def test_nm_width_check_names_layer():
    target = parse_pattern("2:8", 0.0)
    with pytest.raises(PrunekitError, match=r"width 60 of layer blocks\.0\.fc"):
        target.check_width(60, "blocks.0.fc")
    target.check_width(64, "blocks.0.fc")


def test_plan_overrides_and_skip():
    plan = SparsityPlan.build(0.5, None, {"*.mlp.*": 0.7, "*.q_proj": "2:4"}, skip=["lm_head"])
    assert plan.target_for("model.layers.0.mlp.up_proj").sparsity == 0.7
    q = plan.target_for("model.layers.3.self_attn.q_proj")
    assert (q.n, q.m) == (2, 4)
    assert plan.target_for("model.layers.0.self_attn.o_proj").sparsity == 0.5
    assert plan.target_for("lm_head") is None
    assert parse_pattern("2:4", 0.9).sparsity == 0.5
