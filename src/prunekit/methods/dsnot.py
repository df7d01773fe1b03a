"""DSnoT (Zhang et al., ICLR 2024): Dynamic Sparse no Training, a prune-and-grow refinement of any mask.

Statistics: per input channel the mean μ_j (as the reference: Σ_t x_tj / number of windows), the
variance and ||X_j||₂. Per output row i, the expected reconstruction error of the current layer is
e_i = Σ_j (W⁰_ij − W_ij) μ_j (dense minus pruned weights; for a mask-only method, the pruned weights'
W·μ). Each cycle swaps one pruned weight back in and one kept weight out, per row, to shrink e_i:
- grow: the pruned weight with the largest W⁰μ / Var^γ when e > 0, the smallest when e < 0;
- prune: the least Wanda-important kept weight whose Wμ has the opposite sign of e (N:M: the least
  Wanda-important kept weight in the grown weight's group of M, so the pattern holds);
a row stops when |e| ≤ threshold, when the swap would flip the sign of e, or after `max_cycles`.
By default, as the reference (`--skip_layer mlp`), only the linears outside the MLP are refined; the MLP
keeps the base method's mask (`layers="all"` refines every linear).
Counts per row never change, so the sparsity is the base method's, exactly. Grown weights return with
their dense value; everything else keeps the base method's (possibly updated) value.
"""

from __future__ import annotations

from typing import Literal

import torch

from prunekit.adapters.base import is_mlp_linear
from prunekit.methods.base import MethodConfig, PruneResult
from prunekit.methods.refine import Refiner, register_refiner
from prunekit.pruning.statistics import InputMeanVariance
from prunekit.pruning.target import SparsityTarget


class DSnoTConfig(MethodConfig):
    max_cycles: int = 50
    #: A row stops once |e_i| is at most this (units of W · Σ_t x / windows, as the reference).
    threshold: float = 0.1
    #: Exponent γ of the variance that divides the growth score.
    var_power: float = 1.0
    #: "attention": every linear outside the MLP (the reference's default, `--skip_layer mlp`); "all".
    layers: Literal["attention", "all"] = "attention"


def _take(table: torch.Tensor, pointer: torch.Tensor) -> torch.Tensor:
    return table.gather(1, pointer.clamp(0, table.shape[1] - 1).unsqueeze(1)).squeeze(1)


def dsnot_refine(dense: torch.Tensor, weight: torch.Tensor, mask: torch.Tensor, mean: torch.Tensor,
                 variance: torch.Tensor, input_norms: torch.Tensor, config: DSnoTConfig | None = None,
                 m: int | None = None) -> torch.Tensor:
    """The refined pruned mask (True = pruned) for dense [out, in] weights pruned to `weight` by `mask`.

    With `m`, swaps stay inside each group of m inputs (N:M)."""
    cfg = config or DSnoTConfig()
    rows = dense.shape[0]
    mask = mask.clone()
    arange = torch.arange(rows, device=dense.device)
    mean, variance, norms = mean.to(dense), variance.to(dense), input_norms.to(dense)
    grow_gain = dense * mean  # error removed by growing a pruned weight
    prune_cost = weight * mean  # error added by pruning a kept weight
    error = ((dense - weight) * mean).sum(dim=1)
    start_sign = error.sign()

    # growth candidates: pruned weights by W⁰μ / Var^γ, ascending (non-candidates sort last)
    grow_key = (grow_gain / variance.clamp_min(1e-12).pow(cfg.var_power)).masked_fill(~mask, float("inf"))
    grow_order = torch.argsort(grow_key, dim=1, stable=True)
    grow_low = torch.zeros(rows, dtype=torch.long, device=dense.device)
    grow_high = mask.sum(dim=1) - 1
    wanda = weight.abs() * norms.unsqueeze(0)
    if m is None:  # prune candidates: kept weights by Wanda score, split by the sign of their Wμ
        by_wanda = torch.argsort(wanda.masked_fill(mask, float("inf")), dim=1, stable=True)
        sign_sorted = prune_cost.gather(1, by_wanda)
        kept_sorted = ~mask.gather(1, by_wanda)
        lists, pointers, lengths = {}, {}, {}
        for side, select in (("neg", sign_sorted < 0), ("pos", sign_sorted > 0)):
            select = select & kept_sorted
            # stable sort of the selected entries to the front, in Wanda order
            front = torch.argsort((~select).to(torch.int8), dim=1, stable=True)
            lists[side] = by_wanda.gather(1, front)
            lengths[side] = select.sum(dim=1)
            pointers[side] = torch.zeros(rows, dtype=torch.long, device=dense.device)
    else:
        prunable = wanda.masked_fill(mask, float("inf"))

    active = torch.ones(rows, dtype=torch.bool, device=dense.device)
    for _ in range(cfg.max_cycles):
        positive = error > 0
        available = grow_low <= grow_high
        grow = _take(grow_order, torch.where(positive, grow_high, grow_low))
        grow_high = grow_high - (positive & active).long()
        grow_low = grow_low + (~positive & active).long()
        if m is None:
            use_neg = positive
            pointer = torch.where(use_neg, pointers["neg"], pointers["pos"])
            length = torch.where(use_neg, lengths["neg"], lengths["pos"])
            available &= pointer < length
            prune = torch.where(use_neg, _take(lists["neg"], pointers["neg"]), _take(lists["pos"], pointers["pos"]))
            pointers["neg"] = pointers["neg"] + (use_neg & active).long()
            pointers["pos"] = pointers["pos"] + (~use_neg & active).long()
        else:
            group_start = grow - grow % m
            in_group = group_start.unsqueeze(1) + torch.arange(m, device=dense.device)
            scores = prunable.gather(1, in_group)
            best, offset = scores.min(dim=1)
            available &= torch.isfinite(best)
            prune = group_start + offset
        after = error + prune_cost[arange, prune] - grow_gain[arange, grow]
        active = active & available & (error.abs() > cfg.threshold) & (after.sign() == start_sign)
        if not bool(active.any()):
            break
        mask[arange[active], prune[active]] = True
        mask[arange[active], grow[active]] = False
        error = torch.where(active, after, error)
        if m is not None:
            prunable[arange[active], prune[active]] = float("inf")
    return mask


class DSnoT(Refiner):
    name = "dsnot"
    config_class = DSnoTConfig
    statistic = InputMeanVariance

    def applies_to(self, name: str) -> bool:
        return self.config.layers == "all" or not is_mlp_linear(name)

    def refine(self, dense: torch.Tensor, result: PruneResult, stats: InputMeanVariance,
               target: SparsityTarget) -> torch.Tensor:
        mean = stats.sum.float() / max(stats.windows, 1)
        order = result.column_order
        if order is None:
            return dsnot_refine(dense, result.weight, result.mask, mean, stats.variance(), stats.norms(),
                                self.config, target.m)
        refined = dsnot_refine(dense[:, order], result.weight[:, order], result.mask[:, order], mean[order],
                               stats.variance()[order], stats.norms()[order], self.config, target.m)
        mask = torch.empty_like(refined)
        mask[:, order] = refined
        return mask


register_refiner(DSnoT)
