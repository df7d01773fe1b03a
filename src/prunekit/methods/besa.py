"""BESA (Xu et al., ICLR 2024): Blockwise Parameter-Efficient Sparsity Allocation.

Per decoder block, every output row of every prunable linear learns its own sparsity: a softmax over
candidate ratios 1, 1 − step, ..., 0 (`candidate_step`, 0.01 as the paper) of learnable logits (passed
through a sigmoid first, the reference's smoothing). A row with sparsity s prunes its ⌊s · in⌋ weights
of lowest Wanda score (|W| · ||X||₂ on the block's inputs). The forward uses that hard mask; the
backward goes through each weight's soft keep-probability 1 − Σ_c p_c [rank < ⌊c · in⌋] (straight-
through estimator). Loss: the block's output error normalised per channel by the reference output's
norm, + β ((s_block − target) / target)², s_block the parameter-weighted sparsity. Optimiser: Prodigy
(as the reference; AdamW optional). At the end the row counts are shifted by one common amount so the
block prunes exactly round(target · parameters) weights. Plain PyTorch, CPU or GPU. Unstructured only:
an N:M pattern fixes every row's sparsity, leaving nothing to learn.

The engine calls `besa_prune_block` from its block hook (the method is `block_level`).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from typing import Literal

import torch
from torch import nn
from torch.nn.utils import parametrize

from prunekit.adapters.base import weight_matrix
from prunekit.errors import PrunekitError
from prunekit.methods.base import MethodConfig, PruneResult, PruningMethod
from prunekit.methods.registry import register
from prunekit.pruning.statistics import InputSquaredNorms
from prunekit.pruning.target import SparsityTarget


class BESAConfig(MethodConfig):
    epochs: int = 1
    optimizer: Literal["prodigy", "adamw"] = "prodigy"
    #: Prodigy: 1.0 (it adapts its own step); AdamW: e.g. 0.01 (the reference's alternative).
    lr: float = 1.0
    #: Prodigy's d_coef (reference: 5 for 7B-13B, larger for larger models).
    d_coef: float = 5.0
    candidate_step: float = 0.01
    #: Weight β of the sparsity penalty (reference: 5).
    sparsity_beta: float = 5.0
    #: Calibration windows per optimisation step (reference: 1).
    batch_size: int = 1
    #: torch threads while learning (thousands of mid-sized ops: on a shared CPU one thread is steadier
    #: and often faster); None leaves the setting alone.
    threads: int | None = 1


class _Masked(nn.Module):
    """Parametrization: the layer's weight times the current mask (set before each forward)."""

    def __init__(self, transposed: bool):
        super().__init__()
        self.transposed = transposed
        self.mask: torch.Tensor | None = None

    def forward(self, weight: torch.Tensor) -> torch.Tensor:
        mask = self.mask.t() if self.transposed else self.mask  # type: ignore[union-attr]
        return weight * mask.to(weight.dtype)


class _RowSparsity:
    """One linear's learnable per-row sparsity over its weights ranked by Wanda score."""

    def __init__(self, weight: torch.Tensor, input_norms: torch.Tensor, candidates: torch.Tensor):
        rows, cols = weight.shape
        scores = weight.abs() * input_norms.to(weight).unsqueeze(0)
        order = torch.argsort(scores, dim=1, stable=True)
        self.rank = torch.empty_like(order)
        self.rank.scatter_(1, order, torch.arange(cols, device=weight.device).expand(rows, cols))
        self.candidates = candidates
        #: a row pruned at candidate ratio c loses its ⌊c · cols⌋ lowest-ranked weights
        self.cut = torch.floor(candidates * cols + 1e-6).long().clamp(0, cols)
        self.logits = torch.zeros(rows, len(candidates), device=weight.device, requires_grad=True)
        self.cols = cols

    def probabilities(self) -> torch.Tensor:
        return self.logits.sigmoid().softmax(dim=-1)

    def row_sparsity(self) -> torch.Tensor:
        return self.probabilities() @ self.candidates

    def keep_mask(self) -> torch.Tensor:
        """Hard 0/1 keep mask in the forward, the soft keep-probability in the backward."""
        probs = self.probabilities()
        rows = probs.shape[0]
        counts = torch.floor((probs.detach() @ self.candidates) * self.cols + 1e-6).long()
        hard = (self.rank >= counts.unsqueeze(1)).float()
        at_cut = torch.zeros(rows, self.cols + 1, device=probs.device, dtype=probs.dtype)
        at_cut = at_cut.scatter_add(1, self.cut.expand(rows, -1), probs)
        # P(kept | rank k) = P(cut <= k): a running sum over the cut positions
        soft = at_cut.cumsum(dim=1)[:, : self.cols].gather(1, self.rank)
        return hard + (soft - soft.detach())  # exactly `hard` in the forward


