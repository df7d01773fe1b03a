"""Statistics of a layer's input, gathered over calibration tokens by forward hooks.

One object per group of linears that share an input (q/k/v, gate/up): the engine feeds it every
batch of that input, the method reads it when it prunes. Accumulators only (sums that add up across
batches, tasks and data-parallel ranks), named in `fields`, so the engine can reduce, save and restore any
statistic without knowing what it means.
"""

from __future__ import annotations

from typing import ClassVar

import torch


class Statistic:
    """Accumulates something about inputs of width `in_features`.

    Subclasses name their accumulators in `fields` (tensors that add up across batches, tasks and ranks);
    `state`, `merge`, `load_state` and the engine's reduction across data-parallel ranks work on them alone.
    """

    fields: ClassVar[tuple[str, ...]] = ()

    def __init__(self, in_features: int, device: torch.device | str = "cpu"):
        self.in_features = in_features
        self.tokens = 0
        self.device = device

    def update(self, inputs: torch.Tensor) -> None:
        raise NotImplementedError

    def state(self) -> dict[str, torch.Tensor]:
        """The accumulators (live tensors) and the token count."""
        return {**{name: getattr(self, name) for name in self.fields}, "tokens": torch.tensor(self.tokens)}

    def load_state(self, state: dict[str, torch.Tensor]) -> None:
        for name in self.fields:
            getattr(self, name).copy_(state[name])
        self.tokens = int(state["tokens"])

    def merge(self, other: Statistic) -> None:
        """Add another accumulator's tokens (another task, batch or rank) to this one."""
        for name in self.fields:
            mine = getattr(self, name)
            mine += getattr(other, name).to(mine.device)
        self.tokens += other.tokens

    @property
    def nbytes(self) -> int:
        return sum(getattr(self, n).numel() * getattr(self, n).element_size() for n in self.fields)

    @staticmethod
    def _flat(inputs: torch.Tensor) -> torch.Tensor:
        return inputs.reshape(-1, inputs.shape[-1]).float()


class InputSquaredNorms(Statistic):
    """Σ_t x_tj² per input channel j: ||X_j||₂², what Wanda multiplies |W| by (after a square root)."""

    fields = ("sum_squares",)

    def __init__(self, in_features: int, device: torch.device | str = "cpu"):
        super().__init__(in_features, device)
        self.sum_squares = torch.zeros(in_features, dtype=torch.float64, device=device)

    def update(self, inputs: torch.Tensor) -> None:
        flat = self._flat(inputs)
        # per-batch sums in fp32 (8x faster than an fp64 reduction), accumulated across batches in fp64
        self.sum_squares += flat.square().sum(0)
        self.tokens += flat.shape[0]

    def norms(self) -> torch.Tensor:
        """||X_j||₂ over all calibration tokens."""
        return self.sum_squares.sqrt().float()



class InputHessian(Statistic):
    """H = 2 XᵀX / n, the Hessian of the layer-wise squared error that SparseGPT inverts.

    Built with one large matrix product per batch (addmm), accumulated unscaled in fp32.
    """

    fields = ("xtx",)

    def __init__(self, in_features: int, device: torch.device | str = "cpu"):
        super().__init__(in_features, device)
        self.xtx = torch.zeros(in_features, in_features, dtype=torch.float32, device=device)

    def update(self, inputs: torch.Tensor) -> None:
        flat = self._flat(inputs)
        self.xtx.addmm_(flat.t(), flat)
        self.tokens += flat.shape[0]

    def hessian(self) -> torch.Tensor:
        return self.xtx * (2.0 / max(self.tokens, 1))



class InputMeanVariance(Statistic):
    """Per-channel running mean and variance of the input (FLAP's "fluctuation"), plus Σx² for ||X_j||.

    Kept as float64 sums (Σx, Σx²) rather than a Welford update: sums merge across batches and ranks by
    plain addition, and in float64 the cancellation in E[x²] − E[x]² is far below what ranking needs.
    """

    fields = ("sum", "sum_squares")

    def __init__(self, in_features: int, device: torch.device | str = "cpu"):
        super().__init__(in_features, device)
        self.sum = torch.zeros(in_features, dtype=torch.float64, device=device)
        self.sum_squares = torch.zeros(in_features, dtype=torch.float64, device=device)

    def update(self, inputs: torch.Tensor) -> None:
        flat = self._flat(inputs).double()
        self.sum += flat.sum(0)
        self.sum_squares += flat.square().sum(0)
        self.tokens += flat.shape[0]

    def mean(self) -> torch.Tensor:
        return (self.sum / max(self.tokens, 1)).float()

    def variance(self) -> torch.Tensor:
        """Unbiased sample variance per channel (0 with fewer than two tokens)."""
        n = self.tokens
        if n < 2:
            return torch.zeros(self.in_features, dtype=torch.float32, device=self.sum.device)
        centred = self.sum_squares - self.sum.square() / n
        return (centred.clamp_min(0.0) / (n - 1)).float()

    def norms(self) -> torch.Tensor:
        """||X_j||₂ over all tokens (what Wanda's score multiplies |W| by)."""
        return self.sum_squares.sqrt().float()

