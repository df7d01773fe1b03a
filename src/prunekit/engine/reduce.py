"""How statistics are combined before a decision: nothing to do in one process, all_reduce across ranks.

Only statistics cross ranks, once per block: every rank gathers over its own calibration rows, the sums are
added with `torch.distributed.all_reduce`, and every rank then holds the statistics of all rows and takes the
same (deterministic) decision, so nothing else has to be sent.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch

from prunekit.pruning.statistics import Statistic


class LocalReducer:
    """One process: the statistics are already complete."""

    rank = 0
    world_size = 1
    bytes_reduced = 0
    bytes_shared = 0

    def reduce(self, statistics: Iterable[Statistic]) -> None:
        return None

    def share(self, tensors: list[torch.Tensor]) -> None:
        """Rank 0's values of `tensors` on every rank."""
        return None

    def barrier(self) -> None:
        return None

    def rows(self, total: int) -> slice:
        """The calibration rows this process works on."""
        return slice(0, total)


class DistributedReducer(LocalReducer):
    """Ranks of a `torch.distributed` process group (gloo on CPU, nccl on GPU): sums all-reduced in place."""

    def __init__(self) -> None:
        import torch.distributed as dist

        self._dist = dist
        self.rank = dist.get_rank()
        self.world_size = dist.get_world_size()
        self.bytes_reduced = 0
        self.bytes_shared = 0

    def reduce(self, statistics: Iterable[Statistic]) -> None:
        for statistic in statistics:
            accumulators = statistic.accumulators()
            for tensor in accumulators:
                self._dist.all_reduce(tensor)
                self.bytes_reduced += tensor.numel() * tensor.element_size()
            device = accumulators[0].device if accumulators else torch.device("cpu")
            counts = torch.tensor([statistic.tokens, statistic.windows], dtype=torch.int64, device=device)
            self._dist.all_reduce(counts)
            statistic.set_counts(int(counts[0]), int(counts[1]))

    def share(self, tensors: list[torch.Tensor]) -> None:
        for tensor in tensors:
            data = tensor if tensor.is_contiguous() else tensor.contiguous()
            self._dist.broadcast(data, src=0)
            if data is not tensor:
                tensor.copy_(data)
            self.bytes_shared += tensor.numel() * tensor.element_size()

    def barrier(self) -> None:
        self._dist.barrier()

    def rows(self, total: int) -> slice:
        """Contiguous, near-equal shares: rank r takes rows [r·n/W, (r+1)·n/W)."""
        return slice(self.rank * total // self.world_size, (self.rank + 1) * total // self.world_size)