def exact_row_counts(row_sparsities: list[torch.Tensor], widths: list[int], total: int) -> list[torch.Tensor]:
    """Integer pruned counts per row, as close to s_r · width as possible, summing exactly to `total`.

    One common shift δ of every row's sparsity (found by bisection) brings the sum to `total`; floors,
    then the largest fractional parts take the remaining units."""
    def desired(delta: float) -> list[torch.Tensor]:
        return [((s.double() + delta) * w).clamp(0, w) for s, w in zip(row_sparsities, widths, strict=True)]

    low, high = -1.0, 1.0
    for _ in range(100):
        mid = (low + high) / 2
        if sum(float(d.sum()) for d in desired(mid)) < total:
            low = mid
        else:
            high = mid
    wanted = desired(high)
    floors = [d.floor() for d in wanted]
    missing = total - int(sum(float(f.sum()) for f in floors))
    fractions = torch.cat([d - f for d, f in zip(wanted, floors, strict=True)])
    room = torch.cat([(w - f) > 0 for f, w in zip(floors, widths, strict=True)])
    if missing > 0:
        extra = torch.zeros_like(fractions)
        order = torch.argsort(fractions.masked_fill(~room, -1.0), descending=True, stable=True)
        extra[order[:missing]] = 1.0
        flat = torch.cat(floors) + extra
    else:
        flat = torch.cat(floors)
    counts, start = [], 0
    for f in floors:
        counts.append(flat[start : start + len(f)].long())
        start += len(f)
    return counts


def _input_norms_and_outputs(linears: dict[str, nn.Module], block_forward: Callable[[torch.Tensor], torch.Tensor],
                             inputs: Sequence[torch.Tensor], keep_outputs: bool):
    stats = {name: InputSquaredNorms(weight_matrix(m).shape[1], device=weight_matrix(m).device)
             for name, m in linears.items()}
    handles = [m.register_forward_pre_hook(lambda _m, args, s=stats[name]: s.update(args[0]))
               for name, m in linears.items()]
    outputs = []
    try:
        with torch.no_grad():
            for batch in inputs:
                out = block_forward(batch)
                if keep_outputs:
                    outputs.append(out.detach())
    finally:
        for handle in handles:
            handle.remove()
    return {name: s.norms() for name, s in stats.items()}, outputs


def _optimizer(params: list[torch.Tensor], cfg: BESAConfig) -> torch.optim.Optimizer:
    if cfg.optimizer == "adamw":
        return torch.optim.AdamW(params, lr=cfg.lr, weight_decay=0.0)
    from prodigyopt import Prodigy

    return Prodigy(params, lr=cfg.lr, d_coef=cfg.d_coef, weight_decay=0.0)


