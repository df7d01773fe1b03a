"""ALPS (Meng et al., 2024): layer-wise pruning by ADMM with a penalty schedule, then a CG back-solve.

Statistics: XᵀX over the calibration tokens. In coordinates where XᵀX (+1 % damping) has a unit
diagonal, ALPS solves min ||X W_dense − X W||² s.t. W has the target pattern by ADMM: a ridge step
B = (XᵀX + ρI)⁻¹(XᵀX B_dense − V + ρD) (one eigendecomposition serves every ρ and every layer of a
shared-input group), a projection D = top-k(B + V/ρ) onto the pattern (layer-wide for unstructured,
per group of M for N:M), and a dual step V += ρ(B − D). Every few iterations ρ grows (×1.3 / ×1.2 /
×1.1) while the support still changes, shrinks ×5 (restarting) when it settles too early, and the loop
stops once the support is stable. The final support's weights are re-fitted by conjugate gradients on
the normal equations restricted to the support (the reference's identity preconditioner, which here is
Jacobi since the diagonal is 1). Weights: updated.
"""

from __future__ import annotations

import logging

import torch

from prunekit.methods.base import MethodConfig, PruneResult, PruningMethod
from prunekit.methods.registry import register
from prunekit.pruning.masks import mask_from_scores
from prunekit.pruning.statistics import InputHessian
from prunekit.pruning.target import SparsityTarget

log = logging.getLogger(__name__)


class ALPSConfig(MethodConfig):
    rho: float = 0.1
    max_iter: int = 300
    #: ρ is adjusted, and convergence checked, every this many iterations.
    update_iter: int = 3
    #: No early stop on a small support change before this iteration.
    switch_iter: int = 30
    #: Ridge added to XᵀX, as a fraction of its mean diagonal.
    percdamp: float = 0.01
    cg_iters: int = 10
    cg_rtol: float = 1e-4


