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
        #: Calibration windows (rows of a [batch, seq, hidden] input) seen: some papers average per window.
        self.windows = 0
        self.device = device

    def update(self, inputs: torch.Tensor) -> None:
        raise NotImplementedError

    def accumulators(self) -> list[torch.Tensor]:
        """The live tensors that add up across batches and ranks (what the engine all-reduces)."""
        return [getattr(self, name) for name in self.fields]

    def set_counts(self, tokens: int, windows: int) -> None:
        self.tokens, self.windows = tokens, windows

    def state(self) -> dict[str, torch.Tensor]:
        """The accumulators (live tensors) and the counts."""
        return {**{name: getattr(self, name) for name in self.fields}, "tokens": torch.tensor(self.tokens),
                "windows": torch.tensor(self.windows)}

    def load_state(self, state: dict[str, torch.Tensor]) -> None:
        for name in self.fields:
            getattr(self, name).copy_(state[name])
        self.set_counts(int(state["tokens"]), int(state.get("windows", torch.tensor(0))))

    def merge(self, other: Statistic) -> None:
        """Add another accumulator's tokens (another task, batch or rank) to this one."""
        for mine, theirs in zip(self.accumulators(), other.accumulators(), strict=True):
            mine += theirs.to(mine.device)
        self.set_counts(self.tokens + other.tokens, self.windows + other.windows)

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.accumulators())

    def _flat(self, inputs: torch.Tensor) -> torch.Tensor:
        """[tokens, in] fp32 view of a batch; counts its windows (a 2-D input is one window)."""
        self.windows += inputs.shape[0] if inputs.dim() == 3 else 1
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

    Each batch's XᵀX is one fp32 matrix product (in column tiles, to bound the scratch); the batches are added
    in float64. SparseGPT's choices compound block after block, so a change in the last fp32 bit of H (adding
    the same batches in another order, as data-parallel ranks do) flipped 2.5 % of a 30-block model's mask; in
    float64 the sum rounds back to the same fp32 H whatever the order, and the result does not depend on how
    the batches are spread over ranks.
    """

    fields = ("xtx",)
    #: Largest fp32 scratch of one batch's product, in bytes.
    SCRATCH_BYTES: ClassVar[int] = 64 * 2**20

    def __init__(self, in_features: int, device: torch.device | str = "cpu"):
        super().__init__(in_features, device)
        self.xtx = torch.zeros(in_features, in_features, dtype=torch.float64, device=device)

    def update(self, inputs: torch.Tensor) -> None:
        flat = self._flat(inputs)
        width = max(1, min(self.in_features, self.SCRATCH_BYTES // (4 * self.in_features)))
        for start in range(0, self.in_features, width):
            end = min(start + width, self.in_features)
            self.xtx[:, start:end] += flat.t() @ flat[:, start:end]
        self.tokens += flat.shape[0]

    def hessian(self) -> torch.Tensor:
        """fp32 H for the solvers (scaled in float64, then rounded once)."""
        return (self.xtx * (2.0 / max(self.tokens, 1))).float()


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


class CombinedStatistic(Statistic):
    """Several statistics fed the same inputs, for a method built from two (a base method + a refiner).

    `CombinedStatistic.of(A, B)` is a class the engine instantiates like any other statistic;
    `part(A)` returns the gathered A.
    """

    parts: ClassVar[tuple[type[Statistic], ...]] = ()

    def __init__(self, in_features: int, device: torch.device | str = "cpu"):
        super().__init__(in_features, device)
        self.members = {cls: cls(in_features, device) for cls in self.parts}

    @classmethod
    def of(cls, *parts: type[Statistic]) -> type[CombinedStatistic]:
        unique = tuple(dict.fromkeys(parts))
        return type(f"Combined[{','.join(p.__name__ for p in unique)}]", (cls,), {"parts": unique})

    def part(self, cls: type[Statistic]) -> Statistic:
        return self.members[cls]

    def update(self, inputs: torch.Tensor) -> None:
        for member in self.members.values():
            member.update(inputs)
        first = next(iter(self.members.values()))
        self.tokens, self.windows = first.tokens, first.windows

    def accumulators(self) -> list[torch.Tensor]:
        return [tensor for member in self.members.values() for tensor in member.accumulators()]

    def set_counts(self, tokens: int, windows: int) -> None:
        super().set_counts(tokens, windows)
        for member in self.members.values():
            member.set_counts(tokens, windows)

    def state(self) -> dict[str, torch.Tensor]:
        return {f"{cls.__name__}.{k}": v for cls, m in self.members.items() for k, v in m.state().items()}

    def load_state(self, state: dict[str, torch.Tensor]) -> None:
        for cls, member in self.members.items():
            prefix = f"{cls.__name__}."
            member.load_state({k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)})
        first = next(iter(self.members.values()))
        super().set_counts(first.tokens, first.windows)