def besa_prune_block(linears: dict[str, nn.Module], block_forward: Callable[[torch.Tensor], torch.Tensor],
                     inputs: Iterable[torch.Tensor], dense_outputs: Iterable[torch.Tensor] | None,
                     targets: dict[str, SparsityTarget], config: BESAConfig | None = None,
                     progress: Callable[[str], None] | None = None) -> dict[str, torch.Tensor]:
    """Learn the block's per-row sparsities; return {name: pruned mask [out, in]} (weights untouched).

    `block_forward(batch)` runs the block on hidden states [b, seq, hidden] and returns its output
    hidden states (the linears in `linears` must be the block's own modules). `inputs` are the block's
    calibration inputs in batches; `dense_outputs` the unpruned block's outputs for them (the
    reconstruction target), or None to compute them here.
    """
    cfg = config or BESAConfig()
    for name, target in targets.items():
        if target.is_nm:
            raise PrunekitError(f"besa learns unstructured per-row sparsities; pattern {target.pattern} "
                                f"(layer {name}) fixes them: use an N:M method (wanda, sparsegpt, ria, alps)")
    inputs = list(inputs)
    norms, computed = _input_norms_and_outputs(linears, block_forward, inputs, dense_outputs is None)
    references = computed if dense_outputs is None else list(dense_outputs)
    weights = {name: weight_matrix(m).float() for name, m in linears.items()}
    numels = {name: w.numel() for name, w in weights.items()}
    total_params = sum(numels.values())
    block_target = sum(targets[n].sparsity * numels[n] for n in linears) / total_params
    pruned_total = sum(round(targets[n].sparsity * numels[n]) for n in linears)
    if pruned_total == 0:
        return {name: torch.zeros_like(w, dtype=torch.bool) for name, w in weights.items()}

    steps = max(1, round(1 / cfg.candidate_step))
    candidates = torch.linspace(1.0, 0.0, steps + 1)
    learners = {name: _RowSparsity(w, norms[name], candidates.to(w.device)) for name, w in weights.items()}
    masks = {name: _Masked(type(m).__name__ == "Conv1D") for name, m in linears.items()}
    flags = {name: m.weight.requires_grad for name, m in linears.items()}
    params = [learner.logits for learner in learners.values()]
    windows = [(b, r) for b, batch in enumerate(inputs) for r in range(batch.shape[0])]
    optimizer = _optimizer(params, cfg)
    threads_before = torch.get_num_threads()
    if cfg.threads is not None:
        torch.set_num_threads(cfg.threads)
    try:
        for name, module in linears.items():
            module.weight.requires_grad_(False)
            parametrize.register_parametrization(module, "weight", masks[name], unsafe=True)
        for epoch in range(cfg.epochs):
            losses = []
            for start in range(0, len(windows), cfg.batch_size):
                chosen = windows[start : start + cfg.batch_size]
                batch = torch.cat([inputs[b][r : r + 1] for b, r in chosen])
                reference = torch.cat([references[b][r : r + 1] for b, r in chosen]).float()
                with torch.enable_grad():
                    for name, learner in learners.items():
                        masks[name].mask = learner.keep_mask()
                    output = block_forward(batch).float()
                    scale = reference.reshape(-1, reference.shape[-1]).norm(dim=0).clamp_min(1e-8)
                    error = ((reference - output) / scale).square().sum() / reference.shape[-1]
                    sparsity = sum(learners[n].row_sparsity().mean() * numels[n] for n in learners) / total_params
                    penalty = cfg.sparsity_beta * ((sparsity - block_target) / max(block_target, 1e-8)) ** 2
                    grads = torch.autograd.grad(error + penalty, params)
                for param, grad in zip(params, grads, strict=True):
                    param.grad = grad
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
                losses.append((error.item(), sparsity.item()))
            if progress is not None:
                mean_error = sum(e for e, _ in losses) / len(losses)
                progress(f"besa epoch {epoch + 1}/{cfg.epochs}: reconstruction {mean_error:.4g}, "
                         f"sparsity {losses[-1][1]:.4f} (target {block_target:.4f})")
    finally:
        torch.set_num_threads(threads_before)
        for name, module in linears.items():
            if parametrize.is_parametrized(module, "weight"):
                parametrize.remove_parametrizations(module, "weight", leave_parametrized=False)
            module.weight.requires_grad_(flags[name])
    with torch.no_grad():
        names = list(learners)
        counts = exact_row_counts([learners[n].row_sparsity() for n in names], [learners[n].cols for n in names],
                                  pruned_total)
    return {name: learners[name].rank < count.unsqueeze(1) for name, count in zip(names, counts, strict=True)}


@register
class BESA(PruningMethod):
    """Registered so the CLI and recipes know it; the engine's block hook calls `prune_block`."""

    name = "besa"
    config_class = BESAConfig
    statistic = InputSquaredNorms
    block_level = True

    def prune_block(self, linears: dict[str, nn.Module], block_forward: Callable[[torch.Tensor], torch.Tensor],
                    inputs: Iterable[torch.Tensor], dense_outputs: Iterable[torch.Tensor] | None,
                    targets: dict[str, SparsityTarget], progress: Callable[[str], None] | None = None
                    ) -> dict[str, PruneResult]:
        masks = besa_prune_block(linears, block_forward, inputs, dense_outputs, targets, self.config, progress)
        return {name: PruneResult(weight_matrix(m).float().masked_fill(masks[name], 0.0), masks[name])
                for name, m in linears.items()}

    def prune_layer(self, weight, stats, target: SparsityTarget) -> PruneResult:
        raise PrunekitError("besa prunes whole blocks: it needs the engine's block hook (prune_block), "
                            "not a per-layer call")
