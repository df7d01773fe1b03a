"""OWL (Yin et al., ICML 2024): Outlier-Weighted Layerwise sparsity.

Per block, the outlier ratio is the share of the Wanda scores |W_ij| · ||X_j||₂ of all its prunable
linears (taken together, as the reference) that exceed M times their mean. Blocks with more outliers
are pruned less: the ratios are min-max scaled to [0, 2λ], and a block's sparsity is the target minus
its scaled ratio plus one common shift. The reference centres the shift on the plain mean of the
blocks; here the shift makes the *parameter-weighted* mean exactly the target, and sparsities are kept
inside [target − λ, target + λ] (where the reference's spread would leave the band, they are clipped
and the shift re-solved). Defaults M = 5, λ = 0.08 as the paper.
"""

from __future__ import annotations

import torch

from prunekit.errors import PrunekitError

OWL_M = 5.0
OWL_LAMBDA = 0.08


def owl_block_ratio(weights: dict[str, torch.Tensor], input_norms: dict[str, torch.Tensor], m: float = OWL_M) -> float:
    """Share (0..1) of the block's Wanda scores above m × their mean. `weights` are [out, in]; `input_norms`
    are the ||X_j||₂ of each linear's input (any common scale per linear: the ratio is scale-free per block
    only when all linears share one scale, as ||X|| over the same tokens does)."""
    scores = torch.cat([(w.abs().float() * input_norms[name].to(w.device).float().unsqueeze(0)).flatten()
                        for name, w in weights.items()])
    return float((scores > m * scores.mean()).double().mean())


def owl_sparsities(ratios: list[float], block_params: list[int], target: float, lam: float = OWL_LAMBDA
                   ) -> list[float]:
    """Per-block sparsities in [target − λ, target + λ] ∩ [0, 1) whose parameter-weighted mean is `target`."""
    if len(ratios) != len(block_params) or not ratios:
        raise ValueError("owl_sparsities needs one ratio and one parameter count per block")
    if not 0.0 <= target < 1.0:
        raise PrunekitError(f"OWL: target sparsity {target} is outside [0, 1)")
    if not 0.0 <= lam < 1.0:
        raise PrunekitError(f"OWL: lambda {lam} is outside [0, 1); the paper uses 0.08")
    r = torch.tensor(ratios, dtype=torch.float64)
    params = torch.tensor(block_params, dtype=torch.float64)
    spread = r.max() - r.min()
    scaled = (r - r.min()) / spread * 2 * lam if spread > 0 else torch.zeros_like(r)
    low, high = max(target - lam, 0.0), min(target + lam, 1.0 - 1e-6)

    def allocation(shift: float) -> torch.Tensor:
        return (target - scaled + shift).clamp(low, high)

    def weighted_mean(shift: float) -> float:
        return float((allocation(shift) * params).sum() / params.sum())

    shift_low, shift_high = -2 * lam - 1.0, 2 * lam + 1.0
    for _ in range(200):  # the weighted mean is monotone in the shift
        mid = (shift_low + shift_high) / 2
        if weighted_mean(mid) < target:
            shift_low = mid
        else:
            shift_high = mid
    return allocation((shift_low + shift_high) / 2).tolist()
