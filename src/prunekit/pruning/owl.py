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
from pydantic import BaseModel, ConfigDict, Field

from prunekit.errors import PrunekitError
from prunekit.pruning.statistics import InputSquaredNorms

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


# -- on the engine: a dense collect pass measures every block's outlier ratio, then the method runs ---------------


class OwlConfig(BaseModel):
    """`--sparsity-allocation owl` with options `owl.m` and `owl.lam` (`--option owl.m=7`)."""

    model_config = ConfigDict(extra="forbid")
    m: float = Field(default=OWL_M, gt=0.0)
    lam: float = Field(default=OWL_LAMBDA, ge=0.0, lt=1.0)


class OwlObserver:
    """The collect pass's observer: each block's Wanda scores over the dense model give its outlier ratio."""

    needs_data = True

    def __init__(self, adapter, plan, config: OwlConfig):
        self.adapter, self.plan, self.config = adapter, plan, config

    def _groups(self, index: int, block):
        prefix = self.adapter.block_prefix(index)
        for group, modules in self.adapter.block_linears(block):
            active = {f"{prefix}.{n}": m for n, m in modules.items() if self.plan.target_for(f"{prefix}.{n}")}
            if active:
                yield group, active

    def observed(self, index: int, block):
        from prunekit.adapters import weight_matrix

        observed = {}
        for group, active in self._groups(index, block):
            first = next(iter(active.values()))
            observed[".".join(group)] = (group[0], first,
                                         InputSquaredNorms(weight_matrix(first).shape[1], first.weight.device))
        return observed

    def summarize(self, index: int, block, stats) -> dict[str, torch.Tensor]:
        from prunekit.adapters import weight_matrix

        weights, norms = {}, {}
        for group, active in self._groups(index, block):
            for name, module in active.items():
                weights[name] = weight_matrix(module)
                norms[name] = stats[".".join(group)].norms()
        ratio = owl_block_ratio(weights, norms, self.config.m)
        return {"ratio": torch.tensor([ratio], dtype=torch.float64),
                "params": torch.tensor([sum(w.numel() for w in weights.values())], dtype=torch.int64)}

    def decide(self, summaries: list[dict[str, torch.Tensor]]) -> list[float]:
        ratios = [float(s["ratio"][0]) for s in summaries]
        params = [int(s["params"][0]) for s in summaries]
        return owl_sparsities(ratios, params, self.plan.default.sparsity, self.config.lam)


class OwlProgram:
    """OWL + any per-layer method: collect (dense, outlier ratios) → per-block targets → the method's pass."""

    def __init__(self, method, plan, adapter, *, propagate: str, config: OwlConfig):
        if plan.default.is_nm:
            raise PrunekitError(f"--sparsity-allocation owl spreads an unstructured sparsity over the blocks; pattern "
                                f"{plan.default.pattern} fixes every block's sparsity (use unstructured)")
        self.method, self.plan, self.adapter, self.propagate, self.config = method, plan, adapter, propagate, config
        self.ratios: list[float] = []
        self.sparsities: list[float] = []

    def passes(self):
        from prunekit.engine.passes import CollectPass, SequentialPass
        from prunekit.pruning.target import SparsityPlan, SparsityTarget

        collect = CollectPass(OwlObserver(self.adapter, self.plan, self.config))
        yield collect
        self.ratios = [float(s["ratio"][0]) for s in collect.summaries]
        self.sparsities = collect.result
        per_block = [(f"{self.adapter.block_prefix(i)}.*", SparsityTarget(s)) for i, s in enumerate(self.sparsities)]
        plan = SparsityPlan(self.plan.default, [*self.plan.overrides, *per_block], list(self.plan.skip))
        yield SequentialPass(self.method, plan, self.adapter, self.propagate)

    def describe(self) -> dict:
        return {"method": "owl", "m": self.config.m, "lambda": self.config.lam, "outlier_ratios": self.ratios,
                "block_sparsities": self.sparsities}


ALLOCATIONS = ("owl",)


def split_allocation_options(allocation: str | None, options: dict) -> tuple[dict, OwlConfig | None]:
    """The method's options and the allocation's (prefixed `owl.`), checked before any work."""
    from pydantic import ValidationError

    options = dict(options or {})
    own = {k[len("owl."):]: options.pop(k) for k in list(options) if k.startswith("owl.")}
    if allocation is None:
        if own:
            raise PrunekitError(f"options {', '.join('owl.' + k for k in own)} need --sparsity-allocation owl")
        return options, None
    if allocation not in ALLOCATIONS:
        raise PrunekitError(f"unknown sparsity allocation {allocation!r}; accepted: {', '.join(ALLOCATIONS)}")
    try:
        return options, OwlConfig(**own)
    except ValidationError as exc:
        problems = "; ".join(f"owl.{'.'.join(str(p) for p in e['loc'])}: {e['msg']}" for e in exc.errors())
        raise PrunekitError(f"bad options for --sparsity-allocation owl: {problems}") from None
