"""Mask rules, shared by every method and tested once against naive loops.

All functions take a score matrix [out, in] (higher = more important) and return a boolean mask of
the same shape that is True where a weight is PRUNED.

How many weights a row loses (`count`, per-row rules only):

* ``"reference"`` (default): every row loses ``int(in_features * s)`` weights, as Wanda's reference code
  (locuslab/wanda, lib/prune.py) prunes each output row. The layer may stay just under s (30 % of 576
  inputs: 172 per row, 29.86 %).
* ``"exact-total"``: the layer loses exactly ``round(s * rows * cols)`` weights, spread over the rows so
  that rows differ by at most one weight (30 % of 576: most rows lose 173).

Both agree whenever ``s * in_features`` is a whole number, e.g. at 50 % on even widths (every layer of
the models benchmarked here). A layer-wide rule always prunes exactly ``round(s * numel)``.
"""

from __future__ import annotations

from typing import Literal

import torch

from prunekit.pruning.target import SparsityTarget

CountRule = Literal["reference", "exact-total"]
COUNT_RULES: tuple[str, ...] = ("reference", "exact-total")


def row_counts(rows: int, cols: int, sparsity: float, count: CountRule = "reference") -> torch.Tensor:
    """How many weights each row loses under `count` (see the module docstring)."""
    if count == "reference":
        return torch.full((rows,), int(cols * sparsity), dtype=torch.long)
    if count != "exact-total":
        raise ValueError(f"unknown count rule {count!r}; accepted: {', '.join(COUNT_RULES)}")
    total = round(sparsity * rows * cols)
    base, extra = divmod(total, rows)
    counts = torch.full((rows,), base, dtype=torch.long)
    counts[:extra] += 1
    return counts


#: Rows handled at once: bounds the scratch memory of a large layer (the result does not depend on it).
ROWS_PER_SLICE = 1024


def _lowest_k_per_row(scores: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
    """Mark the counts[r] lowest scores of every row r, ties broken by position (the stable-sort rule).

    A selection, not a sort: the k-th smallest value of each row (`kthvalue`) is the threshold, everything
    below it is pruned, and of the values equal to it the first ones by position complete the count. Linear
    in the row length, where sorting every row of a 7B block costs most of Wanda's time on a CPU.
    """
    mask = torch.zeros(scores.shape, dtype=torch.bool, device=scores.device)
    counts = counts.to(scores.device)
    for start in range(0, scores.shape[0], ROWS_PER_SLICE):
        part, wanted = scores[start : start + ROWS_PER_SLICE], counts[start : start + ROWS_PER_SLICE]
        target = mask[start : start + ROWS_PER_SLICE]
        for k in wanted.unique().tolist():  # one count, or two adjacent ones (the exact-total rule)
            same = bool((wanted == k).all())
            rows = slice(None) if same else (wanted == k).nonzero().squeeze(1)
            block = part if same else part[rows]
            if k <= 0:
                continue
            if k >= block.shape[1]:
                target[rows] = True
                continue
            threshold = block.kthvalue(k, dim=1, keepdim=True).values
            chosen = block < threshold
            equal = block == threshold
            missing = k - chosen.sum(1, keepdim=True)
            if bool((equal.sum(1, keepdim=True) == missing).all()):  # no tie beyond the k-th value itself
                chosen |= equal
            else:
                chosen |= equal & (equal.cumsum(1) <= missing)
            target[rows] = chosen
    return mask


def unstructured_row_mask(scores: torch.Tensor, sparsity: float, count: CountRule = "reference") -> torch.Tensor:
    """Each output row competes on its own (Wanda's comparison group)."""
    return _lowest_k_per_row(scores, row_counts(*scores.shape, sparsity, count))


def unstructured_layer_mask(scores: torch.Tensor, sparsity: float) -> torch.Tensor:
    """All weights of the layer compete together (magnitude pruning's reference group)."""
    k = round(sparsity * scores.numel())
    mask = torch.zeros(scores.numel(), dtype=torch.bool, device=scores.device)
    if k:
        flat_order = torch.argsort(scores.flatten(), stable=True)
        mask[flat_order[:k]] = True
    return mask.view_as(scores)


def nm_mask(scores: torch.Tensor, n: int, m: int) -> torch.Tensor:
    """In every run of m consecutive inputs of a row, prune the n lowest scores (no Python loop)."""
    rows, cols = scores.shape
    groups = scores.reshape(rows, cols // m, m)
    lowest = torch.argsort(groups, dim=2, stable=True)[..., :n]
    mask = torch.zeros_like(groups, dtype=torch.bool)
    mask.scatter_(2, lowest, True)
    return mask.reshape(rows, cols)


def mask_from_scores(scores: torch.Tensor, target: SparsityTarget, group: str = "row",
                     count: CountRule = "reference") -> torch.Tensor:
    """Apply the target's pattern; `group` ('row' or 'layer') and `count` only matter for unstructured."""
    if target.is_nm:
        return nm_mask(scores, target.n, target.m)  # type: ignore[arg-type]
    if group == "layer":
        return unstructured_layer_mask(scores, target.sparsity)
    return unstructured_row_mask(scores, target.sparsity, count)


def follows_nm(weight: torch.Tensor, n: int, m: int) -> bool:
    """True when every run of m consecutive inputs of every row has at least n zeros (the N:M pattern)."""
    rows, cols = weight.shape[-2], weight.shape[-1]
    if cols % m:
        return False
    zeros = (weight.reshape(rows, cols // m, m) == 0).sum(-1)
    return bool((zeros >= n).all())