def normalized_gram(xtx: torch.Tensor, percdamp: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(XᵀX + λI) scaled to a unit diagonal, and the scale (√diag) that maps weights into those coordinates."""
    gram = xtx.double().clone()
    gram.diagonal().add_(percdamp * gram.diagonal().mean())
    scale = gram.diagonal().sqrt() + 1e-8
    return gram / scale[:, None] / scale[None, :], scale


def lowest_k(scores: torch.Tensor, k: int) -> torch.Tensor:
    """Mask of the k lowest scores (ties to the lower index): the same mask as a stable sort, in O(n)
    with a selection; ADMM projects every iteration, where a full sort would cost more than the solve."""
    flat = scores.flatten()
    if k <= 0:
        return torch.zeros_like(scores, dtype=torch.bool)
    if k >= flat.numel():
        return torch.ones_like(scores, dtype=torch.bool)
    threshold = torch.kthvalue(flat, k).values
    mask = flat < threshold
    short = k - int(mask.sum())
    if short > 0:
        mask[torch.nonzero(flat == threshold).flatten()[:short]] = True
    return mask.view_as(scores)


def _pattern(values: torch.Tensor, target: SparsityTarget) -> torch.Tensor:
    """Pruned mask (True = zero) of [out, in] values: keep the largest |values| in every group of M."""
    return mask_from_scores(values.abs(), target)


def masked_cg(gram: torch.Tensor, rhs: torch.Tensor, support: torch.Tensor, start: torch.Tensor, iters: int,
              rtol: float) -> torch.Tensor:
    """Solve gram · x = rhs for every column, with x restricted to `support` (a 0/1 float mask)."""
    x = start * support
    residual = (rhs - gram @ x) * support
    direction = residual.clone()
    rho = (residual * residual).sum(0)
    limit = (rtol * rhs.norm(dim=0)).square()
    for _ in range(iters):
        running = rho > limit  # each column stops at its own tolerance
        if not bool(running.any()):
            break
        projected = gram @ direction
        curvature = (direction * projected).sum(0)
        alpha = rho / torch.where(curvature == 0, torch.ones_like(curvature), curvature) * running
        x = x + alpha * direction
        residual = (residual - alpha * projected) * support
        rho_next = (residual * residual).sum(0)
        beta = rho_next / torch.where(rho == 0, torch.ones_like(rho), rho)
        direction = residual + beta * direction
        rho = rho_next
    return x


def alps_prune(weight: torch.Tensor, xtx: torch.Tensor, target: SparsityTarget, config: ALPSConfig | None = None,
               eig: tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor] | None = None
               ) -> tuple[torch.Tensor, torch.Tensor]:
    """Return (new weight with zeros, pruned mask) for an [out, in] weight; `eig` = (gram, scale, L, Q)
    from `alps_factor` when a group shares one XᵀX. Computes in the weight's dtype (the engine: fp32)."""
    cfg = config or ALPSConfig()
    gram, scale, eigvals, eigvecs = eig if eig is not None else alps_factor(xtx, cfg.percdamp)
    dtype = weight.dtype
    gram, scale, eigvals, eigvecs = gram.to(dtype), scale.to(dtype), eigvals.to(dtype), eigvecs.to(dtype)
    dense = (weight * scale).t().contiguous()  # B in the paper: [in, out]
    target_rhs = gram @ dense
    kept = weight.numel() - round(target.sparsity * weight.numel()) if not target.is_nm else \
        weight.numel() * (target.m - target.n) // target.m  # type: ignore[operator]

    def project(values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Values are [in, out]: N:M groups run along `in` within an output, i.e. along columns here."""
        pruned = _pattern(values.t(), target).t() if target.is_nm else \
            lowest_k(values.abs(), round(target.sparsity * values.numel()))
        return values.masked_fill(pruned, 0.0), pruned

    def ridge_inverse(rho: float) -> torch.Tensor:
        return (eigvecs * (1.0 / (eigvals + rho))) @ eigvecs.t()

    rho = cfg.rho
    inverse = ridge_inverse(rho)
    d_init, support = project(dense)
    b, d, v = dense, d_init, torch.zeros_like(dense)
    grown = False  # the reference's init_rho: ρ has been raised at least once
    for iteration in range(cfg.max_iter):
        b = inverse @ (target_rhs - v + rho * d)
        d, pruned = project(b + v / rho)
        v = v + rho * (b - d)
        if (iteration + 1) % cfg.update_iter:
            continue
        change = int((pruned != support).sum())
        support = pruned
        if change / kept > 0.1:
            grown, rho = True, rho * 1.3
        elif change / kept > 0.005:
            grown, rho = True, rho * 1.2
        elif change > 0:
            if grown:
                rho *= 1.1
            else:  # settled before ρ ever grew: ρ was too large; restart smaller
                rho /= 5
                b, d, v = dense, d_init, torch.zeros_like(dense)
        elif grown:
            break
        else:
            rho /= 5
        rho = min(rho, 1e6)
        inverse = ridge_inverse(rho)
        if iteration >= cfg.switch_iter and change / kept < 0.0003:
            break
    log.debug("ALPS: %d ADMM iterations, final rho %.3g", iteration + 1, rho)
    b, pruned = project(b)
    solved = masked_cg(gram, target_rhs, (~pruned).to(dtype), b, cfg.cg_iters, cfg.cg_rtol)
    new_weight = (solved / scale[:, None]).t().contiguous()
    mask = pruned.t().contiguous()
    return new_weight.masked_fill(mask, 0.0), mask


def alps_factor(xtx: torch.Tensor, percdamp: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Normalised Gram matrix, its scale, and its eigendecomposition (float64), shared by a group."""
    gram, scale = normalized_gram(xtx, percdamp)
    eigvals, eigvecs = torch.linalg.eigh(gram)
    return gram, scale, eigvals, eigvecs


@register
class ALPS(PruningMethod):
    name = "alps"
    config_class = ALPSConfig
    statistic = InputHessian
    updates_weights = True

    def prune_layer(self, weight, stats: InputHessian, target: SparsityTarget) -> PruneResult:
        return self.prune_group({"layer": weight}, stats, {"layer": target})["layer"]

    def prune_group(self, weights, stats: InputHessian, targets) -> dict[str, PruneResult]:
        eig = alps_factor(stats.xtx, self.config.percdamp)
        results = {}
        for name, weight in weights.items():
            new_weight, mask = alps_prune(weight, stats.xtx, targets[name], self.config, eig)
            results[name] = PruneResult(new_weight, mask)
        return results
