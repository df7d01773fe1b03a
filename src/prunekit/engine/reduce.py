"""How statistics are combined before a decision: nothing to do in one process, all_reduce across ranks.

Only statistics cross ranks, once per block: every rank gathers over its own calibration rows and the sums are
added with `torch.distributed.all_reduce`, so that every rank holds the statistics of all rows and takes the
same (deterministic) decision. A method that updates weights decides on rank 0 alone and broadcasts the result:
its statistics are summed on rank 0 only (`torch.distributed.reduce`).
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

    def reduce(self, statistics: Iterable[Statistic], *, only_rank0: bool = False) -> None:
        """Sum each statistic over the ranks, on every rank, or on rank 0 alone when only it decides."""
        return None

    def share(self, tensors: list[torch.Tensor]) -> None:
        """Rank 0's values of `tensors` on every rank."""
        return None

    def barrier(self) -> None:
        return None

    def rows(self, total: int, batch_size: int = 1) -> slice:
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

    def reduce(self, statistics: Iterable[Statistic], *, only_rank0: bool = False) -> None:
        # A reduce to one rank moves half the bytes of an all-reduce over a ring: what SparseGPT's XᵀX needs.
        combine = (lambda t: self._dist.reduce(t, dst=0)) if only_rank0 else self._dist.all_reduce
        for statistic in statistics:
            accumulators = statistic.accumulators()
            for tensor in accumulators:
                combine(tensor)
                self.bytes_reduced += tensor.numel() * tensor.element_size()
            device = accumulators[0].device if accumulators else torch.device("cpu")
            counts = torch.tensor([statistic.tokens, statistic.windows], dtype=torch.int64, device=device)
            combine(counts)
            statistic.set_counts(int(counts[0]), int(counts[1]))  # on ranks > 0 after a reduce: not used

    def share(self, tensors: list[torch.Tensor]) -> None:
        for tensor in tensors:
            data = tensor if tensor.is_contiguous() else tensor.contiguous()
            self._dist.broadcast(data, src=0)
            if data is not tensor:
                tensor.copy_(data)
            self.bytes_shared += tensor.numel() * tensor.element_size()

    def barrier(self) -> None:
        self._dist.barrier()

    def rows(self, total: int, batch_size: int = 1) -> slice:
        """Contiguous, near-equal shares of whole batches: rank r takes batches [r·B/W, (r+1)·B/W).

        Whole batches, so that every rank runs exactly the batches one process would: each batch's statistics
        are then the same bits, and sums kept in float64 (SparseGPT's XᵀX) reduce to one process's result.
        With fewer batches than ranks the rows themselves are shared.
        """
        batches = -(-total // batch_size)
        if batches < self.world_size:
            batch_size, batches = 1, total
        first = self.rank * batches // self.world_size * batch_size
        last = (self.rank + 1) * batches // self.world_size * batch_size
        return slice(min(first, total), min(last, total))
